"""The authors' search procedure vs ours, side by side in one run, on the same calibration file.

    python benchmarks/search_speed.py --model results/models/smollm2-135m

Calibrates (30 × 64 tokens, unless --calibration is given), runs the search at the given rate with
``--procedure official`` and ``--procedure fast``, asserts they found the same policy, and writes
the speed-up, the candidates evaluated and the time per candidate as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

from kvsharer.search import calibrate
from kvsharer.atomic import atomic_write_text
from kvsharer.cli import main as cli
from kvsharer.models.loading import load_model
from kvsharer.search.greedy import SearchSettings, target_layers
from kvsharer.stages.search import run_journaled, sha256_file


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="results/models/smollm2-135m")
    parser.add_argument("--calibration", type=Path, help="existing calibration file (default: make one)")
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rate", type=float, default=0.25)
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--out", default="results/benchmarks/search_speed.json")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        cal = args.calibration or Path(tmp) / "calibration.safetensors"
        if args.calibration is None:
            cli(["calibrate", "--model", args.model, "--samples", str(args.samples), "--tokens", str(args.tokens),
                 "--out", str(cal)])
        stats = calibrate.load(cal)
        digest = sha256_file(cal)
    model, _ = load_model(args.model)
    n_layers = stats["keys"].shape[0]
    target = target_layers(n_layers, rate=args.rate)
    runs = {}
    for procedure in ("official", "fast"):
        settings = SearchSettings(target=target, threshold=args.threshold, procedure=procedure)
        runs[procedure] = run_journaled(model, stats, settings, calibration_hash=digest)
        r = runs[procedure]
        print(f"{procedure:>8}: {r['seconds']:7.1f} s, {r['candidates_evaluated']} candidates, "
              f"{r['seconds_per_candidate']:.2f} s/candidate, map {r['map']}")
    official, fast = runs["official"], runs["fast"]
    if fast["map"] != official["map"]:
        raise AssertionError(f"the procedures disagree: official {official['map']} vs fast {fast['map']}")
    max_sim_diff = max(abs(a["similarity"] - b["similarity"]) for a, b in zip(official["trace"], fast["trace"]))
    speedup = official["seconds"] / fast["seconds"]
    result = {
        "benchmark": "search_speed", "model": args.model, "host": platform.node(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "n_layers": n_layers, "samples": int(stats["input_ids"].shape[0]),
        "tokens": int(stats["input_ids"].shape[1]), "rate": args.rate, "target": target,
        "threshold": args.threshold, "same_policy": True, "map": fast["map"], "complete": fast["complete"],
        "max_similarity_difference": max_sim_diff, "speedup": speedup,
        **{f"{p}_{k}": runs[p][k] for p in runs for k in ("seconds", "candidates_evaluated", "seconds_per_candidate")},
        "accepted_pairs": [t["pair"] for t in fast["trace"] if t["accepted"]],
        "similarities": [t["similarity"] for t in fast["trace"]],
    }
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"same policy; similarities agree within {max_sim_diff:.1e}; speed-up official/fast = {speedup:.1f}x "
          f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
