"""docs/benchmarks.md is what the committed benchmark JSON gives (kvsharer.report.benchmark_docs): no number on it
is copied by hand, every script of benchmarks/ is on it, a benchmark without a JSON is said not to have run, and a
JSON no benchmark writes is refused. Torch-free and fast: no benchmark runs here."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from kvsharer.report.benchmark_docs import BENCHMARKS, HELPERS, NOT_RUN, benchmarks_page, ratio

REPO = Path(__file__).resolve().parents[1]
SNAPSHOT = Path("docs/benchmarks-snapshot")  # relative: the page names the folder it was generated from
LABEL = SNAPSHOT.as_posix()


def section(page: str, script: str) -> str:
    """The page's section of ``benchmarks/<script>``, up to the next one."""
    start = page.index(f"## `benchmarks/{script}`")
    end = page.find("\n## ", start + 1)
    return page[start:] if end < 0 else page[start:end]


def bold_ratio(text: str, name: str) -> float:
    """The value of the bullet ``- **name: 0.7333**``."""
    found = re.findall(rf"- \*\*{re.escape(name)}: ([0-9.e+-]+)\*\*", text)
    assert len(found) == 1, f"{name!r} is on the page {len(found)} times"
    return float(found[0])


@pytest.fixture
def snapshot_copy(tmp_path) -> Path:
    copy = tmp_path / "snapshot"
    shutil.copytree(REPO / SNAPSHOT, copy)
    return copy


def test_committed_page_is_what_the_snapshot_gives():
    page = (REPO / "docs" / "benchmarks.md").read_text()
    assert page == benchmarks_page(REPO / SNAPSHOT, LABEL), \
        "docs/benchmarks.md is stale: run `python -m kvsharer docs benchmarks`"


def test_every_script_of_benchmarks_is_on_the_page():
    page = benchmarks_page(REPO / SNAPSHOT, LABEL)
    scripts = sorted(p.name for p in (REPO / "benchmarks").iterdir() if p.is_file())
    documented = {b.script for b in BENCHMARKS} | set(HELPERS)
    assert set(scripts) <= documented, f"not described in kvsharer.report.benchmark_docs: {set(scripts) - documented}"
    for name in scripts:
        assert f"`benchmarks/{name}`" in page, name
    for bench in BENCHMARKS:
        assert f"## `benchmarks/{bench.script}`" in page


def test_every_committed_json_is_rendered_with_when_and_where_it_ran():
    page = benchmarks_page(REPO / SNAPSHOT, LABEL)
    files = sorted((REPO / SNAPSHOT).glob("*.json"))
    assert files, "the snapshot holds no benchmark JSON"
    for path in files:
        result = json.loads(path.read_text())
        assert f"Measured (`{LABEL}/{path.name}`)" in page
        assert result["started"] in page and f"`{result['commit']}`" in page and result["command"] in page
        assert f"{result['machine']['cpu_count']} CPUs" in page


def test_a_missing_json_says_not_run(snapshot_copy):
    (snapshot_copy / "sharing_cost.json").unlink()
    page = benchmarks_page(snapshot_copy, LABEL)
    assert NOT_RUN in section(page, "sharing_cost.py").lower()
    assert "Measured" not in section(page, "sharing_cost.py")
    assert NOT_RUN not in section(page, "compose.py").lower()  # the others still show their numbers


def test_the_ratios_on_the_page_are_the_jsons(snapshot_copy):
    result = json.loads((REPO / SNAPSHOT / "sharing_cost.json").read_text())
    page = section(benchmarks_page(REPO / SNAPSHOT, LABEL), "sharing_cost.py")
    assert bold_ratio(page, "KV bytes ratio (shared / plain)") == float(ratio(result["kv_bytes_ratio"]))
    assert bold_ratio(page, "prefill time ratio (shared / plain)") == pytest.approx(result["prefill_time_ratio"],
                                                                                   rel=1e-3)
    result["prefill_time_ratio"] = 0.1234  # a changed JSON changes the page: nothing is typed in by hand
    (snapshot_copy / "sharing_cost.json").write_text(json.dumps(result))
    changed = section(benchmarks_page(snapshot_copy, LABEL), "sharing_cost.py")
    assert bold_ratio(changed, "prefill time ratio (shared / plain)") == 0.1234


