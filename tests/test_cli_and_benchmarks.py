"""The generate stage and the benchmarks, run for real at toy size (smoke: no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from kvsharer import SharingPolicy
from kvsharer.cli import main as cli

REPO = Path(__file__).resolve().parents[1]


def test_generate_prints_text_and_kv_bytes(tiny_model_dir, tmp_path, capsys):
    policy = tmp_path / "policy.json"
    SharingPolicy.from_pairs(8, {3: 1, 6: 2}).to_json(policy)
    assert cli(["generate", "--model", str(tiny_model_dir), "--policy", str(policy), "--prompt", "The assert statement",
                "--prompt", "A class", "--max-new-tokens", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["texts"]) == 2 and out["shared_layers"] == [3, 6]
    assert out["kv_bytes"] * 8 == out["kv_bytes_plain"] * 6  # 6 of 8 layers store K/V
    assert cli(["generate", "--model", str(tiny_model_dir), "--prompt", "x", "--max-new-tokens", "2"]) == 0
    assert "8/8 layers store K/V" in capsys.readouterr().out


def test_generate_rejects_bad_policy_and_model(tiny_model_dir, tmp_path, caplog):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"map": [0, 0, 1, 3, 4, 5, 6, 7]}))
    assert cli(["generate", "--model", str(tiny_model_dir), "--policy", str(bad), "--prompt", "x"]) == 2
    assert "layer 2 -> 1 is a chain" in caplog.text
    assert cli(["generate", "--model", "no/such/folder/x", "--prompt", "x"]) == 2
    assert "neither an existing folder nor a hub id" in caplog.text


def test_a_policy_across_layer_kinds_is_refused_before_the_weights_load(tmp_path, caplog):
    """A folder holding only config.json (no weights: loading would fail otherwise) of a model with sliding and
    full layers: a policy pairing the two kinds is refused from the config alone, naming both layers."""
    from transformers import Qwen2Config

    Qwen2Config(num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=300, use_sliding_window=True, sliding_window=8,
                layer_types=["full_attention", "sliding_attention"] * 2).save_pretrained(tmp_path / "mixed")
    bad = tmp_path / "cross.json"
    bad.write_text(json.dumps({"map": [0, 1, 1, 3]}))  # full layer 2 -> sliding layer 1
    assert cli(["evaluate-ppl", "--model", str(tmp_path / "mixed"), "--policy", str(bad), "--text", "embedded:pydoc",
                "--out", str(tmp_path / "ppl.json")]) == 2
    assert "layer 2 (full attention) cannot read layer 1 (sliding attention (window 8))" in caplog.text
    assert not (tmp_path / "ppl.json").exists()


def _bench(script: str, *args: str) -> dict:
    out = Path(args[args.index("--out") + 1])
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_sharing_cost_benchmark_smoke(tiny_model_dir, tmp_path):
    result = _bench("sharing_cost.py", "--model", str(tiny_model_dir), "--batch", "2", "--tokens", "32",
                    "--repeats", "2", "--out", str(tmp_path / "cost.json"))
    assert result["shared_layers"] == [1, 5] and result["kv_bytes_ratio"] == 0.75
    assert result["prefill_time_ratio"] > 0


def test_search_speed_benchmark_smoke(tiny_model_dir, tmp_path):
    result = _bench("search_speed.py", "--model", str(tiny_model_dir), "--samples", "6", "--tokens", "16",
                    "--out", str(tmp_path / "speed.json"))
    assert result["same_policy"] and result["target"] == 2
    assert result["official_candidates_evaluated"] == result["fast_candidates_evaluated"] >= 2
    assert result["started_candidates_evaluated"] == result["fast_candidates_evaluated"]
    assert result["started_over_fast"] > 0 and result["plain_run_seconds"] > 0


def test_fitted_search_benchmark_smoke(tiny_model_dir, tmp_path):
    result = _bench("fitted_search.py", "--model", str(tiny_model_dir), "--samples", "6", "--tokens", "16",
                    "--rates", "0.25", "--repeats", "2", "--out", str(tmp_path / "fitted.json"))
    row = result["rates"]["0.25"]
    assert row["dissimilar"]["candidates"] >= 2 and row["fitted"]["candidates"] >= 2
    assert len(row["fitted"]["seconds_all"]) == 2 and row["fitted_over_dissimilar"] > 0
    # a fitted policy never reads a layer that shares: every source stores its own K/V
    assert all(row["fitted"]["map"][s] == s for s in row["fitted"]["map"])


def test_shared_context_benchmark_smoke(tiny_model_dir, tmp_path):
    result = _bench("shared_context.py", "--model", str(tiny_model_dir), "--items", "2", "--context", "30",
                    "--choice", "3", "--repeats", "1", "--out", str(tmp_path / "shared.json"))
    # lm-eval feeds 4 x (30 + 2) tokens a question; one prefill of 29, then 1 + 2 per choice
    assert result["tokens_fed"] == {"lm_eval": 2 * 4 * 32, "ours": 2 * (29 + 4 * 3)}
    assert result["max_abs_loglikelihood_diff"] < 1e-3 and result["time_ratio"] > 0


def test_warm_worker_benchmark_smoke(tiny_model_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 37} and more text {i}" for i in range(400)))
    result = _bench("warm_worker.py", "--model", str(tiny_model_dir), "--text", str(text), "--smoke",
                    "--out", str(tmp_path / "warm.json"))
    assert len(result["seconds"]["own_process"]) == len(result["seconds"]["warm_worker"]) == 2
    assert result["ratio"] > 0 and result["ppl"] > 1  # both arms scored the same PPL (the script checks)


def test_gpu_profile_script_smoke_runs_the_real_pipeline_on_a_random_shape(tmp_path):
    """``--smoke``: the GPU script's whole pipeline (random-init shape, profile, figures, ratios) on the CPU."""
    import csv
    import os

    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_profile.sh"), "--smoke", str(tmp_path)],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "tiny-llama.csv").open()))
    grid = [r for r in rows if r["kind"] == "grid"]
    assert {(r["rate"], r["cache"]) for r in grid} == {(rate, c) for rate in ("0.0", "0.5") for c in ("none", "h2o:0.5", "int4")}
    assert all(int(r["kv_bytes"]) == int(r["expected_kv_bytes"]) for r in grid)  # 8 layers x the real shape's heads
    ratios = json.loads((tmp_path / "ratios.json").read_text())["ratios"]
    kv = {(r["batch"], r["rate"], r["cache"]): r["kv_bytes_ratio"] for r in ratios if "kv_bytes_ratio" in r}
    assert kv[(2, 0.5, "none")] == 0.5 and kv[(2, 0.0, "h2o:0.5")] == 0.5 and kv[(2, 0.5, "h2o:0.5")] == 0.25
    assert (tmp_path / "figures" / "profile_memory.png").is_file()


def test_random_shapes_are_the_published_ones():
    from kvsharer.models.loading import ModelError, check_source, load_model
    from kvsharer.cache.sharing import expected_kv_nbytes

    model, tokenizer = load_model("random:tiny-llama")
    assert tokenizer is None and model.config.num_hidden_layers == 8 and model.config.num_key_value_heads == 2
    # Llama-2-7B's KV per token in fp16: 2 x 32 layers x 32 heads x 128 dims x 2 bytes = 512 KiB
    from kvsharer.models.shapes import SHAPES

    s = SHAPES["llama-2-7b"]
    assert 2 * s.layers * s.kv_heads * (s.hidden // s.heads) * 2 == 512 * 1024
    try:
        check_source("random:gpt-7")
    except ModelError as err:
        assert "random:llama-2-7b" in str(err)
    else:
        raise AssertionError("an unknown shape was accepted")
    assert expected_kv_nbytes(model, None, 1, 10, 4) == 2 * 8 * 2 * 10 * 64 * 4
