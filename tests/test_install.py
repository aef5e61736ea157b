"""The package installs as a library into a researcher's own environment: the wheel built from this checkout goes
into a fresh venv (no system site-packages, no editable install) with every lower bound of ``pyproject.toml``'s
dependencies, and ``share_kv`` runs on tiny random Llama, Qwen2 and Mistral models (``tests/install_check.py``).
The declared upper bound of transformers is checked too: pip refuses the first release past it next to the wheel,
and forced in, that release still breaks sharing (when it stops breaking, this test fails: lift the bound).
Needs PyPI (skipped with the reason when it is unreachable); a few minutes, most of it pip installing torch."""

import json
import re
import shutil
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TORCH = "2.13.0"  # as `make setup` installs it, first (an unpinned torch resolves a multi-GB CUDA build)

pytestmark = pytest.mark.install


def bounds() -> dict[str, tuple[str, str | None]]:
    """``{package: (lowest version, first excluded version or None)}`` of ``[project].dependencies``."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    out = {}
    for dep in deps:
        match = re.match(r"^\s*([A-Za-z0-9_.-]+)\s*>=\s*([^,;\s]+)\s*(?:,\s*<\s*([^,;\s]+))?\s*$", dep)
        assert match, f"dependency {dep!r} is not stated as name>=lowest[,<first excluded]"
        out[match[1]] = (match[2], match[3])
    return out


def pypi_reachable() -> str | None:
    """None when PyPI answers, else why not."""
    try:
        with urllib.request.urlopen("https://pypi.org/simple/transformers/", timeout=15) as response:
            return None if response.status == 200 else f"PyPI answered HTTP {response.status}"
    except OSError as err:
        return f"PyPI is unreachable ({err})"


def run(*command, cwd=None, timeout=900) -> str:
    done = subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, command))} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def build_wheel(tmp: Path) -> Path:
    """The wheel of this checkout, built from a copy of what it packages (the checkout stays untouched)."""
    source = tmp / "source"
    (source / "src").mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "src" / "kvsharer", source / "src" / "kvsharer",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    try:
        import setuptools  # noqa: F401

        isolation = ["--no-build-isolation"]  # this venv's setuptools: no download
    except ImportError:
        isolation = []
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "--quiet", "-w", tmp / "dist", source)
    (wheel,) = (tmp / "dist").glob("kvsharer_pipeline-*.whl")
    return wheel


def check(venv: Path) -> tuple[int, dict]:
    """``tests/install_check.py`` in the fresh venv, from a folder outside the checkout (so that ``kvsharer``
    can only come from the installed wheel): its exit status and what it found."""
    done = subprocess.run([str(venv / "bin" / "python"), str(REPO / "tests" / "install_check.py")], cwd=venv,
                          capture_output=True, text=True, timeout=900)
    lines = done.stdout.strip().splitlines()
    assert lines and lines[-1].startswith("{"), f"install_check.py found nothing:\n{done.stderr[-3000:]}"
    result = json.loads(lines[-1])
    assert Path(result["kvsharer"]).is_relative_to(venv), result["kvsharer"]
    return done.returncode, result


def test_wheel_installs_into_a_fresh_venv_at_the_lower_bounds_and_the_upper_bound_is_real(tmp_path):
    reason = pypi_reachable()
    if reason:
        pytest.skip(reason)
    declared = bounds()
    wheel = build_wheel(tmp_path)
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)  # no --system-site-packages: only what is installed below
    pip = [venv / "bin" / "python", "-m", "pip", "install", "--quiet"]
    run(*pip, f"torch=={TORCH}")
    lowest = tmp_path / "lowest.txt"
    lowest.write_text("".join(f"{name}=={low}\n" for name, (low, _) in declared.items()))
    run(*pip, "-c", lowest, wheel)
    run(venv / "bin" / "python", "-m", "pip", "check")
    rc, found = check(venv)
    assert rc == 0 and found["ok"], found
    assert found["transformers"] == declared["transformers"][0]

    excluded = declared["transformers"][1]
    if excluded is None:
        return
    refused = subprocess.run([*map(str, pip), "--dry-run", str(wheel), f"transformers=={excluded}"],
                             capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0 and "transformers" in refused.stderr, "pip accepted a transformers past the bound"
    run(*pip, "--no-deps", f"transformers=={excluded}")
    rc, found = check(venv)
    assert found["transformers"] == excluded
    assert rc != 0 and not found["ok"], (f"transformers {excluded} now passes the share_kv check: lift the upper bound "
                                         f"in pyproject.toml (and requirements/constraints.txt): {found}")
