"""The generated documentation cannot drift: docs/configuration.md is what the config schema gives, docs/results.md
and the README's table are what the committed results snapshot gives (`python -m kvsharer docs ...`), every
relative link of the README and the docs resolves, and the README stays a three-minute read."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kvsharer.report.docs import (README_MARKERS, SchemaError, config_reference, parse_markdown_table,
                                  replace_between_markers, results_page)

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
SNAPSHOT = Path("docs/results-snapshot")  # relative: the page names the folder it was generated from
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# linked from the README, written by a change that has not landed in every checkout yet
PENDING = {REPO / "docs" / "serving.md"}


def docs(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvsharer", "docs", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def schema_keys(node: dict, path: str = "") -> list[str]:
    keys = []
    for key, child in node.get("properties", {}).items():
        keys += [f"{path}{key}", *schema_keys(child, f"{path}{key}.")]
    extra = node.get("additionalProperties")
    if isinstance(extra, dict) and extra.get("properties"):  # a mapping of objects (models: name -> settings)
        keys += [f"{path}<name>", *schema_keys(extra, f"{path}<name>.")]
    return keys


def test_configuration_page_is_what_the_schema_gives():
    done = docs("config", "--check")
    assert done.returncode == 0, f"docs/configuration.md is stale: run `python -m kvsharer docs config`\n{done.stderr}"


def test_every_schema_key_has_a_row_with_its_default():
    schema = yaml.safe_load(SCHEMA.read_text())
    page = config_reference(schema)
    keys = schema_keys(schema)
    assert "models.<name>.source" in keys and "evaluation.longctx.answer_tokens" in keys
    for key in keys:  # a top-level key is a section, every key below it a row
        assert (f"## `{key}`" if "." not in key else f"| `{key}`") in page, f"{key} is not in the page"
    row = next(line for line in page.splitlines() if line.startswith("| `search.threshold`"))
    assert "`0.5`" in row and "number in (-1, 1]" in row


def test_a_key_without_a_description_is_refused():
    schema = yaml.safe_load(SCHEMA.read_text())
    schema["properties"]["search"]["properties"]["new_knob"] = {"type": "integer", "default": 3}
    with pytest.raises(SchemaError, match="search.new_knob"):
        config_reference(schema)


def test_check_fails_on_a_stale_page_and_a_run_rewrites_it(tmp_path):
    page = tmp_path / "configuration.md"
    page.write_text((REPO / "docs" / "configuration.md").read_text().replace("`0.5`", "`0.6`", 1))
    assert docs("config", "--out", str(page), "--check").returncode == 1
    assert docs("config", "--out", str(page)).returncode == 0
    assert page.read_text() == (REPO / "docs" / "configuration.md").read_text()


def test_results_page_and_readme_table_are_what_the_snapshot_gives():
    done = docs("results", "--results", str(SNAPSHOT), "--check")
    assert done.returncode == 0, (f"docs/results.md or the README's table is stale: run `python -m kvsharer docs results "
                                  f"--results {SNAPSHOT}`\n{done.stderr}")


def test_results_page_states_the_run_and_holds_every_snapshot_table():
    page = results_page(REPO / SNAPSHOT, SNAPSHOT.as_posix())
    (meta_path,) = (REPO / SNAPSHOT).glob("*/run_meta.json")
    meta = json.loads(meta_path.read_text())
    record = json.loads((REPO / SNAPSHOT / "snapshot.json").read_text())
    assert f"`{meta['commit']}`" in page and meta["config_sha256"] in page
    assert record["started"] in page and record["tables_written"] in page
    for table in sorted((REPO / SNAPSHOT / "tables").glob("*.md")):
        headers, rows = parse_markdown_table(table.read_text())
        assert f"## `{table.stem}`" in page
        if rows:
            assert table.read_text().rstrip("\n") in page  # the table itself, digit for digit


def test_snapshot_is_small_and_holds_only_tables_and_provenance():
    files = [p for p in (REPO / SNAPSHOT).rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 64_000
    assert all(p.suffix == ".md" and p.parent.name == "tables" or p.name in ("run_meta.json", "snapshot.json")
               for p in files), files


def test_snapshot_command_copies_a_results_folder(tmp_path):
    results = tmp_path / "results"
    for path in (REPO / SNAPSHOT).rglob("*"):
        if path.is_file() and path.name != "snapshot.json":
            target = results / path.relative_to(REPO / SNAPSHOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    out = tmp_path / "snap"
    assert docs("snapshot", "--results", str(results), "--out", str(out), "--command", "make demo",
                "--figure-out", "").returncode == 0
    record = json.loads((out / "snapshot.json").read_text())
    assert record["command"] == "make demo" and re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", record["started"])
    assert record["tables"] == len(list(results.glob("tables/*.md"))) and record["figures"] == 0
    assert sorted(p.relative_to(out) for p in out.rglob("*.md")) == \
        sorted(p.relative_to(REPO / SNAPSHOT) for p in (REPO / SNAPSHOT).rglob("*.md"))
    assert docs("snapshot", "--results", str(tmp_path / "nothing"), "--out", str(out)).returncode == 2


def test_the_run_record_times_the_headline_the_tables_and_the_report_from_the_files(tmp_path):
    """seconds after the DAG's first job (run_meta.json) at which the headline table, the last table or figure and
    the HTML report were written; the README's sentence and the results page state them."""
    from kvsharer.report.docs import demo_time, run_record

    results = tmp_path / "results"
    files = {"m/run_meta.json": 0, "tables/ppl_vs_rate.md": 95, "tables/table1.md": 300, "figures/a.png": 410,
             "report.html": 425}
    t0 = 1_796_634_000
    for name, after in files.items():
        (results / name).parent.mkdir(parents=True, exist_ok=True)
        (results / name).write_text("{}" if name.endswith(".json") else "| a |\n|---|\n")
        os.utime(results / name, (t0 + after, t0 + after))
    record = run_record(results, "make demo")
    assert record["seconds_after_first_job"] == {"headline": 95, "tables_and_figures": 410, "report": 425}
    assert (record["tables"], record["figures"]) == (2, 1)
    (results / "snapshot.json").write_text(json.dumps(record))
    sentence = demo_time(results)
    assert "`make demo`" in sentence and "1 min 35 s after the DAG's first job" in sentence
    assert "all 2 tables and 1 figure 6 min 50 s" in sentence and "`report.html` 7 min 5 s" in sentence


def test_markers_are_needed_once_each():
    start, end = README_MARKERS
    assert replace_between_markers(f"a\n{start}\nold\n{end}\nb", "new") == f"a\n{start}\nnew\n{end}\nb"
    with pytest.raises(ValueError):
        replace_between_markers("no markers here", "new")


def test_readme_is_short_and_opens_with_the_two_commands():
    text = (REPO / "README.md").read_text()
    assert len(text) <= 12_000, f"README.md is {len(text)} characters"
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    lines = [line.strip() for block in blocks for line in block.splitlines()]
    assert "make demo" in lines and "make test" in lines  # .ci/run runs `make test`
    assert text.index("make demo") < text.index("make test") < text.index("docs/ppl_vs_rate.png")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        if path in PENDING:
            continue
        assert path.exists(), f"{page.name} links to {target}, which does not exist"
