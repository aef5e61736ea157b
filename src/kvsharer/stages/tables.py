"""Stage ``tables``: paper-style tables (CSV + Markdown) from policy, evaluation and profile files
(:mod:`kvsharer.report.tables`). Torch-free, like the whole report."""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

import pandas as pd

from ..atomic import atomic_path, atomic_write_text
from ..names import SERVING_TABLES, TABLES
from ..report.collect import Collection, collect
from ..report.tables import (DEFAULT_METRIC, DEFAULT_RANK_BIN, DEFAULT_THRESHOLD, build_tables, markdown, read_profiles,
                             read_serving, warn_if_no_main)

log = logging.getLogger("kvsharer")


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policies", nargs="*", default=[], type=Path, metavar="FILE",
                        help="policy JSON files (from `search`)")
    parser.add_argument("--evals", nargs="*", default=[], type=Path, metavar="FILE",
                        help="evaluation JSON files (evaluate-ppl / -harness / -longctx)")
    parser.add_argument("--main-metric", default=DEFAULT_METRIC, help="distance metric of the main results")
    parser.add_argument("--main-threshold", type=float, default=DEFAULT_THRESHOLD, help="threshold T of the main results")
    parser.add_argument("--rank-bin", type=int, default=DEFAULT_RANK_BIN,
                        help="width of the dissimilarity-rank bins of the acceptance statistics")
    parser.add_argument("--profile", nargs="*", default=[], type=Path, metavar="FILE", help="profile CSVs (from `profile`)")
    parser.add_argument("--serving", nargs="*", default=[], type=Path, metavar="FILE",
                        help="serving JSON files (from `serving`, vLLM): the `serving` table and figure")


def add_output_arguments(parser: argparse.ArgumentParser, names: tuple[str, ...], what: str, files: str,
                         optional: tuple[str, ...] = ()) -> None:
    """``--out-dir`` (where ``files`` are written for every name) and ``--only`` (a subset of ``names``, or of the
    ``optional`` ones, written only when named)."""
    parser.add_argument("--out-dir", required=True, type=Path, help=f"writes {files} for {', '.join(names)}")
    parser.add_argument("--only", nargs="+", choices=names + optional, default=list(names), metavar="NAME",
                        help=f"write only these {what} (default: all but {', '.join(optional) or 'none'}; the DAG "
                             f"runs one job per {what[:-1]})")


def read_results(args: argparse.Namespace) -> Collection:
    """The policies and evaluations of the common arguments (checked first), warning when none is the main one."""
    if args.rank_bin < 1:
        raise ValueError(f"--rank-bin must be at least 1, got {args.rank_bin}")
    if not math.isfinite(args.main_threshold):
        raise ValueError(f"--main-threshold must be a number, got {args.main_threshold}")
    collection = collect(args.policies, args.evals)
    warn_if_no_main(collection, args.main_metric, args.main_threshold)
    return collection


def write_table(frame: pd.DataFrame, out_dir: Path, name: str) -> list[Path]:
    csv, md = out_dir / f"{name}.csv", out_dir / f"{name}.md"
    with atomic_path(csv) as tmp:
        frame.to_csv(tmp, index=False)
    atomic_write_text(md, markdown(frame))
    return [csv, md]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    add_output_arguments(parser, TABLES, "tables", "<name>.csv and <name>.md", SERVING_TABLES)


def main(args: argparse.Namespace) -> int:
    collection = read_results(args)
    tables = build_tables(collection, args.main_metric, args.main_threshold, args.rank_bin, read_profiles(args.profile),
                          read_serving(args.serving))
    for name in args.only:
        frame = tables[name]()
        write_table(frame, args.out_dir, name)
        log.info("table %s: %s -> %s", name, f"{len(frame)} rows" if len(frame) else "no inputs, header only",
                 args.out_dir / f"{name}.csv")
    return 0
