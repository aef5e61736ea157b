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

The measurement is :mod:`kvsharer.serving.bench`'s, as in the DAG's stage ``serving`` (Table 1's searched
policies at one or more budgets, ``serving:`` in the config); this script adds the spread and fp8 arms.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from run_facts import run_facts  # benchmarks/ is the script's folder

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


def main(argv=None) -> int:
    launched = time.time()
    args = _args(argv)
    from kvsharer.serving.bench import FP8, Arm, Workload, kv_shape, measure_arms, set_engine_threads

    set_engine_threads(args.threads)  # before vLLM is imported
    import vllm

    from kvsharer.atomic import atomic_write_text
    from kvsharer.cache.policy import SharingPolicy
    from kvsharer.models.layer_kinds import layer_kinds
    from kvsharer.serving.overrides import read_config, serving_overrides

    if args.model is None:
        from kvsharer.serving.demo import prepare_demo_model

        args.model = str(prepare_demo_model())
    config = read_config(args.model)
    layers = kv_shape(config)[0]
    policies: dict[str, SharingPolicy] = {"plain": SharingPolicy.identity(layers)}
    for rate in (float(r) for r in args.rates.split(",") if r):
        policies[f"spread{rate * 100:g}%"] = SharingPolicy.spread(layers, rate, layer_kinds(config))
    for spec in args.policy:
        name, _, path = spec.partition("=")
        policies[name] = SharingPolicy.from_json(path)
    fp8_arms = [a for a in args.fp8.split(",") if a]
    unknown = [a for a in fp8_arms if a not in policies]
    if unknown:
        raise SystemExit(f"--fp8 names arms {unknown} that this run does not have ({', '.join(policies)})")
    workload = Workload(block_size=args.block_size, requests=args.requests, prompt_tokens=args.prompt_tokens,
                        new_tokens=args.new_tokens, max_num_seqs=args.max_num_seqs, repeats=args.repeats,
                        dtype=args.dtype, eager=args.eager, load_format=args.load_format, seed=args.seed)
    if workload.problems():
        raise SystemExit("; ".join(workload.problems()))
    arms = [Arm(name, policy, serving_overrides(args.model, policy)) for name, policy in policies.items()]
    # an fp8 cache this build cannot run is reported, not fatal
    arms += [Arm(f"{name}+fp8", policies[name], serving_overrides(args.model, policies[name]), FP8, required=False)
             for name in fp8_arms]
    budget = int(args.kv_cache_mib * (1 << 20))
    results = measure_arms(args.model, config, arms, budget, workload, interleave=not args.one_at_a_time,
                           log=lambda line: print(line, flush=True))
    measured = {key: arm for key, arm in results.items() if "error" not in arm}
    out = {
        "benchmark": "serve", "engine": f"vllm {vllm.__version__}", "model": args.model, "layers": layers,
        "kv_cache_bytes": budget, "block_size": args.block_size, "requests": args.requests,
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "dtype": args.dtype,
        "repeats": args.repeats,
        "threads": args.threads,
        "policies_note": "spread*: SharingPolicy.spread (not searched); blocks and concurrency depend only on k",
        "arms": results, **run_facts(launched, argv),
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
