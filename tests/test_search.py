"""Calibration, distances and the policy search on tiny models: fast == official, chains, resume, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_tiny, save_tiny_model

from kvsharer.search import calibrate
from kvsharer.stages import search
from kvsharer.cli import main as cli
from kvsharer.search.distance import layer_distances, rank_pairs
from kvsharer.search.greedy import FastEvaluator, Journal, OfficialEvaluator, SearchSettings, greedy_search, run_search


def _input_ids(n=12, t=16, seed=0, vocab=96):
    return torch.randint(3, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def test_calibration_statistics_are_the_plain_models():
    model = make_tiny("qwen2")
    ids = _input_ids()
    stats = calibrate.collect(model, ids, batch_size=5)  # batched in uneven chunks
    out = model(ids, use_cache=True, output_hidden_states=True)
    for layer in (0, 5):
        torch.testing.assert_close(stats["keys"][layer], out.past_key_values.layers[layer].keys.mean(0))
        torch.testing.assert_close(stats["values"][layer], out.past_key_values.layers[layer].values.mean(0))
    torch.testing.assert_close(stats["reference_hidden"], out.hidden_states[-1])
    assert stats["keys"].shape == (8, 2, 16, 16) and stats["keys"].dtype == torch.float32


def test_distance_definitions():
    keys = torch.zeros(3, 1, 2, 4)
    keys[1, 0, :, 0] = 3.0  # layer 1 differs from 0 by an L2 norm of 3 at every position
    keys[2] = -keys[1]
    dist = layer_distances(keys, keys.clone(), "euclidean")
    assert dist[1, 0] == pytest.approx(3.0) and dist[2, 1] == pytest.approx(6.0) and dist[0, 0] == 0
    assert [p[:2] for p in rank_pairs(dist, "dissimilar")] == [(2, 1), (1, 0), (2, 0)]
    assert [p[:2] for p in rank_pairs(dist, "similar")] == [(1, 0), (2, 0), (2, 1)]
    assert rank_pairs(dist, "random", seed=1) == rank_pairs(dist, "random", seed=1)
    scaled = torch.randn(4, 2, 8, 4)
    scaled[3] = scaled[2] * 5  # CKA ignores scale, Euclidean does not
    assert layer_distances(scaled, scaled, "cka")[3, 2] == pytest.approx(0, abs=1e-9)
    assert layer_distances(scaled, scaled, "euclidean")[3, 2] > 1


def _both(model, stats, **kw):
    results = {}
    for procedure in ("official", "fast"):
        settings = SearchSettings(procedure=procedure, **kw)
        results[procedure] = run_search(model, stats, settings, progress=False)
    return results["official"], results["fast"]


@pytest.mark.parametrize(
    "family, order, metric, threshold",
    [
        ("llama", "dissimilar", "euclidean", 0.5),
        ("qwen3", "dissimilar", "euclidean", 0.9),
        ("mistral", "similar", "cosine", 0.8),
        ("qwen2", "random", "cka", 0.8),
    ],
)
def test_fast_and_official_find_the_same_policy(family, order, metric, threshold):
    model = make_tiny(family)
    stats = calibrate.collect(model, _input_ids(n=10))
    official, fast = _both(model, stats, target=4, threshold=threshold, order=order, metric=metric, seed=3,
                           batch_size=4)
    assert fast["map"] == official["map"]
    assert [t["pair"] for t in fast["trace"]] == [t["pair"] for t in official["trace"]]
    for a, b in zip(fast["trace"], official["trace"]):
        assert a["similarity"] == pytest.approx(b["similarity"], abs=1e-4) and a["accepted"] == b["accepted"]
    assert len(fast["trace"]) >= 4  # the search really evaluated candidates
    # the fast procedure computed fewer decoder layers than full forwards of every candidate would
    assert fast["layers_computed"] < (len(fast["trace"]) + 1) * 8 * 10


class _Scripted:
    """Evaluator with fixed answers, to pin down the loop's logic itself."""

    def __init__(self, reject=()):
        self.reject, self.seen = set(reject), []

    def similarity(self, accepted, candidate):
        self.seen.append(candidate)
        return 0.0 if tuple(candidate) in self.reject else 0.99

    def accept(self, candidate):
        pass


