"""Stage ``serving``: vLLM serving the plain model and sharing policies at one or more fixed KV-cache budgets —
KV blocks, maximum concurrency, output tokens/s and latency per policy (:mod:`kvsharer.serving.bench`).

Runs in the environment that has vLLM (``make serve-setup``: ``.venv-serve``; the DAG's rule ``serving`` runs
it with ``serving.python``, or in ``envs/serving.yaml`` with ``--use-conda``). Everything that needs no vLLM is
checked first (the model's ``config.json``, every policy against it, the workload), so bad input fails in a
second with one message, before an engine starts. Writes one JSON (``--out``): per budget and arm a row of
``runs`` with the blocks vLLM allocated and the blocks the budget must hold (``budget // (block bytes per
layer x (L - k))``), concurrency, the medians over ``--repeats`` rounds and the ratios to plain.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

from ..atomic import atomic_write_text
from ..cache.policy import PolicyError, SharingPolicy
from ..serving.bench import Arm, Workload, kv_shape, measure_arms, set_engine_threads, vllm_version
from ..serving.overrides import read_config, serving_overrides

log = logging.getLogger("kvsharer")

PLAIN = "plain"


def _budgets(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--kv-cache-mib expects comma-separated numbers (MiB), got {text!r}") from None
    if not values or min(values) <= 0:
        raise ValueError(f"--kv-cache-mib needs budgets above 0 MiB, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="a prepared model folder (prepare-model --out)")
    parser.add_argument("--name", help="model name in the results (default: the folder name)")
    parser.add_argument("--policy", action="append", default=[], metavar="NAME=FILE",
                        help="a policy JSON served beside the plain model (repeatable)")
    parser.add_argument("--kv-cache-mib", default="96",
                        help="KV-cache budgets in MiB, comma-separated: every arm runs at each (kv_cache_memory_bytes)")
    parser.add_argument("--block-size", type=int, default=32, help="tokens per KV block")
    parser.add_argument("--requests", type=int, default=48, help="requests of the set, all submitted at once")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="random prompt tokens per request")
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy tokens generated per request (EOS ignored)")
    parser.add_argument("--max-num-seqs", type=int, default=256, help="vLLM's cap on sequences in one step")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of the set through every arm (medians)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True,
                        help="no torch.compile / CUDA graphs (--no-eager on a GPU)")
    parser.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=True,
                        help="build every engine of a budget first and interleave the rounds (--no-interleave: "
                             "one engine at a time, for engines too large to hold together)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs one engine spreads over")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts and of vLLM")
    parser.add_argument("--out", required=True, type=Path, help="JSON")


def read_arms(model: Path, specs: list[str], layers: int) -> tuple[list[Arm], dict[str, dict]]:
    """The plain arm and one per ``NAME=FILE`` (checked against the model: vLLM-free), and what each policy
    file says of itself (order, rate requested)."""
    arms = [Arm(PLAIN, SharingPolicy.identity(layers), {})]
    about = {PLAIN: {"policy_file": None, "order": None, "rate_requested": 0.0}}
    for spec in specs:
        name, _, path = spec.partition("=")
        if not name or not path:
            raise ValueError(f"--policy takes NAME=FILE, got {spec!r}")
        if name in about:
            raise ValueError(f"--policy names {name!r} twice (or names the plain arm)")
        try:
            policy = SharingPolicy.from_json(Path(path))
        except PolicyError as err:
            raise ValueError(f"--policy {name}: {err}") from None
        arms.append(Arm(name, policy, serving_overrides(model, policy)))  # refuses pairs vLLM cannot serve
        about[name] = {"policy_file": path, "order": (policy.meta.get("settings") or {}).get("order"),
                       "rate_requested": policy.meta.get("rate_requested", policy.rate)}
    return arms, about


def main(args: argparse.Namespace) -> int:
    budgets = _budgets(args.kv_cache_mib)
    workload = Workload(block_size=args.block_size, requests=args.requests, prompt_tokens=args.prompt_tokens,
                        new_tokens=args.new_tokens, max_num_seqs=args.max_num_seqs, repeats=args.repeats,
                        dtype=args.dtype, eager=args.eager, tensor_parallel_size=args.tensor_parallel_size,
                        seed=args.seed)
    if workload.problems():
        raise ValueError("; ".join(workload.problems()))
    config = read_config(args.model)
    layers = kv_shape(config)[0]
    window = config.get("max_position_embeddings")
    if window and workload.max_model_len > window:
        raise ValueError(f"{args.prompt_tokens} prompt + {args.new_tokens} new tokens exceed the model's window of "
                         f"{window}")
    arms, about = read_arms(args.model, args.policy, layers)
    if importlib.util.find_spec("vllm") is None:
        raise ValueError(f"vLLM is not installed for {sys.executable}: `make serve-setup` builds .venv-serve "
                         "(the DAG runs this stage with serving.python, or envs/serving.yaml with --use-conda)")
    set_engine_threads(args.threads or 1)
    started = time.perf_counter()
    runs = []
    for mib in budgets:
        budget = int(mib * 2**20)
        results = measure_arms(str(args.model), config, arms, budget, workload, args.interleave, log.info)
        for arm in arms:
            runs.append({"kv_cache_mib": mib, "kv_cache_bytes": budget, "arm": arm.name, **about[arm.name],
                         **results[arm.name]})
    out = {
        "stage": "serving", "model": args.name or args.model.name, "model_dir": str(args.model),
        "engine": f"vllm {vllm_version()}", "layers": layers, "kv_heads": kv_shape(config)[1],
        "head_dim": kv_shape(config)[2], "workload": asdict(workload),
        "threads": args.threads or 1, "interleave": args.interleave, "kv_cache_mib": budgets,
        "seconds": time.perf_counter() - started,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()}, "runs": runs,
    }
    atomic_write_text(args.out, json.dumps(out, indent=2) + "\n")
    for run in runs:
        ratio = run["ratio_to_plain"]
        log.info("%g MiB %-40s k=%2d blocks %4d (expected %d, x%.3f, L/(L-k) %.3f) concurrency %3d (x%.3f) "
                 "%.1f tok/s (x%.3f)", run["kv_cache_mib"], run["arm"], run["shared_layers"], run["kv_blocks"],
                 run["kv_blocks_expected"], ratio["kv_blocks"], run["expected_ratio"], run["max_concurrency"],
                 ratio["max_concurrency"], run["output_tokens_per_s"],
                 ratio["output_tokens_per_s_within_rounds_median"])
    log.info("%d runs (%d budgets x %d arms) -> %s", len(runs), len(budgets), len(arms), args.out)
    return 0
