"""The dependency direction, enforced: import-linter's contracts in pyproject.toml ([tool.importlinter]) are
checked on every test run, so a module that starts importing what it must not fails here; each kind of
contract is also shown to fail on a copy of the package that breaks it (docs/architecture.md draws them)."""

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
    assert "Contracts: 6 kept, 0 broken." in proc.stdout


def broken_copy(tmp_path: Path, module: str, old: str, new: str) -> subprocess.CompletedProcess:
    """Lint a copy of the package in which ``module``'s first ``old`` became ``new``."""
    shutil.copytree(REPO / "src" / "kvsharer", tmp_path / "src" / "kvsharer",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    path = tmp_path / "src" / Path(*module.split(".")).with_suffix(".py")
    text = path.read_text()
    assert old in text, (module, old)
    path.write_text(text.replace(old, new, 1))
    return lint(tmp_path, tmp_path / "src")


def test_a_report_module_importing_torch_is_caught(tmp_path):
    """The contracts can fail: a copy of the package whose report imports torch breaks the first one."""
    proc = broken_copy(tmp_path, "kvsharer.report.collect", "import pandas as pd", "import pandas as pd\nimport torch")
    assert proc.returncode != 0 and "kvsharer.report.collect -> torch" in proc.stdout, proc.stdout[-3000:]


def test_a_report_stage_importing_torch_is_caught(tmp_path):
    proc = broken_copy(tmp_path, "kvsharer.stages.tables", "import pandas as pd", "import pandas as pd\nimport torch")
    assert proc.returncode != 0 and "kvsharer.stages.tables -> torch" in proc.stdout, proc.stdout[-3000:]


@pytest.mark.parametrize("module, line", [
    ("kvsharer.search.distance", "import argparse"),
    ("kvsharer.evaluate.ppl", "from ..stages import common"),
])
def test_a_core_module_parsing_arguments_or_importing_a_stage_is_caught(tmp_path, module, line):
    """Parsing arguments is the stages' job: a core module importing argparse or a stage breaks the core's
    contract (and, for a stage, the layers)."""
    proc = broken_copy(tmp_path, module, "from __future__ import annotations\n",
                       f"from __future__ import annotations\n\n{line}\n")
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert "the core never imports a stage nor argparse" in proc.stdout and f"{module} ->" in proc.stdout, \
        proc.stdout[-3000:]


@pytest.mark.parametrize("module, line, caught", [
    ("kvsharer.models.shapes", "from ..cache import policy", "kvsharer.models.shapes -> kvsharer.cache.policy"),
    ("kvsharer.cache.hooks", "from ..methods import quant", "kvsharer.cache.hooks -> kvsharer.methods.quant"),
    ("kvsharer.search.measured", "from ..measure import peakmem", "kvsharer.search.measured -> kvsharer.measure.peakmem"),
    ("kvsharer.stages.distances", "from .. import cli", "kvsharer.stages.distances -> kvsharer.cli"),
])
def test_an_import_upwards_breaks_the_layers(tmp_path, module, line, caught):
    """Each layer imports only what is below it: a model importing the cache, the cache a method, the search a
    measurement or a stage the CLI is caught."""
    proc = broken_copy(tmp_path, module, "from __future__ import annotations\n",
                       f"from __future__ import annotations\n\n{line}\n")
    assert proc.returncode != 0 and "layers: the CLI over the stages" in proc.stdout, proc.stdout[-3000:]
    assert caught in proc.stdout, proc.stdout[-3000:]