def test_loop_resolves_chains_skips_sharers_and_reports_incomplete():
    ranked = [(3, 1, 9.0), (1, 0, 8.0), (3, 2, 7.0), (5, 3, 6.0), (4, 1, 5.0)]
    result = greedy_search(ranked, 6, target=4, threshold=0.5, evaluator=_Scripted(), progress=False)
    # 3->1 accepted; 1->0 drags its dependent 3 along to 0; (3, 2) skipped: 3 already shares;
    # 5->3 becomes 5->0 (3 stores nothing); 4->1 becomes 4->0
    assert result["map"] == [0, 0, 2, 0, 0, 0]
    assert [t["pair"] for t in result["trace"]] == [[3, 1], [1, 0], [5, 3], [4, 1]]
    assert result["complete"] and result["pairs_skipped"] == 1
    scripted = _Scripted(reject={(0, 1, 2, 1, 4, 5)})
    short = greedy_search(ranked, 6, target=5, threshold=0.5, evaluator=scripted, progress=False)
    # 3->1 rejected, so (3, 2) is tried; 5->3 resolves to 5->2; pairs run out at 4 of 5
    assert short["map"] == [0, 0, 2, 2, 0, 2] and short["num_shared"] == 4 and not short["complete"]
    assert [t["accepted"] for t in short["trace"]] == [False, True, True, True, True]
    assert short["stopped"] == "pairs exhausted" and result["stopped"] == "target reached"
    budget = greedy_search(ranked, 6, target=5, threshold=0.5, evaluator=_Scripted(), progress=False, max_candidates=2)
    assert budget["stopped"] == "budget" and len(budget["trace"]) == 2 and not budget["complete"]


def test_chain_case_fast_equals_official_on_a_model():
    model = make_tiny("llama")
    stats = calibrate.collect(model, _input_ids(n=6))
    ranked = [(3, 1, 1.0), (1, 0, 1.0), (6, 3, 1.0), (7, 1, 1.0)]
    maps = {}
    for name, evaluator in (("official", OfficialEvaluator(model, stats["input_ids"])),
                            ("fast", FastEvaluator(model, stats["input_ids"], stats["reference_hidden"]))):
        res = greedy_search(ranked, 8, target=4, threshold=-0.99, evaluator=evaluator, progress=False)
        maps[name] = (res["map"], [t["similarity"] for t in res["trace"]])
    assert maps["fast"][0] == maps["official"][0] == [0, 0, 2, 0, 4, 5, 0, 0]
    assert maps["fast"][1] == pytest.approx(maps["official"][1], abs=1e-4)


# ------------------------------------------------------------------------------------------------
# CLI: calibrate -> search, resume after SIGKILL, bad input
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    model_dir = save_tiny_model(root / "tiny16", n_layers=16)
    cal = root / "cal.safetensors"
    assert cli(["calibrate", "--model", str(model_dir), "--samples", "30", "--tokens", "16", "--out", str(cal)]) == 0
    return model_dir, cal


def _search_args(model_dir, cal, out, *extra):
    return ["search", "--model", str(model_dir), "--calibration", str(cal), "--out", str(out), *extra]


