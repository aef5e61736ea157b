"""Stage ``rehearsal-config``: a rehearsal of a paper config (:mod:`kvsharer.rehearsal`) written as YAML."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..models.standins import HEAD_DIM
from ..rehearsal import CUTS, REHEARSAL_DTYPE, rehearsal_config

log = logging.getLogger("kvsharer")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--paper", type=Path, default=Path("config/paper.yaml"), help="the config to rehearse")
    parser.add_argument("--cut", default="local", choices=sorted(CUTS), help="grid cut for CPU time (default local)")
    parser.add_argument("--gpus", type=int, default=0,
                        help="GPUs per model job (default 0: CPU jobs, two at a time on the 2-CPU test node)")
    parser.add_argument("--head-dim", type=int, default=HEAD_DIM,
                        help=f"width of each stand-in head (default {HEAD_DIM}; 128: the real models' width, for a GPU)")
    parser.add_argument("--dtype", default=REHEARSAL_DTYPE, choices=["float32", "float16", "bfloat16"],
                        help=f"dtype of every model (default {REHEARSAL_DTYPE}: CPU)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads per model job (default 1: the 2-CPU test node; more on a GPU machine)")
    parser.add_argument("--models", default="", help="comma-separated model names to keep (default: the cut's)")
    parser.add_argument("--out", type=Path, required=True, help="rehearsal config (YAML)")


def main(args: argparse.Namespace) -> int:
    import yaml

    from ..atomic import atomic_write_text

    paper = yaml.safe_load(args.paper.read_text())
    models = [m for m in args.models.split(",") if m]
    config = rehearsal_config(paper, args.cut, args.gpus, head_dim=args.head_dim, dtype=args.dtype, models=models,
                               threads=args.threads)
    header = (f"# rehearsal of {args.paper} (python -m kvsharer rehearsal-config --cut {args.cut}): stand-in models "
              "and tasks, CPU overrides and the cut of kvsharer.rehearsal.CUTS; everything else is the paper's\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, header + yaml.safe_dump(config, sort_keys=False))
    log.info("rehearsal config (%s cut, %d models) -> %s", args.cut, len(config["models"]), args.out)
    return 0