def test_a_json_no_benchmark_writes_or_cannot_read_or_no_folder_is_refused(snapshot_copy):
    (snapshot_copy / "old_benchmark.json").write_text("{}")
    with pytest.raises(ValueError, match="old_benchmark.json"):
        benchmarks_page(snapshot_copy, LABEL)
    (snapshot_copy / "old_benchmark.json").unlink()
    (snapshot_copy / "compose.json").write_text(json.dumps({"benchmark": "compose"}))
    with pytest.raises(ValueError, match="compose.json is not what benchmarks/compose.py writes"):
        benchmarks_page(snapshot_copy, LABEL)
    with pytest.raises(FileNotFoundError):
        benchmarks_page(snapshot_copy / "no-such-folder")


def test_gpu_benchmarks_render_their_json_once_they_ran(tmp_path):
    """The GPU scripts' JSON (none lent so far): profile_ratios.py's ratios, serve.py's output per model, the
    rehearsal's summary; without the run facts the page says they are not recorded."""
    setting = {"model": "llama-2-7b", "context": 4096, "rate": 0.25, "cache": "none"}
    (tmp_path / "gpu_profile.json").write_text(json.dumps({"inputs": ["results/gpu_profile/llama-2-7b.csv"], "ratios": [
        {**setting, "batch": 8, "kv_bytes_ratio": 0.75, "peak_bytes_ratio": 0.9, "prefill_s_ratio": None,
         "decode_tok_s_ratio": 1.05},
        {**setting, "max_batch": 40, "max_batch_ratio": 1.25},
    ]}))
    arm = {"kv_blocks": 100, "max_concurrency": 10, "shared_layers": 0, "output_tokens_per_s": 1000.0,
           "latency_mean_s": 2.0, "expected_ratio": 1.0,
           "ratio_to_plain": {"kv_blocks": 1.0, "max_concurrency": 1.0, "output_tokens_per_s": 1.0,
                              "latency_mean_s": 1.0}}
    shared = {**arm, "shared_layers": 8, "kv_blocks": 133, "expected_ratio": 1.333,
              "ratio_to_plain": {**arm["ratio_to_plain"], "kv_blocks": 1.33}}
    (tmp_path / "gpu_serve.llama-2-7b.json").write_text(json.dumps({
        "engine": "vllm 0.0", "model": "llama-2-7b", "layers": 32, "dtype": "float16", "kv_cache_bytes": 8 << 30,
        "block_size": 16, "requests": 512, "prompt_tokens": 512, "new_tokens": 256, "repeats": 2, "threads": 1,
        "arms": {"plain": arm, "spread25%": shared,
                 "plain+fp8": {"kv_cache_dtype": "fp8", "error": "NotImplemented"}}}))
    (tmp_path / "gpu_rehearsal.json").write_text(json.dumps({"wall_s": 600, "results": ["a/eval/x.json"],
                                                              "tables": ["table1.md"], "gpu": "H100", "torch": "2"}))
    page = benchmarks_page(tmp_path, "snap")
    profile, serve = section(page, "gpu_profile.sh"), section(page, "gpu_serve.sh")
    assert "| llama-2-7b | 8 | 4096 | 25 % | none | 0.75 | 0.9 | — | 1.05 |" in profile
    assert "| llama-2-7b | 4096 | 25 % | none | 40 | 1.25 |" in profile
    assert "| `spread25%` | 1.33 | 1.333 |" in serve and "failed: NotImplemented" in serve
    assert "600.0 s on H100" in section(page, "gpu_rehearsal.sh")
    assert "not recorded in this JSON" in profile
    assert NOT_RUN in section(page, "sharing_cost.py").lower()
