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
