"""Stage ``docs``: the pages generated from the project's own files (:mod:`kvsharer.report.docs`).

* ``docs config``: ``docs/configuration.md`` from ``workflow/schemas/config.schema.yaml``;
* ``docs results --results DIR``: ``docs/results.md`` from a results folder (or a snapshot of one), the README's
  small table between its ``<!-- results-table:start/end -->`` markers and its sentence on the run's time between
  ``<!-- demo-time:start/end -->``;
* ``docs benchmarks``: ``docs/benchmarks.md`` from the benchmarks' JSON outputs kept in ``docs/benchmarks-snapshot/``;
* ``docs snapshot --results results --out DIR``: copy a finished run's ``tables/*.md`` and
  ``<model>/run_meta.json`` (a few KB) to ``DIR`` with ``snapshot.json`` (the command that made the run, when
  its files were written), for ``docs results`` to read in a checkout without the run; and its headline figure
  to ``docs/ppl_vs_rate.png``.

``--check`` writes nothing and exits 1 when a page differs from what would be written (CI, tests).
Torch-free, like the whole report.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

from ..atomic import atomic_write_text
from ..names import HEADLINE
from ..report.benchmark_docs import SNAPSHOT as BENCHMARKS_SNAPSHOT
from ..report.benchmark_docs import benchmarks_page
from ..report.docs import (SNAPSHOT, TIME_MARKERS, config_reference, demo_time, headline_table, replace_between_markers,
                           results_page, run_record)

log = logging.getLogger("kvsharer")

SCHEMA = Path("workflow/schemas/config.schema.yaml")
SNAPSHOT_DIR = Path("docs/results-snapshot")
HEADLINE_FIGURE = Path(f"docs/{HEADLINE}.png")  # the README's and results.md's figure, from the snapshot's run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", choices=("config", "results", "snapshot", "benchmarks"),
                        help="config: docs/configuration.md; results: docs/results.md and the README's table; "
                             "snapshot: copy a run's tables and provenance for `results`; benchmarks: "
                             f"docs/benchmarks.md from the benchmarks' JSON in {BENCHMARKS_SNAPSHOT}")
    parser.add_argument("--schema", type=Path, default=SCHEMA, help=f"config schema (default {SCHEMA})")
    parser.add_argument("--results", type=Path, default=SNAPSHOT_DIR,
                        help=f"results folder or snapshot to read (default {SNAPSHOT_DIR})")
    parser.add_argument("--readme", default="README.md",
                        help="README whose results table (between its markers) `results` rewrites ('': none)")
    parser.add_argument("--out", type=Path, default=None,
                        help="the page (default docs/configuration.md, docs/results.md) or the snapshot folder")
    parser.add_argument("--command", dest="run_command", default=None,
                        help="snapshot: the command that made the run, as recorded (e.g. 'make demo')")
    parser.add_argument("--note", default=None,
                        help="snapshot: what else a reader should know about the run (e.g. the machine was shared)")
    parser.add_argument("--figure-out", type=Path, default=HEADLINE_FIGURE,
                        help=f"snapshot: where the run's figures/{HEADLINE_FIGURE.name} is copied (default {HEADLINE_FIGURE}; "
                             "'' : not copied)")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 when a generated page differs from the file")


def _write(path: Path, text: str, check: bool) -> bool:
    """True when ``path`` already holds ``text``; otherwise write it (or, with ``check``, say it differs)."""
    current = path.read_text() if path.exists() else None
    if current == text:
        log.info("%s is up to date", path)
        return True
    if check:
        log.error("%s differs from what `python -m kvsharer docs` generates: regenerate it", path)
        return False
    atomic_write_text(path, text)
    log.info("wrote %s", path)
    return True


def snapshot(results: Path, out: Path, command: str | None, note: str | None = None) -> list[Path]:
    record = run_record(results, command)  # refuses a folder without a finished run
    if note:
        record["note"] = note
    if out.exists():
        shutil.rmtree(out)
    written = []
    for source in sorted((results / "tables").glob("*.md")) + sorted(results.glob("*/run_meta.json")):
        target = out / source.relative_to(results)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        written.append(target)
    atomic_write_text(out / SNAPSHOT, json.dumps(record, indent=2) + "\n")
    return [*written, out / SNAPSHOT]


def main(args: argparse.Namespace) -> int:
    if args.what == "config":
        import yaml  # the pipeline's dependency (Snakemake's), not the library's

        try:
            schema = yaml.safe_load(args.schema.read_text())
        except OSError as err:
            raise FileNotFoundError(f"cannot read the config schema {args.schema}: {err}") from None
        page = config_reference(schema, args.schema.as_posix())
        return 0 if _write(args.out or Path("docs/configuration.md"), page, args.check) else 1
    if args.what == "benchmarks":
        folder = args.results if args.results != SNAPSHOT_DIR else BENCHMARKS_SNAPSHOT
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} does not exist: the benchmarks' JSON snapshot")
        return 0 if _write(args.out or Path("docs/benchmarks.md"), benchmarks_page(folder), args.check) else 1
    if args.what == "snapshot":
        if args.out is None:
            raise ValueError("docs snapshot needs --out (e.g. docs/results-snapshot)")
        if args.check:
            raise ValueError("docs snapshot has no --check")
        files = snapshot(args.results, args.out, args.run_command, args.note)
        log.info("snapshot of %s: %d files, %d bytes -> %s", args.results, len(files),
                 sum(p.stat().st_size for p in files), args.out)
        figure = args.results / "figures" / HEADLINE_FIGURE.name
        if str(args.figure_out) not in ("", ".") and figure.exists():
            shutil.copyfile(figure, args.figure_out)
            log.info("figure %s -> %s", figure, args.figure_out)
        return 0
    if not (args.results / "tables").is_dir():
        raise FileNotFoundError(f"{args.results}/tables does not exist: run `make demo` first, or read the "
                                f"committed snapshot ({SNAPSHOT_DIR})")
    ok = _write(args.out or Path("docs/results.md"), results_page(args.results, args.results.as_posix()), args.check)
    if args.readme:
        readme = Path(args.readme)
        text = replace_between_markers(readme.read_text(), headline_table(args.results))
        text = replace_between_markers(text, demo_time(args.results), TIME_MARKERS)
        ok = _write(readme, text, args.check) and ok
    return 0 if ok else 1
