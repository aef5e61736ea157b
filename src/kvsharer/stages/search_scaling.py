"""Stage ``search-scaling``: the search's cost measured on random models vs depth and width, fitted, and
projected to 7B-400B models (:mod:`kvsharer.measure.scaling`), as one JSON file."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ..atomic import atomic_write_text
from ..measure.scaling import GPU_ASSUMED_FLOPS, GPU_MEMORY_BYTES, candidate_factors, fit, measure, project

log = logging.getLogger("kvsharer")


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"expected a comma-separated list of integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"expected positive integers, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", default="8,16,32", help="depths to measure")
    parser.add_argument("--hidden", default="256,512", help="widths to measure (heads of 64)")
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rate", type=float, default=0.25)
    parser.add_argument("--policies", nargs="*", default=[], help="real search results (for candidate counts)")
    parser.add_argument("--out", required=True, type=Path, help="JSON with measurements, fit and projections")


def main(args: argparse.Namespace) -> int:
    layers, hiddens = _ints(args.layers), _ints(args.hidden)
    if not 0 < args.rate < 1:
        raise ValueError(f"--rate must be in (0, 1), got {args.rate}")
    if min(layers) < 4:
        raise ValueError("measure at least 4 layers deep")
    policies = [json.loads(Path(p).read_text()) for p in args.policies]
    rows = measure(layers, hiddens, args.samples, args.tokens, args.rate)
    fitted = fit(rows)
    factors = candidate_factors(policies)
    projection = project(fitted, factors, args.samples, args.tokens, args.rate)
    result = {"measurements": rows, "fit": fitted, "factors": factors, "projection": projection,
              "assumptions": {"gpu_flops": GPU_ASSUMED_FLOPS, "gpu_memory_bytes": GPU_MEMORY_BYTES,
                              "dtype_bytes_projected": 2, "samples": args.samples, "tokens": args.tokens,
                              "rate": args.rate}}
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    for p in projection:
        log.info("%s: ~%.0f candidates, %.2e FLOP each: %.1f s on one H100 (assumed %.0f TFLOP/s), "
                 "%.1f s if every pair is tried; %d GPU(s) of memory", p["model"], p["candidates_expected"],
                 p["flops_per_candidate"], p["gpu_seconds_expected"], GPU_ASSUMED_FLOPS / 1e12,
                 p["gpu_seconds_worst"], p["gpus_needed"])
    log.info("fit: %.2f GFLOP/s achieved here, %.3f s fixed per candidate, R^2 %.3f -> %s",
             fitted["throughput_flops"] / 1e9, fitted["fixed_seconds_per_candidate"], fitted["r2"], args.out)
    return 0
