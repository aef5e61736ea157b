"""The token methods' scoring attention, full-matrix (the old one) vs blockwise, side by side: time and peak memory.

    python benchmarks/scoring_attention.py --out results/benchmarks/scoring_attention.json
    python benchmarks/scoring_attention.py --smoke --out /tmp/scoring_attention.json   # toy size

One attention call of one layer of the demo model (SmolLM2-135M: 9 heads, 3 KV heads, head dim 64) over a
prefill of T tokens into a compressed (H2O, budget 1.0) cache, the path every token method takes: the
reference is the old implementation, which materialises the fp32 [B, H, T, T] probabilities
(tests/scoring_reference.py); the new one is ``kvsharer.methods.intra.attention.scoring_attention_forward``.
Both arms get the same random inputs (same seed). Each arm runs in a fresh process, so that its peak
memory (``kvsharer.measure.peakmem``: CUDA allocator peak or peak RSS, over what the inputs already hold) is its
own. Prints the ratios blockwise / reference and writes them, with the outputs' largest difference, to JSON.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from run_facts import run_facts  # benchmarks/ is the script's folder

REPO = Path(__file__).resolve().parents[1]
ARMS = ("reference", "blockwise")


def _inputs(batch: int, heads: int, kv_heads: int, dim: int, tokens: int, device: str, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads, tokens, dim, generator=g).to(device)  # [B, H, T, D]
    key = torch.randn(batch, kv_heads, tokens, dim, generator=g).to(device)  # [B, kvh, T, D]
    value = torch.randn(batch, kv_heads, tokens, dim, generator=g).to(device)
    return query, key, value


def _module(key, value):
    """An attention module whose compressed cache (H2O keeping everything) just stored this prefill."""
    from types import SimpleNamespace

    import torch

    from kvsharer.methods.intra import H2O, CompressedLayer

    layer = CompressedLayer(H2O(1.0), 0, [0], 0, 1)
    layer.update(key, value)
    module = torch.nn.Module()
    module.layer_idx, module.is_causal = 0, True
    module._kvsharer_intra = SimpleNamespace(current_cache=SimpleNamespace(layers=[layer]))
    return module, layer


def run_arm(arm: str, shape: dict, tokens: int, repeats: int, device: str, threads: int, out_path: str) -> dict:
    """In a fresh process: ``repeats`` calls of one arm; median seconds, the largest peak, outputs saved."""
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    from scoring_reference import reference_forward

    from kvsharer.methods.intra.attention import scoring_attention_forward
    from kvsharer.measure.peakmem import PeakMemory

    torch.set_num_threads(threads)
    forward = reference_forward if arm == "reference" else scoring_attention_forward
    with torch.inference_mode():  # warm-up at a toy size: one-time kernel and allocator set-up is not measured
        warm_q, warm_k, warm_v = _inputs(shape["batch"], shape["heads"], shape["kv_heads"], shape["head_dim"], 16, device)
        module, layer = _module(warm_k, warm_v)
        forward(module, warm_q, layer.keys, layer.values, None)
    query, key, value = _inputs(shape["batch"], shape["heads"], shape["kv_heads"], shape["head_dim"], tokens, device)
    seconds, peaks = [], []
    with torch.inference_mode():
        for _ in range(repeats):
            module, layer = _module(key, value)
            with PeakMemory(device) as peak:
                start = time.perf_counter()
                out, _ = forward(module, query, layer.keys, layer.values, None)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                seconds.append(time.perf_counter() - start)
            peaks.append(peak.extra)
    torch.save({"out": out.cpu(), "score": layer.state["score"].cpu()}, out_path)
    return {"seconds": statistics.median(seconds), "seconds_all": seconds, "peak_bytes": max(peaks),
            "peak_method": peak.method}


def main(argv=None) -> int:
    launched = time.time()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="4096,8192", help="comma-separated prefill lengths T")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per arm (default: torch's)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--smoke", action="store_true", help="toy size: T = 64, 100; 1 repeat")
    parser.add_argument("--out", default="results/benchmarks/scoring_attention.json")
    args = parser.parse_args(argv)

    import torch

    from kvsharer.atomic import atomic_write_text
    from kvsharer.methods.intra import blockwise

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    tokens = [64, 100] if args.smoke else [int(t) for t in args.tokens.split(",") if t.strip()]
    repeats = 1 if args.smoke else args.repeats
    threads = args.threads or torch.get_num_threads()
    shape = {"batch": args.batch, "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
             "tokens": tokens}
    context = multiprocessing.get_context("spawn")
    points = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in tokens:
            point = {"tokens": n}
            for arm in ARMS:  # one fresh process per arm: each peak is its own
                with context.Pool(1) as pool:
                    point[arm] = pool.apply(run_arm, (arm, shape, n, repeats, device, threads, f"{tmp}/{arm}.pt"))
            ref, new = (torch.load(f"{tmp}/{arm}.pt") for arm in ARMS)
            point["max_abs_diff"] = float((ref["out"] - new["out"]).abs().max())
            point["max_score_rel_diff"] = float(((ref["score"] - new["score"]).abs() / ref["score"].abs().clamp(min=1e-6)).max())
            point["time_ratio"] = point["blockwise"]["seconds"] / point["reference"]["seconds"]
            point["peak_ratio"] = point["blockwise"]["peak_bytes"] / max(point["reference"]["peak_bytes"], 1)
            points.append(point)

    result = {
        "benchmark": "scoring_attention", "device": device, "host": platform.node(), "torch": torch.__version__,
        "threads": threads, "repeats": repeats, "block_bytes": blockwise.BLOCK_BYTES, "shape": shape, "points": points,
        **run_facts(launched, argv),
    }
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    mib = 2**20
    print(f"scoring attention, batch {args.batch}, {args.heads} heads / {args.kv_heads} KV heads x {args.head_dim}, "
          f"on {device} ({threads} threads, median of {repeats}):")
    print(f"{'T':>6} | {'reference s':>11} {'blockwise s':>11} {'time ratio':>10} | "
          f"{'reference MiB':>13} {'blockwise MiB':>13} {'peak ratio':>10} | max |diff|")
    for p in points:
        ref, new = p["reference"], p["blockwise"]
        print(f"{p['tokens']:>6} | {ref['seconds']:>11.3f} {new['seconds']:>11.3f} {p['time_ratio']:>10.3f} | "
              f"{ref['peak_bytes'] / mib:>13.1f} {new['peak_bytes'] / mib:>13.1f} {p['peak_ratio']:>10.4f} | "
              f"{p['max_abs_diff']:.2e}")
    print(f"(ratio = blockwise / reference; peak: {points[0]['reference']['peak_method']}, over the inputs)\n"
          f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
