"""When, from which commit, by which command and on what machine a benchmark ran: the facts every benchmark's JSON
holds beside its numbers (``docs/benchmarks.md`` shows them, ``python -m kvsharer docs benchmarks``).

    launched = time.time()                          # first thing in main()
    result = {..., **run_facts(launched, argv)}     # what the JSON holds

Standard library and :mod:`kvsharer.provenance` (which imports torch only to name the GPU, once the measuring is done).
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _relative(path: str) -> str:
    """``path`` relative to the checkout when it lies inside it (``.venv/bin/python``), else as given."""
    absolute = Path(os.path.abspath(path))  # not resolve(): a venv's python is a link out of the checkout
    return str(absolute.relative_to(REPO)) if absolute.is_relative_to(REPO) else path


def run_facts(launched: float, argv: list[str] | None = None) -> dict:
    """``started`` (UTC) and ``wall_s`` from ``launched`` (``time.time()``) to now, ``commit`` (the checkout's,
    ``+dirty`` with uncommitted changes to tracked files), ``command`` (interpreter, script and ``argv``: the
    script's arguments, ``sys.argv[1:]`` when None) and ``machine`` (host, CPUs, platform, the
    first CUDA GPU or None, the load average over 1, 5 and 15 minutes at the end: above the benchmark's own
    threads, something else ran beside it)."""
    from kvsharer.provenance import code_commit, gpu_name

    wall = time.time() - launched
    if not 0 <= wall < 7 * 86400:
        raise ValueError(f"run_facts needs time.time() at the start of the run, got {launched} ({wall:.0f} s ago)")
    arguments = sys.argv[1:] if argv is None else list(argv)
    return {
        "started": datetime.fromtimestamp(launched, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "wall_s": round(wall, 1),
        "commit": code_commit(),
        "command": shlex.join([_relative(sys.executable), _relative(sys.argv[0]), *arguments]),
        "machine": {"host": platform.node(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "gpu": gpu_name(), "load_average": [round(x, 2) for x in os.getloadavg()]},
    }
