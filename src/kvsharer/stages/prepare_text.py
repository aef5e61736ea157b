"""Stage ``prepare-text``: split a corpus into non-overlapping calibration and evaluation text."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..atomic import atomic_write_text
from ..data import check_text_source, load_corpus, split_corpus

log = logging.getLogger("kvsharer")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", default="embedded:pydoc", help="embedded:pydoc, a text file, or hf:<dataset>[:<config>][:<split>]")
    parser.add_argument("--eval-fraction", type=float, default=0.5, help="share of the corpus held out for evaluation")
    parser.add_argument("--calibration-out", required=True, type=Path)
    parser.add_argument("--evaluation-out", required=True, type=Path)


def main(args: argparse.Namespace) -> int:
    check_text_source(args.source)
    calibration, evaluation = split_corpus(load_corpus(args.source), args.eval_fraction)
    atomic_write_text(args.calibration_out, calibration)
    atomic_write_text(args.evaluation_out, evaluation)
    log.info(
        "text %s: %d chars calibration -> %s, %d chars evaluation -> %s",
        args.source, len(calibration), args.calibration_out, len(evaluation), args.evaluation_out,
    )
    return 0
