"""The authors' search procedure vs ours, side by side in one run, on the same calibration file.

    python benchmarks/search_speed.py --model results/models/smollm2-135m

Calibrates (30 × 64 tokens, unless --calibration is given), runs the search at the given rate with
``--procedure official``, ``--procedure fast``, and fast started from the plain model's calibration run
(``calibration.states``: computed once per calibration file, its time reported apart), asserts they found the
same policy, and writes the speed-ups, the candidates evaluated and the time per candidate as JSON.
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
import time

from kvsharer.search.greedy import SearchSettings, plain_run, target_layers
from kvsharer.stages.search import run_journaled, sha256_file
from run_facts import run_facts  # benchmarks/ is the script's folder


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, and the calibration file or the N x T tokens to make one of (:func:`calibration`)."""
    parser.add_argument("--model", default="results/models/smollm2-135m")
    parser.add_argument("--calibration", type=Path, help="existing calibration file (default: make one)")
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=64)


def calibration(args) -> tuple[dict, str]:
    """(calibration tensors, sha256 of their file): ``args.calibration``, or made here (``args.samples`` x
    ``args.tokens`` tokens of the demo's text) in a temporary folder."""
    with tempfile.TemporaryDirectory() as tmp:
        cal = args.calibration or Path(tmp) / "calibration.safetensors"
        if args.calibration is None:
            cli(["calibrate", "--model", args.model, "--samples", str(args.samples), "--tokens", str(args.tokens),
                 "--out", str(cal)])
        return calibrate.load(cal), sha256_file(cal)


def main(argv=None) -> int:
    launched = time.time()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--rate", type=float, default=0.25)
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--out", default="results/benchmarks/search_speed.json")
    args = parser.parse_args(argv)

    stats, digest = calibration(args)
    model, _ = load_model(args.model)
    n_layers = stats["keys"].shape[0]
    target = target_layers(n_layers, rate=args.rate)
    began = time.perf_counter()
    start = plain_run(model, stats["input_ids"])  # once per calibration file (stage calibration-states)
    plain_run_seconds = time.perf_counter() - began
    runs = {}
    for arm in ("official", "fast", "started"):
        settings = SearchSettings(target=target, threshold=args.threshold, procedure="official" if arm == "official" else "fast")
        runs[arm] = run_journaled(model, stats, settings, calibration_hash=digest, start=start if arm == "started" else None)
        r = runs[arm]
        print(f"{arm:>8}: {r['seconds']:7.1f} s, {r['candidates_evaluated']} candidates, "
              f"{r['seconds_per_candidate']:.2f} s/candidate, map {r['map']}")
    official, fast, started = runs["official"], runs["fast"], runs["started"]
    if not fast["map"] == official["map"] == started["map"]:
        raise AssertionError(f"the procedures disagree: official {official['map']} vs fast {fast['map']} vs fast "
                             f"started from the plain run {started['map']}")
    if [t["similarity"] for t in started["trace"]] != [t["similarity"] for t in fast["trace"]]:
        raise AssertionError("the search started from the plain run measured other similarities")
    max_sim_diff = max(abs(a["similarity"] - b["similarity"]) for a, b in zip(official["trace"], fast["trace"]))
    speedup = official["seconds"] / fast["seconds"]
    started_ratio = started["seconds"] / fast["seconds"]
    result = {
        "benchmark": "search_speed", "model": args.model, "host": platform.node(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "n_layers": n_layers, "samples": int(stats["input_ids"].shape[0]),
        "tokens": int(stats["input_ids"].shape[1]), "rate": args.rate, "target": target,
        "threshold": args.threshold, "same_policy": True, "map": fast["map"], "complete": fast["complete"],
        "max_similarity_difference": max_sim_diff, "speedup": speedup,
        "started_over_fast": started_ratio, "plain_run_seconds": plain_run_seconds,
        **{f"{p}_{k}": runs[p][k] for p in runs for k in ("seconds", "candidates_evaluated", "seconds_per_candidate")},
        "accepted_pairs": [t["pair"] for t in fast["trace"] if t["accepted"]],
        "similarities": [t["similarity"] for t in fast["trace"]], **run_facts(launched, argv),
    }
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"same policy; similarities agree within {max_sim_diff:.1e}; speed-up official/fast = {speedup:.1f}x; "
          f"started from the plain run / fast = {started_ratio:.2f} (same similarities; the plain run, once per "
          f"calibration file: {plain_run_seconds:.1f} s) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
