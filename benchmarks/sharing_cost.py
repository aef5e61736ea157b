"""Plain model vs KV sharing at a given rate, side by side in one run: KV bytes and prefill time.

    python benchmarks/sharing_cost.py --model results/models/smollm2-135m

Writes a JSON file with both measurements and their ratios (sharing / plain). The shared layers are
spread evenly over the depth, each reading the layer just before it: the cost of sharing does not
depend on *which* layers share, only on how many.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from kvsharer import SharingPolicy, cache_nbytes, expected_kv_nbytes, share_kv
from kvsharer.atomic import atomic_write_text
from kvsharer.models.loading import find_parts, load_model
from run_facts import run_facts  # benchmarks/ is the script's folder


def spread_policy(model, rate: float) -> SharingPolicy:
    """round(rate × L) layers, evenly spread, each reading the layer of its attention kind before it."""
    parts = find_parts(model)
    return SharingPolicy.spread(parts.n_layers, rate, parts.kinds)


def prefill(model, tokens) -> tuple[float, int]:
    start = time.perf_counter()
    with torch.inference_mode():
        out = model(tokens, use_cache=True)
    if tokens.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, cache_nbytes(out.past_key_values)


def main(argv=None) -> int:
    launched = time.time()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="results/models/smollm2-135m")
    parser.add_argument("--rate", type=float, default=0.25)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", default="results/benchmarks/sharing_cost.json")
    args = parser.parse_args(argv)

    model, _ = load_model(args.model, dtype=args.dtype, device=args.device)
    n_layers = find_parts(model).n_layers
    policy = spread_policy(model, args.rate)
    vocab = model.config.vocab_size
    tokens = torch.randint(0, vocab, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0)).to(args.device)

    prefill(model, tokens)  # warm-up, both arms
    with share_kv(model, policy):
        prefill(model, tokens)
    times = {"plain": [], "shared": []}
    nbytes = {}
    for _ in range(args.repeats):  # interleaved, so drift hits both arms alike
        t, nbytes["plain"] = prefill(model, tokens)
        times["plain"].append(t)
        with share_kv(model, policy):
            t, nbytes["shared"] = prefill(model, tokens)
        times["shared"].append(t)

    element = torch.finfo(model.dtype).bits // 8
    expected = expected_kv_nbytes(model, policy, args.batch, args.tokens, element)
    if nbytes["shared"] != expected:
        raise AssertionError(f"shared cache holds {nbytes['shared']} bytes, the model shape predicts {expected}")
    median = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "benchmark": "sharing_cost",
        "model": args.model,
        "device": args.device,
        "host": platform.node(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "n_layers": n_layers,
        "rate_requested": args.rate,
        "shared_layers": policy.shared_layers,
        "rate_effective": policy.rate,
        "batch": args.batch,
        "tokens": args.tokens,
        "kv_bytes_plain": nbytes["plain"],
        "kv_bytes_shared": nbytes["shared"],
        "kv_bytes_ratio": nbytes["shared"] / nbytes["plain"],
        "kv_bytes_ratio_expected": 1 - policy.rate,
        "prefill_s_plain_median": median["plain"],
        "prefill_s_shared_median": median["shared"],
        "prefill_time_ratio": median["shared"] / median["plain"],
        "prefill_s_plain": times["plain"],
        "prefill_s_shared": times["shared"],
        **run_facts(launched, argv),
    }
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(
        f"{n_layers} layers, {policy.num_shared} shared ({policy.rate:.1%}), batch {args.batch} x {args.tokens} tokens on {args.device}:\n"
        f"  KV bytes ratio  (shared/plain): {result['kv_bytes_ratio']:.4f}  (expected {1 - policy.rate:.4f})\n"
        f"  prefill time ratio (shared/plain, median of {args.repeats}): {result['prefill_time_ratio']:.3f}\n"
        f"  written to {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
