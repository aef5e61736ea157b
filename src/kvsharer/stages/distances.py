"""Stage ``distances``: the pairwise layer distance matrix of a calibration file's KV caches, and the
dissimilar ranking of the layer pairs, as one JSON file."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ..atomic import atomic_write_text
from ..search import calibrate
from ..search.distance import METRICS, check_metric, layer_distances, rank_pairs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calibration", required=True, type=Path, help="calibration .safetensors")
    parser.add_argument("--metric", default="euclidean", help=f"one of {', '.join(METRICS)}")
    parser.add_argument("--out", required=True, type=Path, help="JSON with the [L, L] matrix and the dissimilar ranking")


def main(args: argparse.Namespace) -> int:
    check_metric(args.metric)
    meta = calibrate.read_meta(args.calibration)
    stats = calibrate.load(args.calibration)
    dist = layer_distances(stats["keys"], stats["values"], args.metric)
    result = {
        "metric": args.metric,
        "calibration": str(args.calibration),
        "model": meta["model"],
        "n_layers": dist.shape[0],
        "matrix": dist.tolist(),
        "ranking_dissimilar": [[i, j, d] for i, j, d in rank_pairs(dist, "dissimilar")],
    }
    atomic_write_text(args.out, json.dumps(result) + "\n")
    logging.getLogger("kvsharer").info("%s distances of %d layers written to %s", args.metric, dist.shape[0], args.out)
    return 0