def test_resume_after_sigkill_gives_the_same_policy(calibrated, tmp_path):
    model_dir, cal = calibrated
    settings = ["--layers", "6", "--threshold", "0.7", "--order", "similar"]
    reference = tmp_path / "reference.json"
    assert cli(_search_args(model_dir, cal, reference, *settings)) == 0
    expected = json.loads(reference.read_text())
    assert expected["candidates_evaluated"] >= 6 and not all(t["accepted"] for t in expected["trace"])

    out = tmp_path / "killed.json"
    journal = Path(f"{out}.journal.jsonl")
    cmd = [sys.executable, "-m", "kvsharer", *_search_args(model_dir, cal, out, *settings, "--procedure", "official")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if journal.exists() and len(journal.read_text().splitlines()) >= 3:  # header + 2 candidates
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the search finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # no half-written policy
    done_before = len(journal.read_text().splitlines()) - 1
    assert done_before >= 2

    resumed = subprocess.run(cmd, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    got = json.loads(out.read_text())
    assert got["map"] == expected["map"]
    assert got["candidates_resumed"] >= 2
    assert got["candidates_resumed"] + got["candidates_evaluated"] == len(expected["trace"])
    # the same inputs and seed give the same policy, run after run
    again = tmp_path / "again.json"
    assert cli(_search_args(model_dir, cal, again, *settings)) == 0
    assert json.loads(again.read_text())["map"] == expected["map"]


def test_search_output_is_a_policy_with_trace(calibrated, tmp_path):
    model_dir, cal = calibrated
    out = tmp_path / "p.json"
    assert cli(_search_args(model_dir, cal, out, "--rate", "0.25", "--samples", "30", "--tokens", "16")) == 0
    data = json.loads(out.read_text())
    assert data["target"] == 4 and len(data["map"]) == 16
    assert data["complete"] == (data["num_shared"] == 4)
    assert {"pair", "rank", "distance", "similarity", "accepted"} <= set(data["trace"][0])
    assert data["settings"]["order"] == "dissimilar" and len(data["calibration_sha256"]) == 64
    ranks = [t["rank"] for t in data["trace"]]
    assert ranks == sorted(ranks)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--rate", "0.95"], "sharing rate 0.95 is impossible for 16 layers"),
        (["--rate", "-0.1"], "sharing rate -0.1 is impossible"),
        (["--layers", "16"], "16 shared layers is impossible for 16 layers"),
        (["--rate", "0.25", "--threshold", "1.5"], "threshold T=1.5 must be in (-1, 1]"),
        (["--rate", "0.25", "--threshold", "-1"], "threshold T=-1.0 must be in (-1, 1]"),
        (["--rate", "0.25", "--order", "sideways"], "unknown pair order 'sideways'"),
        (["--rate", "0.25", "--metric", "manhattan"], "unknown distance metric 'manhattan'"),
        (["--rate", "0.25", "--samples", "64"], "calibration file has samples=30, expected 64"),
        (["--rate", "0.25", "--tokens", "32"], "calibration file has tokens=16, expected 32"),
        (["--rate", "0.25", "--start", "/nonexistent/states.safetensors"], "--start /nonexistent/states.safetensors not found"),
    ],
)
def test_bad_search_input_fails_before_loading_a_model(calibrated, tmp_path, monkeypatch, caplog, extra, message):
    model_dir, cal = calibrated
    monkeypatch.setattr(search, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert cli(_search_args(model_dir, cal, tmp_path / "p.json", *extra)) == 2
    assert message in caplog.text


def test_calibration_from_another_model_is_refused(calibrated, tmp_path, monkeypatch, caplog):
    _, cal = calibrated
    other = save_tiny_model(tmp_path / "other", n_layers=16, seed=7)
    monkeypatch.setattr(search, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert cli(_search_args(other, cal, tmp_path / "p.json", "--rate", "0.25")) == 2
    assert "calibration file was made with model" in caplog.text


# ------------------------------------------------------------------------------------------------
# starting from the plain run (stage calibration-states)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order, kw", [("dissimilar", {"threshold": 0.9, "max_candidates": 12}),
                                       ("measured-kl", {"threshold": 0.5, "sources": 2, "refresh": 2, "screen": 3})])
def test_a_search_started_from_the_plain_run_finds_the_same_in_fewer_layers(order, kw):
    """The plain run computed once (what calibration-states writes) gives the same candidates, the same
    similarities to the last bit and the same policy as a search that computes it itself, for one full forward
    less (the rebuild of a resumed search starts at its first shared layer too)."""
    from kvsharer.search.greedy import plain_run

    model = make_tiny("llama")
    stats = calibrate.collect(model, _input_ids(n=6))
    settings = SearchSettings(target=3, order=order, batch_size=4, **kw)
    fresh = run_search(model, stats, settings, progress=False)
    start = plain_run(model, stats["input_ids"], batch_size=4)
    started = run_search(model, stats, settings, progress=False, start=start)
    assert started["map"] == fresh["map"] and started["num_shared"] >= 1
    assert [(t["pair"], t["similarity"]) for t in started["trace"]] == [(t["pair"], t["similarity"]) for t in fresh["trace"]]
    assert fresh["layers_computed"] - started["layers_computed"] == 8 * 6  # one forward of 8 layers x 6 samples


def test_search_starts_from_a_states_file_only_when_it_fits(calibrated, tmp_path, caplog):
    model_dir, cal = calibrated
    caplog.set_level("INFO")
    states = tmp_path / "states.safetensors"
    assert cli(["calibration-states", "--model", str(model_dir), "--calibration", str(cal), "--out", str(states)]) == 0
    settings = ["--rate", "0.25", "--order", "similar", "--threshold", "0.7"]
    assert cli(_search_args(model_dir, cal, tmp_path / "fresh.json", *settings)) == 0
    assert cli(_search_args(model_dir, cal, tmp_path / "started.json", *settings, "--start", str(states))) == 0
    fresh, started = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("fresh", "started"))
    assert "starting from the plain run" in caplog.text
    assert started["map"] == fresh["map"] and started["layers_computed"] == fresh["layers_computed"] - 16 * 30
    assert [t["similarity"] for t in started["trace"]] == [t["similarity"] for t in fresh["trace"]]
    caplog.clear()  # made at another batch size: float rounding could differ, so it is not used
    assert cli(_search_args(model_dir, cal, tmp_path / "other.json", *settings, "--batch-size", "7",
                            "--start", str(states))) == 0
    assert "not starting from" in caplog.text and "batch_size None (this search: 7)" in caplog.text
    assert json.loads((tmp_path / "other.json").read_text())["layers_computed"] == fresh["layers_computed"]
