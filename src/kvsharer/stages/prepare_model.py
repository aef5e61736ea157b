"""Stage ``prepare-model``: write a model once as a safetensors folder that later stages load fast."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..models.loading import DEFAULT_MODEL, DTYPES, check_source, prepare_model

log = logging.getLogger("kvsharer")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", default=DEFAULT_MODEL, help=f"hub id, local folder or embedded:<name> (default {DEFAULT_MODEL})")
    parser.add_argument("--out", required=True, type=Path, help="output folder (written atomically)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))


def main(args: argparse.Namespace) -> int:
    check_source(args.source)
    out = prepare_model(args.source, args.out, dtype=args.dtype)
    log.info("model %s written to %s", args.source, out)
    return 0
