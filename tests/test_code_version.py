"""One job per table and per figure: a table's or figure's code version (kvsharer.report.code_version) changes
when its own code, or code it reaches, changes, and only then, so the DAG reruns exactly those jobs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kvsharer.names import FIGURES, TABLES
from kvsharer.report.code_version import code_version

SRC = Path(__file__).resolve().parents[1] / "src" / "kvsharer"


def versions(root: Path) -> dict[tuple[str, str], str]:
    return {**{("table", t): code_version("table", t, root) for t in TABLES},
            **{("figure", f): code_version("figure", f, root) for f in FIGURES}}


@pytest.fixture
def copy(tmp_path):
    """A copy of the package to edit; versions of the copy equal the original's."""
    shutil.copytree(SRC, tmp_path / "kvsharer", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path / "kvsharer" / "report"


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new))


def changed(before: dict, after: dict) -> set:
    return {key for key in before if before[key] != after[key]}


def test_every_table_and_figure_has_a_distinct_version(copy):
    base = versions(copy)
    assert base == versions(SRC / "report")
    assert len(set(base.values())) == len(base)


def test_a_figures_own_code_changes_its_version_only(copy):
    base = versions(copy)
    edit(copy / "figures.py", "def fig_passkey(", "def fig_passkey_old():\n    pass\n\n\ndef fig_passkey(")
    assert changed(base, versions(copy)) == set()  # a function nobody calls
    edit(copy / "figures.py", "def fig_passkey(cells: pd.DataFrame,", "def fig_passkey(cells: \"pd.DataFrame\",")
    assert changed(base, versions(copy)) == {("figure", "passkey")}


def test_comments_and_blank_lines_do_not_count(copy):
    base = versions(copy)
    edit(copy / "tables.py", "def table1(", "# a comment\n\n\ndef table1(")
    assert changed(base, versions(copy)) == set()


def test_a_table_used_by_a_figure_changes_both(copy):
    base = versions(copy)
    edit(copy / "tables.py", "def table2_compose(settings: pd.DataFrame,", 'def table2_compose(settings: "pd.DataFrame",')
    after = versions(copy)
    assert {("table", "table2_compose"), ("figure", "compose")} <= changed(base, after)
    assert ("table", "table1") not in changed(base, after) and ("figure", "passkey") not in changed(base, after)


def test_shared_reading_code_changes_everything_that_reads_it(copy):
    base = versions(copy)
    edit(copy / "collect.py", "def read_json(path: str | os.PathLike, what: str) -> dict:",
         'def read_json(path: str | os.PathLike, what: str) -> "dict":')
    assert changed(base, versions(copy)) == set(base)  # every stage reads its inputs through read_json
