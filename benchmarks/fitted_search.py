"""What the fitted order's search costs next to the paper's (dissimilar) one, side by side in one run.

    python benchmarks/fitted_search.py --model results/models/smollm2-135m [--measured]

Both searches run on the same calibration file (30 × 64 tokens made here unless ``--calibration`` is given),
start from the same plain run of the model on it (``calibration.states``: computed once per calibration file,
its time reported apart), at every ``--rates`` entry, ``--repeats`` times, the arms alternating which goes first.
The fitted search's time includes everything it adds: un-rotating the keys, the least-squares fits of every
layer pair and their ranking, and the maps applied in every candidate. ``--measured`` adds the measured-kl
search at the demo's settings (2 sources, 4 re-measured, 4-sample screening) for reference.

Writes per rate the median seconds, candidates and forwards of each arm, and the ratio fitted / dissimilar
(``--out``, JSON). No quality here: the DAG's ``search_procedures`` table scores the policies on held-out text.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

from kvsharer.atomic import atomic_write_text
from kvsharer.models.loading import load_model
from kvsharer.search.greedy import SearchSettings, plain_run, target_layers
from kvsharer.stages.search import run_journaled
from run_facts import run_facts
from search_speed import add_model_arguments, calibration  # benchmarks/ is the script's folder

MEASURED = dict(sources=2, refresh=4, screen=4)  # config/config.yaml's search.measured


def main(argv=None) -> int:
    launched = time.time()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)  # --model, --calibration, --samples, --tokens
    parser.add_argument("--rates", default="0.25,0.375")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--measured", action="store_true", help="also the measured-kl search (minutes per rate)")
    parser.add_argument("--out", default="results/benchmarks/fitted_search.json")
    args = parser.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    if args.repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {args.repeats}")

    stats, digest = calibration(args)
    model, _ = load_model(args.model)
    n_layers = stats["keys"].shape[0]
    began = time.perf_counter()
    start = plain_run(model, stats["input_ids"])  # once per calibration file (stage calibration-states)
    plain_run_seconds = time.perf_counter() - began

    arms = ["dissimilar", "fitted"] + (["measured-kl"] if args.measured else [])
    per_rate = {}
    for rate in rates:
        target = target_layers(n_layers, rate=rate)
        runs: dict[str, list[dict]] = {arm: [] for arm in arms}
        for repeat in range(args.repeats):
            for arm in arms[repeat % len(arms):] + arms[: repeat % len(arms)]:  # a different arm first each round
                if arm == "measured-kl" and runs[arm]:
                    continue  # deterministic and minutes long: once
                extra = MEASURED if arm == "measured-kl" else {}
                settings = SearchSettings(target=target, threshold=args.threshold, order=arm, **extra)
                result = run_journaled(model, stats, settings, calibration_hash=digest, start=start, progress=False)
                runs[arm].append(result)
                print(f"rate {rate}: {arm:>11} {result['seconds']:6.1f} s, {result['candidates_evaluated']} candidates, "
                      f"map {result['map']}", flush=True)
        row = {}
        for arm, results in runs.items():
            if any(r["map"] != results[0]["map"] for r in results):
                raise AssertionError(f"{arm} found different policies in different repeats")
            row[arm] = {"seconds": statistics.median(r["seconds"] for r in results),
                        "seconds_all": [r["seconds"] for r in results],
                        "candidates": results[0]["candidates_evaluated"], "forwards": results[0]["forwards"],
                        "complete": results[0]["complete"], "map": results[0]["map"]}
        row["fitted_over_dissimilar"] = row["fitted"]["seconds"] / row["dissimilar"]["seconds"]
        if args.measured:
            row["measured_over_dissimilar"] = row["measured-kl"]["seconds"] / row["dissimilar"]["seconds"]
        per_rate[str(rate)] = row
        print(f"rate {rate}: fitted / dissimilar search time = {row['fitted_over_dissimilar']:.2f}", flush=True)

    result = {
        "benchmark": "fitted_search", "model": args.model, "host": platform.node(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "n_layers": n_layers, "samples": int(stats["input_ids"].shape[0]),
        "tokens": int(stats["input_ids"].shape[1]), "threshold": args.threshold, "repeats": args.repeats,
        "plain_run_seconds": plain_run_seconds, "rates": per_rate, **run_facts(launched, argv),
    }
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
