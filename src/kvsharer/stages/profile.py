"""Stage ``profile``: KV bytes, peak memory, prefill and decode speed vs sharing rate and cache methods
(:mod:`kvsharer.measure.profile`), one CSV row per grid point."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..atomic import atomic_write_text
from ..measure.profile import parse_methods, profile, to_csv
from ..models.loading import DTYPES, check_source, load_model, resolve_device, text_config

log = logging.getLogger("kvsharer")


def _numbers(text: str, kind=float) -> list:
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"expected a comma-separated list of numbers, got {text!r}") from None
    if not values:
        raise ValueError("empty list")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model folder, hub id or embedded:<name>")
    parser.add_argument("--name", help="model name in the CSV (default: the folder name)")
    parser.add_argument("--rates", default="0,0.125,0.25,0.375,0.5")
    parser.add_argument("--cache", default="none,h2o:0.5",
                        help="cache methods, comma-separated: none, h2o:0.5, pyramidinfer:0.5, int4, minicache:0.25 ...")
    parser.add_argument("--batch-sizes", default="1,4")
    parser.add_argument("--contexts", default="512", help="comma-separated prompt lengths")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--memory-gb", type=float, default=None, help="memory budget for the max-batch rows")
    parser.add_argument("--max-measured-batch", type=int, default=16)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", required=True, type=Path, help="CSV")


def main(args: argparse.Namespace) -> int:
    rates = _numbers(args.rates)
    if any(not 0 <= r < 1 for r in rates):
        raise ValueError(f"--rates must be in [0, 1), got {args.rates}")
    methods = parse_methods(args.cache)
    batches, contexts = _numbers(args.batch_sizes, int), _numbers(args.contexts, int)
    if min(batches) < 1 or min(contexts) < 2 or args.new_tokens < 0 or args.repeats < 1:
        raise ValueError("batch sizes >= 1, contexts >= 2, --new-tokens >= 0 and --repeats >= 1 are required")
    check_source(args.model)
    model, _ = load_model(args.model, dtype=args.dtype, device=resolve_device(args.device))
    window = getattr(text_config(model), "max_position_embeddings", None)
    if window and max(contexts) + args.new_tokens > window:
        raise ValueError(f"context {max(contexts)} + {args.new_tokens} new tokens exceeds the model's window of {window}")
    name = args.name or Path(args.model).name
    rows = profile(model, name, rates, methods, batches, contexts, args.new_tokens, args.repeats, args.memory_gb,
                   args.max_measured_batch)
    atomic_write_text(args.out, to_csv(rows))
    log.info("%d profile rows -> %s", len(rows), args.out)
    return 0
