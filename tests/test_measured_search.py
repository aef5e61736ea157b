"""The measured search (orders measured-kl / measured-cosine) on tiny models: its losses equal a slow full-model
computation, exhaustive greedy equals a brute force, it finds a planted best policy the paper's order misses,
resumes after a kill to the same policy, and refuses bad input before loading a model."""

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
import torch.nn.functional as F
from conftest import make_tiny, save_tiny_model

from kvsharer.search import calibrate
from kvsharer.stages import search
from kvsharer.stages.search import run_journaled
from kvsharer.cli import main as cli
from kvsharer.search.distance import layer_distances
from kvsharer.search.measured import OutputLoss, candidate_pairs, measured_search
from kvsharer.cache.policy import SharingPolicy, resolve_chains
from kvsharer.search.greedy import FastEvaluator, Journal, SearchSettings, run_search
from kvsharer.cache.sharing import share_kv


def _input_ids(n=8, t=16, seed=0, vocab=96):
    return torch.randint(3, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def _slow_losses(model, ids, share_map):
    """KL(plain || candidate) per token and last-hidden cosine, from two full forwards with the LM head."""
    plain = model(ids, output_hidden_states=True)
    with share_kv(model, SharingPolicy(share_map)):
        cand = model(ids, output_hidden_states=True)
    p, q = F.log_softmax(plain.logits.float(), -1), F.log_softmax(cand.logits.float(), -1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    a, b = plain.hidden_states[-1].flatten(1).double(), cand.hidden_states[-1].flatten(1).double()
    return kl, F.cosine_similarity(a, b, dim=1).mean().item()


def _measure(model, stats, share_map, accepted=None):
    evaluator = FastEvaluator(model, stats["input_ids"], stats["reference_hidden"], batch_size=3)
    hidden = evaluator.hidden(accepted or list(range(len(share_map))), share_map, keep=False)
    return OutputLoss(model, stats["reference_hidden"], chunk=3)(hidden)


def test_losses_equal_a_slow_full_model_computation():
    model = make_tiny("qwen2")
    stats = calibrate.collect(model, _input_ids())
    accepted = [0, 1, 1, 3, 4, 5, 6, 7]  # the replay starts from a policy that already shares 2 -> 1
    for candidate in ([0, 1, 1, 3, 4, 3, 6, 7], [0, 1, 1, 1, 4, 5, 6, 7], [0, 1, 1, 3, 4, 5, 6, 0]):
        got = _measure(model, stats, candidate, accepted)
        kl, cosine = _slow_losses(model, stats["input_ids"], candidate)
        assert got["kl"] == pytest.approx(kl, rel=1e-4, abs=1e-6) and got["kl"] > 1e-3
        assert got["cosine"] == pytest.approx(cosine, abs=1e-5)


def test_candidates_are_the_nearest_storing_sources():
    dist = torch.tensor([[0, 1, 2, 3], [1, 0, 5, 1], [2, 5, 0, 4], [3, 1, 4, 0]], dtype=torch.float64)
    assert candidate_pairs([0, 1, 2, 3], dist, 1) == [(1, 0), (2, 0), (3, 1)]
    assert candidate_pairs([0, 1, 2, 3], dist, None) == [(1, 0), (2, 0), (2, 1), (3, 1), (3, 0), (3, 2)]
    assert candidate_pairs([0, 0, 2, 3], dist, 1) == [(2, 0), (3, 0)]  # layer 1 stores nothing now


def _brute_force_greedy(model, ids, n_layers, target, objective):
    accepted = list(range(n_layers))
    for _ in range(target):
        best = None
        for i in range(n_layers):
            for j in range(i):
                if accepted[i] != i or accepted[j] != j:
                    continue
                candidate = list(accepted)
                candidate[i] = j
                candidate = resolve_chains(candidate)
                kl, cosine = _slow_losses(model, ids, candidate)
                loss = kl if objective == "kl" else 1 - cosine
                if best is None or loss < best[0] - 1e-9:
                    best = (loss, candidate)
        accepted = best[1]
    return accepted


@pytest.mark.parametrize("objective", ["kl", "cosine"])
def test_exhaustive_measured_greedy_equals_brute_force(objective):
    model = make_tiny("llama", n_layers=6)
    stats = calibrate.collect(model, _input_ids())
    dist = layer_distances(stats["keys"], stats["values"])
    evaluator = FastEvaluator(model, stats["input_ids"], stats["reference_hidden"])
    result = measured_search(dist, 3, -0.99, evaluator, OutputLoss(model, stats["reference_hidden"]), objective,
                             sources=None, refresh=None, progress=False)
    assert result["map"] == _brute_force_greedy(model, stats["input_ids"], 6, 3, objective)
    assert result["complete"] and result["num_shared"] == 3
    # every step measured every valid pair: 15 + the pairs left after each accepted one
    assert result["candidates_evaluated"] == len(result["trace"]) > 15


def _planted(n_layers=8, dead=(3, 6)):
    """A model whose layers ``dead`` have a zero attention output projection: what they attend to cannot
    change the output, so sharing exactly those layers is the one lossless policy."""
    model = make_tiny("llama", n_layers=n_layers)
    with torch.no_grad():
        for layer in dead:
            model.model.layers[layer].self_attn.o_proj.weight.zero_()
    return model


@pytest.mark.parametrize("order", ["measured-kl", "measured-cosine"])
def test_finds_a_planted_best_policy_the_paper_order_misses(order):
    model = _planted()
    stats = calibrate.collect(model, _input_ids(n=10))
    found = run_search(model, stats, SearchSettings(target=2, order=order, threshold=0.5, refresh=2), progress=False)
    assert found["map"] != list(range(8))
    assert SharingPolicy(found["map"]).shared_layers == [3, 6]
    kl, cosine = _slow_losses(model, stats["input_ids"], found["map"])
    assert kl == pytest.approx(0, abs=1e-6) and cosine == pytest.approx(1, abs=1e-6)
    paper = run_search(model, stats, SearchSettings(target=2, order="dissimilar", threshold=0.5), progress=False)
    assert SharingPolicy(paper["map"]).shared_layers != [3, 6]
    assert found["forwards"] > 0 and found["candidates_evaluated"] == len(found["trace"])


def test_lazy_refresh_measures_fewer_and_a_journal_replays_it(tmp_path):
    model = make_tiny("mistral", n_layers=8)
    stats = calibrate.collect(model, _input_ids())
    settings = SearchSettings(target=4, order="measured-kl", threshold=-0.99, sources=2, refresh=3)
    journal = tmp_path / "j.jsonl"
    first = run_journaled(model, stats, settings, journal, calibration_hash="x", progress=False)
    full = run_search(model, stats, SearchSettings(target=4, order="measured-kl", threshold=-0.99, sources=2,
                                                   refresh=None), progress=False)
    assert first["candidates_evaluated"] < full["candidates_evaluated"]
    # a search killed after 5 measurements (its last line cut mid-write) resumes to the same policy
    lines = journal.read_text().splitlines()
    journal.write_text("\n".join(lines[:6]) + "\n" + lines[6][:20])
    again = run_journaled(model, stats, settings, journal, calibration_hash="x", progress=False)
    assert again["map"] == first["map"]
    assert again["candidates_resumed"] == 5 and again["candidates_evaluated"] == first["candidates_evaluated"] - 5


def test_a_screened_loss_equals_the_slow_computation_on_those_samples():
    model = make_tiny("qwen2")
    stats = calibrate.collect(model, _input_ids())
    candidate = [0, 1, 1, 3, 4, 3, 6, 7]
    evaluator = FastEvaluator(model, stats["input_ids"], stats["reference_hidden"], batch_size=3)
    hidden = evaluator.hidden(list(range(8)), candidate, keep=False, samples=5)
    assert hidden.shape[0] == 5
    got = OutputLoss(model, stats["reference_hidden"], chunk=3)(hidden)
    kl, cosine = _slow_losses(model, stats["input_ids"][:5], candidate)
    assert got["kl"] == pytest.approx(kl, rel=1e-4, abs=1e-6) and got["kl"] > 1e-3
    assert got["cosine"] == pytest.approx(cosine, abs=1e-5)
    with pytest.raises(ValueError, match="cannot be kept"):
        evaluator.hidden(list(range(8)), candidate, keep=True, samples=5)


def test_screening_scores_new_pairs_on_few_samples_and_decides_on_all(tmp_path):
    model = _planted()
    stats = calibrate.collect(model, _input_ids(n=10))
    settings = SearchSettings(target=2, order="measured-kl", threshold=0.5, sources=None, refresh=2, screen=3)
    journal = tmp_path / "j.jsonl"
    found = run_journaled(model, stats, settings, journal, "x", progress=False)
    assert SharingPolicy(found["map"]).shared_layers == [3, 6]  # the planted lossless policy, as unscreened
    screened = [t for t in found["trace"] if t["samples"] == 3]
    full = [t for t in found["trace"] if t["samples"] is None]
    assert len(screened) == found["candidates_screened"] == 28  # step 1: every pair of 8 layers, on 3 samples
    assert len(full) == 4 and all(t["accepted"] is False for t in screened)  # refresh=2 per step, on all samples
    plain = run_search(model, stats, SearchSettings(target=2, order="measured-kl", threshold=0.5, sources=None,
                                                    refresh=2), progress=False)
    assert found["layers_computed"] < 0.6 * plain["layers_computed"]  # 3 of 10 samples for 28 of 32 candidates
    # a killed screened search resumes from its journal to the same policy
    journal.write_text("\n".join(journal.read_text().splitlines()[:11]) + "\n")
    again = run_journaled(model, stats, settings, journal, "x", progress=False)
    assert again["map"] == found["map"] and again["candidates_resumed"] == 10
    # another screen size is another search: its journal is not replayed
    other = run_journaled(model, stats, SearchSettings(**{**settings.__dict__, "screen": 4}), journal, "x", progress=False)
    assert other["candidates_resumed"] == 0


# ------------------------------------------------------------------------------------------------
# CLI: a SIGKILLed measured search resumes to the same policy; bad input
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    root = tmp_path_factory.mktemp("measured")
    model_dir = save_tiny_model(root / "tiny10", n_layers=10)
    cal = root / "cal.safetensors"
    assert cli(["calibrate", "--model", str(model_dir), "--samples", "12", "--tokens", "16", "--out", str(cal)]) == 0
    return model_dir, cal


def _args(model_dir, cal, out, *extra):
    return ["search", "--model", str(model_dir), "--calibration", str(cal), "--out", str(out), *extra]


def test_cli_measured_search_resumes_after_sigkill(calibrated, tmp_path):
    model_dir, cal = calibrated
    settings = ["--layers", "4", "--order", "measured-kl", "--sources", "0", "--refresh", "2", "--batch-size", "1"]
    reference = tmp_path / "reference.json"
    assert cli(_args(model_dir, cal, reference, *settings)) == 0
    expected = json.loads(reference.read_text())
    assert expected["settings"]["order"] == "measured-kl" and expected["num_shared"] == 4
    assert {"pair", "similarity", "kl", "loss", "accepted"} <= set(expected["trace"][0])
    assert sum(t["accepted"] for t in expected["trace"]) == 4 and expected["forwards"] > 0

    out = tmp_path / "killed.json"
    journal = Path(f"{out}.journal.jsonl")
    cmd = [sys.executable, "-m", "kvsharer", *_args(model_dir, cal, out, *settings)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if journal.exists() and len(journal.read_text().splitlines()) >= 4:  # header + 3 measurements
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the search finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    resumed = subprocess.run(cmd, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    got = json.loads(out.read_text())
    assert got["map"] == expected["map"] and got["candidates_resumed"] >= 3
    assert got["candidates_resumed"] + got["candidates_evaluated"] == len(expected["trace"])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--order", "measured-kl", "--procedure", "official"], "measures candidates with the fast procedure only"),
        (["--order", "measured-l2"], "unknown pair order 'measured-l2'"),
        (["--order", "measured-cosine", "--sources", "-1"], "--sources must be >= 0"),
        (["--order", "measured-kl", "--screen", "12"], "fewer samples than the calibration file's 12"),
        (["--order", "similar", "--screen", "4"], "--screen 4 needs a measured order"),
    ],
)
def test_bad_measured_input_fails_before_loading_a_model(calibrated, tmp_path, monkeypatch, caplog, extra, message):
    model_dir, cal = calibrated
    monkeypatch.setattr(search, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert cli(_args(model_dir, cal, tmp_path / "p.json", "--rate", "0.2", *extra)) == 2
    assert message in caplog.text


class _ScriptedModel:
    """Evaluator + loss with fixed answers per candidate map, to pin down the step logic itself."""

    def __init__(self, scores):
        self.scores, self.accepted = scores, []

    def hidden(self, accepted, candidate, keep=True):
        return tuple(candidate)

    def accept(self, candidate):
        self.accepted.append(list(candidate))

    def __call__(self, candidate):
        kl, cosine = self.scores.get(candidate, (5.0, 0.55))
        return {"kl": kl, "cosine": cosine}


def test_threshold_filters_candidates_and_the_objective_ranks_them():
    dist = torch.zeros(4, 4, dtype=torch.float64)
    scripted = _ScriptedModel({(0, 0, 2, 3): (0.1, 0.4),  # lowest KL, but below T: never taken
                               (0, 1, 1, 3): (0.2, 0.6),  # the best candidate that clears T
                               (0, 1, 2, 1): (9.0, 0.3)})
    result = measured_search(dist, 1, 0.5, scripted, scripted, "kl", sources=None, refresh=None, progress=False)
    assert result["map"] == [0, 1, 1, 3] and scripted.accepted == [[0, 1, 1, 3]]
    by_cosine = measured_search(dist, 1, 0.5, scripted, scripted, "cosine", sources=None, refresh=None, progress=False)
    assert by_cosine["map"] == [0, 1, 1, 3]  # highest cosine among those > T
    nothing = measured_search(dist, 2, 0.95, scripted, scripted, "kl", sources=None, refresh=None, progress=False)
    assert nothing["stopped"] == "threshold" and nothing["num_shared"] == 0 and not nothing["complete"]


@pytest.mark.parametrize("order", ["similar", "measured-cosine"])
def test_a_larger_target_starts_from_the_smaller_targets_journal(order, tmp_path):
    model = make_tiny("llama", n_layers=8)
    stats = calibrate.collect(model, _input_ids())
    settings = dict(order=order, threshold=-0.99, sources=2, refresh=2)
    small = run_journaled(model, stats, SearchSettings(target=2, **settings), tmp_path / "small.jsonl", "x", progress=False)
    fresh = run_journaled(model, stats, SearchSettings(target=4, **settings), None, "x", progress=False)
    chained = run_journaled(model, stats, SearchSettings(target=4, **settings), tmp_path / "big.jsonl", "x",
                            progress=False, seed_journal=tmp_path / "small.jsonl")
    assert chained["map"] == fresh["map"] and [t["pair"] for t in chained["trace"]] == [t["pair"] for t in fresh["trace"]]
    assert chained["candidates_resumed"] == len(small["trace"]) > 0
    assert chained["candidates_evaluated"] == len(fresh["trace"]) - len(small["trace"])
    # the totals count what finding the policy cost from scratch, journaled candidates included (plus the one
    # forward with which the resumed search rebuilt its state)
    assert fresh["candidate_forwards_total"] <= chained["candidate_forwards_total"] <= fresh["candidate_forwards_total"] + 1
    assert chained["forwards"] < fresh["forwards"]
    # this target's own journal, cut short (a kill before its first candidate), does not hide the longer seed
    (tmp_path / "big2.jsonl").write_text((tmp_path / "big.jsonl").read_text().splitlines()[0] + "\n")
    again = run_journaled(model, stats, SearchSettings(target=4, **settings), tmp_path / "big2.jsonl", "x",
                          progress=False, seed_journal=tmp_path / "small.jsonl")
    assert again["candidates_resumed"] == len(small["trace"]) and again["map"] == fresh["map"]
    # a journal of other settings is not taken
    other = run_journaled(model, stats, SearchSettings(target=4, **{**settings, "threshold": 0.9}), tmp_path / "o.jsonl",
                          "x", progress=False, seed_journal=tmp_path / "small.jsonl")
    assert other["candidates_resumed"] == 0


def test_lazy_step_measures_the_rest_before_stopping_on_the_threshold():
    dist = torch.arange(16, dtype=torch.float64).view(4, 4)  # nearest source: the lowest index
    # step 1 measures all 6 pairs, takes 3 -> 0 (lowest KL); step 2 re-measures the best stale one (2 -> 0),
    # which now falls below T: the others must still be measured, and 1 -> 0 clears T
    scripted = _ScriptedModel({(0, 1, 2, 0): (0.1, 0.9), (0, 1, 0, 3): (0.2, 0.9), (0, 0, 2, 3): (0.9, 0.9),
                               (0, 1, 0, 0): (0.3, 0.2), (0, 0, 2, 0): (0.5, 0.8)})
    result = measured_search(dist, 2, 0.5, scripted, scripted, "kl", sources=None, refresh=1, progress=False)
    assert result["map"] == [0, 0, 2, 0] and result["complete"]
    step2 = result["trace"][6:]
    assert step2[0]["pair"] == [2, 0] and not step2[0]["accepted"] and {(1, 0)} <= {tuple(t["pair"]) for t in step2}
