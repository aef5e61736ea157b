"""The DAG's vLLM stage (``python -m kvsharer serving``, rule ``serving``) and its table and figure.

* the arithmetic and the summary of :mod:`kvsharer.serving.bench` and the ``serving`` table and figure, on a
  synthetic result file written the way the stage writes it (no vLLM needed);
* the stage's refusals of bad input, before any engine (no vLLM needed);
* the stage for real on the demo model with a tiny request set, where ``.venv-serve`` exists (``make
  serve-setup``) or vLLM imports here; skipped with the reason elsewhere.

The DAG planning the rule only when ``serving:`` is in the config: tests/test_dag.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from test_serving import _demo_model, _serve_python

from kvsharer.cache.policy import SharingPolicy
from kvsharer.cli import main as cli
from kvsharer.serving.bench import (Workload, block_bytes_per_layer, expected_blocks, max_concurrency,
                                    summarize)

ROOT = Path(__file__).resolve().parents[1]
# the demo model's config.json (SmolLM2-135M-Instruct: 30 layers, 3 KV heads of 64)
DEMO = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "head_dim": 64, "hidden_size": 576, "vocab_size": 49152}
L = 30
WORKLOAD = Workload(block_size=32, requests=48, prompt_tokens=32, new_tokens=64)  # 96 tokens: 3 blocks a request
UNIT = 49152 * 330 * 19  # a block of every layer, times lcm(30, 22, 19) / 30: every count below divides it


def test_a_budget_holds_the_blocks_of_the_layers_that_store_kv():
    assert block_bytes_per_layer(DEMO, 32, "float32") == 32 * 2 * 3 * 64 * 4 == 49152
    assert block_bytes_per_layer(DEMO, 32, "bfloat16") == 49152 // 2
    assert block_bytes_per_layer(DEMO, 32, "float32", "fp8") == 49152 // 4
    # L - k = 30, 22, 19 storing layers: 6270 / 30, / 22, / 19 blocks exactly
    assert [expected_blocks(DEMO, UNIT, L - k, 32, "float32") for k in (0, 8, 11)] == [209, 285, 330]
    assert expected_blocks(DEMO, UNIT - 1, L, 32, "float32") == 208  # rounded down to whole blocks
    assert WORKLOAD.blocks_per_request == 3 and max_concurrency(209, WORKLOAD) == 69
    assert max_concurrency(10_000, WORKLOAD) == 256  # vLLM's max_num_seqs caps it
    assert Workload(block_size=0, dtype="int8").problems() == ["block_size must be at least 1, got 0",
                                                               "dtype 'int8' is not one of float32, bfloat16, float16"]


# --- a synthetic result file, written the way the stage writes it -----------------------------------------

ARMS = {  # arm -> (order, rate requested, layers shared, tokens/s of rounds 1 and 2 at the first budget)
    "plain": (None, 0.0, 0, [100.0, 80.0]),
    "r0.25_dissimilar_euclidean_T0.5_s0": ("dissimilar", 0.25, 8, [110.0, 100.0]),
    "r0.25_measured-kl_euclidean_T0.5_s0": ("measured-kl", 0.25, 8, [90.0, 96.0]),
    "r0.375_dissimilar_euclidean_T0.5_s0": ("dissimilar", 0.375, 11, [130.0, 60.0]),
}
BUDGETS = [UNIT / 2**20, 2 * UNIT / 2**20]  # 293.90625 and 587.8125 MiB


def _round(tokens_per_s: float) -> dict:
    return {"output_tokens_per_s": tokens_per_s, "latency_mean_s": 480 / tokens_per_s, "latency_p50_s": 1.0,
            "latency_p90_s": 2.0, "ttft_mean_s": 0.5, "max_running_observed": 48}


def synthetic_result(path: Path) -> None:
    runs = []
    for scale, mib in enumerate(BUDGETS, 1):
        budget = int(mib * 2**20)
        results = {}
        for arm, (order, rate, k, rounds) in ARMS.items():
            blocks = expected_blocks(DEMO, budget, L - k, 32, "float32")  # what vLLM allocated in the real runs
            results[arm] = {"kv_cache_dtype": "auto", "kv_blocks": blocks, "kv_blocks_expected": blocks,
                            "max_concurrency": max_concurrency(blocks, WORKLOAD), "shared_layers": k,
                            "storing_layers": L - k, "rounds": [_round(t * scale) for t in rounds]}
        results = summarize(results, "plain", L, "float32")
        runs += [{"kv_cache_mib": mib, "kv_cache_bytes": budget, "arm": arm, "order": order, "rate_requested": rate,
                  **results[arm]} for arm, (order, rate, _, _) in ARMS.items()]
    path.write_text(json.dumps({"stage": "serving", "model": "smollm2-135m", "layers": L, "runs": runs}))


@pytest.fixture
def serving_file(tmp_path):
    synthetic_result(tmp_path / "serving.json")
    return tmp_path / "serving.json"


def test_summary_ratios_are_the_blocks_and_round_ratios(serving_file):
    runs = {(r["kv_cache_mib"], r["arm"]): r for r in json.loads(serving_file.read_text())["runs"]}
    shared = runs[BUDGETS[0], "r0.375_dissimilar_euclidean_T0.5_s0"]
    assert shared["ratio_to_plain"]["kv_blocks"] == 330 / 209 == L / (L - 11) == shared["expected_ratio"]
    assert shared["output_tokens_per_s"] == 95.0  # the median of 130 and 60
    # tokens/s within each round (1.3, 0.75), their median 1.025 -- not the ratio of the medians (95 / 90)
    assert shared["tokens_per_s_ratio_by_round"] == [1.3, 0.75]
    assert shared["ratio_to_plain"]["output_tokens_per_s_within_rounds_median"] == pytest.approx(1.025)
    assert shared["ratio_to_plain"]["output_tokens_per_s"] == pytest.approx(95 / 90)


def test_serving_table_shows_blocks_and_concurrency_ratios_per_budget_and_rate(serving_file, tmp_path):
    assert cli(["tables", "--only", "serving", "--serving", str(serving_file), "--out-dir", str(tmp_path / "t")]) == 0
    table = pd.read_csv(tmp_path / "t" / "serving.csv")
    assert len(table) == 8
    first = table[table["kv_mib"] == BUDGETS[0]]
    # plain first, then by rate, the paper's order before the measured one
    assert list(zip(first["rate_pct"], first["method"])) == [(0, "plain"), (25, "dissimilar"), (25, "measured-kl"),
                                                             (37.5, "dissimilar")]
    assert list(first["layers_shared"]) == [0, 8, 8, 11]
    assert list(first["kv_blocks"]) == [209, 285, 285, 330] and list(first["blocks_expected"]) == [209, 285, 285, 330]
    assert list(first["max_concurrency"]) == [69, 95, 95, 110]  # blocks // 3 blocks a request
    for _, row in table.iterrows():
        k = row["layers_shared"]
        assert row["blocks_x_plain"] == row["expected_x"] == L / (L - k)  # exactly: the budget is a common multiple
    second = table[table["kv_mib"] == BUDGETS[1]]
    assert list(second["kv_blocks"]) == [418, 570, 570, 660]
    assert list(first["tok_s_x_plain"]) == pytest.approx([1.0, 1.175, 1.05, 1.025])  # within-round medians
    md = (tmp_path / "t" / "serving.md").read_text()
    assert "KV budget (MiB)" in md and "L/(L-k)" in md and "max concurrency" in md
    # without --only serving the stage writes the tables every run writes, not this one
    assert cli(["tables", "--serving", str(serving_file), "--out-dir", str(tmp_path / "all")]) == 0
    assert not (tmp_path / "all" / "serving.csv").exists() and (tmp_path / "all" / "table1.csv").exists()


def test_serving_figure_draws_tokens_and_concurrency_against_the_budget(serving_file, tmp_path):
    from kvsharer.report.figures import fig_serving
    from kvsharer.report.tables import read_serving, serving

    fig = fig_serving(serving(read_serving([serving_file])))
    tokens, concurrency = fig.axes[:2]
    assert tokens.get_xlabel() == concurrency.get_xlabel() == "KV-cache budget (MiB)"
    lines = {line.get_label(): line for line in concurrency.get_lines() if not line.get_label().startswith("_")}
    assert set(lines) == {"plain", "dissimilar 25 %", "measured-kl 25 %", "dissimilar 37.5 %"}
    assert list(lines["plain"].get_xdata()) == BUDGETS
    assert list(lines["plain"].get_ydata()) == [69, 139]  # 209 // 3, 418 // 3
    assert list(lines["dissimilar 37.5 %"].get_ydata()) == [110, 220]
    assert lines["plain"].get_color() == "black"
    plain_tokens = [line for line in tokens.get_lines() if line.get_label() == "plain"]
    assert plain_tokens and list(plain_tokens[0].get_ydata()) == [90.0, 180.0]  # medians of the rounds
    assert cli(["figures", "--only", "serving", "--serving", str(serving_file), "--out-dir", str(tmp_path / "f")]) == 0
    assert (tmp_path / "f" / "serving.png").read_bytes().startswith(b"\x89PNG") and not (tmp_path / "f" / "ppl_vs_rate.png").exists()


def test_a_file_that_is_no_serving_result_is_refused(tmp_path, caplog):
    bad = tmp_path / "profile.json"
    bad.write_text(json.dumps({"stage": "profile"}))
    assert cli(["tables", "--only", "serving", "--serving", str(bad), "--out-dir", str(tmp_path)]) == 2
    assert "is not a result of the serving stage" in caplog.text


# --- the stage's checks: before any engine, no vLLM needed ------------------------------------------------


def test_the_stage_refuses_bad_input_before_any_engine(tmp_path, caplog):
    model = tmp_path / "model"
    model.mkdir()
    SharingPolicy.spread(29, 0.25).to_json(tmp_path / "short.json")
    cases = [
        (["--policy", f"p={tmp_path / 'short.json'}"], "29 layers but the model has 30"),
        (["--policy", "nofile"], "--policy takes NAME=FILE"),
        (["--policy", f"plain={tmp_path / 'short.json'}"], "names 'plain' twice"),
        (["--kv-cache-mib", "96,0"], "budgets above 0 MiB"),
        (["--requests", "0"], "requests must be at least 1"),
        (["--prompt-tokens", "9000"], "exceed the model's window"),
    ]
    (model / "config.json").write_text(json.dumps({**DEMO, "max_position_embeddings": 8192}))
    for extra, message in cases:
        caplog.clear()
        assert cli(["serving", "--model", str(model), *extra, "--out", str(tmp_path / "out.json")]) == 2, extra
        assert message in caplog.text, (extra, caplog.text)
    assert not (tmp_path / "out.json").exists()


# --- for real: vLLM on the demo model ----------------------------------------------------------------------


@pytest.mark.slow
def test_the_stage_serves_the_demo_model_with_the_blocks_of_the_storing_layers(tmp_path):
    """Two engines (plain, 8 of 30 layers shared) at a budget that holds whole blocks for both (block bytes per
    layer x 30 x 22): vLLM allocates 22 and 30 blocks, a ratio of exactly L / (L - k) = 30 / 22; 4 requests of
    16 + 8 tokens run through each (about 50 s on 2 cores, most of it two engine start-ups)."""
    python = _serve_python()
    if python is None:
        pytest.skip("vLLM is not installed here and .venv-serve/bin/python does not exist (make serve-setup)")
    model = _demo_model()
    config = json.loads((model / "config.json").read_text())
    policy = SharingPolicy.spread(L, 0.25, rate_requested=0.25, settings={"order": "dissimilar"})
    policy.to_json(tmp_path / "p25.json")
    budget = block_bytes_per_layer(config, 32, "float32") * L * (L - 8)
    out = tmp_path / "serving.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("KVSHARER_WORKER", None)
    proc = subprocess.run([python, "-m", "kvsharer", "--threads", "1", "serving", "--model", str(model),
                           "--name", "demo", "--policy", f"r0.25_dissimilar={tmp_path / 'p25.json'}",
                           "--kv-cache-mib", repr(budget / 2**20), "--block-size", "32", "--requests", "4",
                           "--prompt-tokens", "16", "--new-tokens", "8", "--repeats", "1", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    result = json.loads(out.read_text())
    assert result["engine"].startswith("vllm ") and result["layers"] == L
    plain, shared = result["runs"]
    assert (plain["arm"], shared["arm"]) == ("plain", "r0.25_dissimilar")
    assert plain["kv_cache_bytes"] == shared["kv_cache_bytes"] == budget
    assert (plain["kv_blocks"], shared["kv_blocks"]) == (22, 30)
    assert plain["kv_blocks"] == plain["kv_blocks_expected"] and shared["kv_blocks"] == shared["kv_blocks_expected"]
    assert shared["ratio_to_plain"]["kv_blocks"] == 30 / 22 == L / (L - 8) == shared["expected_ratio"]
    assert (plain["max_concurrency"], shared["max_concurrency"]) == (22, 30)  # 24 tokens: one block a request
    assert (shared["order"], shared["rate_requested"], shared["shared_layers"]) == ("dissimilar", 0.25, 8)
    for run in (plain, shared):
        (one,) = run["rounds"]
        assert one["requests_finished"] == 4 and one["output_tokens"] == 4 * 8 and run["output_tokens_per_s"] > 0
    # the report reads it as it is
    from kvsharer.report.tables import read_serving, serving

    table = serving(read_serving([out]))
    assert list(table["method"]) == ["plain", "dissimilar"] and list(table["kv_blocks"]) == [22, 30]
