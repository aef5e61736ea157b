"""The dependency direction, enforced: import-linter's contracts in pyproject.toml ([tool.importlinter]) are
checked on every test run, so a module that starts importing what it must not fails here."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(cwd: Path, src: Path) -> subprocess.CompletedProcess:
    if not LINT.exists():
        pytest.fail(f"{LINT} is missing: install the test extra (pip install -e '.[test]')")
    return subprocess.run([str(LINT), "--no-cache"], cwd=cwd, capture_output=True, text=True,
                          env={"PYTHONPATH": str(src), "PATH": str(LINT.parent)})


def test_import_contracts_hold():
    proc = lint(REPO, REPO / "src")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "Contracts: 4 kept, 0 broken." in proc.stdout


def test_a_report_module_importing_torch_is_caught(tmp_path):
    """The contracts can fail: a copy of the package whose report imports torch breaks the first one."""
    shutil.copytree(REPO / "src" / "kvsharer", tmp_path / "src" / "kvsharer",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    collect = tmp_path / "src" / "kvsharer" / "report" / "collect.py"
    collect.write_text(collect.read_text().replace("import pandas as pd", "import pandas as pd\nimport torch", 1))
    proc = lint(tmp_path, tmp_path / "src")
    assert proc.returncode != 0 and "kvsharer.report.collect -> torch" in proc.stdout, proc.stdout[-3000:]
