"""Stage ``figures``: report figures (PNG + PDF) from policy, evaluation, distance, scaling and profile files
(:mod:`kvsharer.report.figures`). Torch-free, like the whole report."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ..report.figures import DEFAULT_MAIN_RATE, build_figures  # first: it selects matplotlib's backend
import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402

from ..atomic import atomic_path  # noqa: E402
from ..names import FIGURES, SERVING_FIGURES  # noqa: E402
from ..report.collect import load_distances  # noqa: E402
from ..report.tables import read_profiles, read_serving  # noqa: E402
from .tables import add_common_arguments, add_output_arguments, read_results  # noqa: E402

log = logging.getLogger("kvsharer")

FORMATS = ("png", "pdf")


def save(fig, out_dir: Path, name: str) -> None:
    fig.tight_layout()
    for fmt in FORMATS:
        metadata = {"CreationDate": None} if fmt == "pdf" else {"Software": None}
        with atomic_path(out_dir / f"{name}.{fmt}") as tmp:
            # bbox "tight": a legend placed outside the axes (see _legend) stays in the file
            fig.savefig(tmp, format=fmt, dpi=150, metadata=metadata, bbox_inches="tight")
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--distances", nargs="*", default=[], type=Path, metavar="FILE",
                        help="distance JSON files (from `distances`)")
    parser.add_argument("--scaling", type=Path, help="search-scaling JSON (from `search-scaling`)")
    parser.add_argument("--main-rate", type=float, default=DEFAULT_MAIN_RATE,
                        help="the heatmap marks the main dissimilar policy with the largest rate <= this")
    add_output_arguments(parser, FIGURES, "figures", "<name>.png and <name>.pdf", SERVING_FIGURES)


def main(args: argparse.Namespace) -> int:
    collection = read_results(args)
    distances = load_distances(args.distances)
    sns.set_theme(style="whitegrid", context="paper")
    scaling = None
    if args.scaling is not None:
        try:
            scaling = json.loads(args.scaling.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read search-scaling file {args.scaling}: {err}") from None
    profile = read_profiles(args.profile)
    makers = build_figures(collection, distances, args.main_metric, args.main_threshold, args.rank_bin, args.main_rate,
                           scaling, profile, read_serving(args.serving))
    for name in args.only:
        fig = makers[name]()
        empty = ["no data" in t.get_text() for ax in fig.axes if ax.get_visible() for t in ax.texts]
        note = " (no data: drawn empty)" if empty and all(empty) else " (no data in some panels)" if any(empty) else ""
        save(fig, args.out_dir, name)
        log.info("figure %s%s -> %s", name, note,
                 ", ".join(str(args.out_dir / f"{name}.{fmt}") for fmt in FORMATS))
    return 0
