"""The report stages (tables, figures) on synthetic result files that follow the stages' formats exactly.

Two models: ``tiny`` (8 layers) with the plain model, 3 rates x 3 orders (random with 2 seeds), two
extra metrics and an extra threshold; ``other`` with the plain model and one policy searched with a
layer count (``rate_requested: null``). No torch anywhere: the stages only read JSON.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kvsharer.cli import main as cli

N_LAYERS = 8
RATES = (0.125, 0.25, 0.5)
TASKS = ("kvs_cloze", "kvs_next_sentence")
LENGTHS, DEPTHS = (64, 128), (0.0, 0.5, 1.0)
ORDER_FACTOR = {"dissimilar": 1.0, "similar": 3.0, "random": 2.0, "measured-kl": 0.5}
METRIC_FACTOR = {"euclidean": 1.0, "cosine": 1.5, "cka": 1.8}
ACCEPTED_PAIRS = [(7, 2), (6, 1), (5, 0), (4, 1)]  # (layer, source) of the k-th accepted candidate: no chains
REJECTED_PAIR = (3, 0)

# Full search traces as (rank, accepted); a search of target t walks it until t candidates are accepted, so
# a smaller rate's trace is a prefix of a larger one's (as in the real greedy search).
TRACES = {
    ("euclidean", 0.5): [(0, True), (1, False), (3, True), (4, True), (12, False), (13, True)],
    ("euclidean", 0.9): [(0, True), (1, False), (3, False), (4, False), (12, True), (13, False), (20, False), (27, False)],
    ("cosine", 0.5): [(0, True), (2, True)],
    ("cka", 0.5): [(0, False), (1, True), (2, True)],
    ("similar", 0.5): [(0, True), (1, True), (2, True), (3, True)],
    ("random", 0.5): [(0, True), (1, True), (2, True), (3, True)],
    ("measured-kl", 0.5): [(0, False), (1, True), (2, False), (3, True)],
}
SECOND_CORPUS_FACTOR = 1.7  # PPL on the further held-out corpus "docstrings" = PPL x this


def ppl_of(rate, order="dissimilar", metric="euclidean", threshold=0.5, seed=0):
    return round(10.0 * (1 + rate * ORDER_FACTOR[order] * METRIC_FACTOR[metric]) + seed * 0.37
                 + (threshold - 0.5) * 2.0, 6)


def acc_of(rate, task):
    return round(0.8 - rate * (0.4 if task == TASKS[0] else 0.2), 6)


def cell_acc(rate, length, depth):
    return round(max(0.0, 1.0 - rate * (length / 64) * (0.5 + depth)), 6)


def write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path


def make_policy(root: Path, model: str, rate, order="dissimilar", metric="euclidean", threshold=0.5, seed=0,
                layers: int | None = None) -> Path:
    target = layers if layers is not None else round(rate * N_LAYERS)
    key = (metric, threshold) if order == "dissimilar" else (order, threshold)
    trace, accepted = [], 0
    for rank, ok in TRACES[key]:
        if accepted >= target:
            break
        layer, source = ACCEPTED_PAIRS[accepted] if ok else REJECTED_PAIR
        trace.append({"rank": rank, "pair": [layer, source], "distance": 20.0 - rank, "similarity": 0.95 if ok else 0.4,
                      "accepted": ok, "seconds": 0.5})
        accepted += ok
    share_map = list(range(N_LAYERS))
    for t in trace:
        if t["accepted"]:
            share_map[t["pair"][0]] = t["pair"][1]
    n = sum(1 for i, s in enumerate(share_map) if s != i)
    name = f"r{rate:g}_{order}_{metric}_T{threshold:g}_s{seed}" if layers is None else f"l{layers}_{order}"
    return write(root / model / "policies" / f"{name}.json", {
        "map": share_map, "n_layers": N_LAYERS, "num_shared": n, "model": f"results/models/{model}",
        "rate": n / N_LAYERS, "rate_requested": None if layers is not None else rate, "complete": n >= target,
        "target": target, "trace": trace, "candidates_evaluated": len(trace), "candidates_resumed": 0,
        "pairs_skipped": 1, "pairs_total": 28, "seconds": 0.5 * len(trace) + 0.25,
        "seconds_per_candidate": (0.5 * len(trace) + 0.25) / max(len(trace), 1), "layers_computed": 100,
        "forwards": 2.5 * len(trace),
        "settings": {"target": target, "threshold": threshold, "order": order, "metric": metric, "seed": seed,
                     "procedure": "fast", "batch_size": None},
        "calibration": f"results/{model}/calibration.safetensors", "calibration_sha256": "ab" * 32,
    })


def _common(model: str, policy: Path | None) -> dict:
    data = json.loads(policy.read_text()) if policy else None
    share_map = data["map"] if data else list(range(N_LAYERS))
    shared = [i for i, s in enumerate(share_map) if s != i]
    # the policy path as the evaluation stage got it: not normalized (joined by normpath)
    given = None if policy is None else str(policy.parent / ".." / "policies" / policy.name)
    return {"model": f"results/models/{model}", "policy": given, "map": share_map,
            "rate": len(shared) / N_LAYERS, "num_shared": len(shared), "shared_layers": shared, "seconds": 1.0}


def kv_of(rate: float, cache: str | None) -> float:
    """The KV fraction a synthetic setting holds: sharing x the cache method's own factor."""
    factor = {None: 1.0, "h2o:0.5": 0.5, "int4": 0.3125, "int8": 0.5625}.get(cache)
    if cache and cache.startswith("minicache"):
        factor = 1 - float(cache.split(":")[1]) + 0.03  # merged pairs plus some retained tokens
    return (1 - rate) * factor


def make_evals(root: Path, model: str, policy: Path | None, rate: float, ppl: float, full: bool,
               cache: str | None = None, harness: bool | None = None) -> list[Path]:
    name = (policy.stem if policy else "plain") + (f"+{cache.replace(':', '-')}" if cache else "")
    family = None if cache is None else "quant" if cache.startswith("int") else "minicache" if "minicache" in cache else "intra"
    setting = {"cache": cache, "cache_family": family, "chunk": 32 if cache else None}
    out = [write(root / model / "eval" / name / "ppl.json", {
        "stage": "evaluate-ppl", **_common(model, policy), **setting, "ppl": ppl, "nll_mean": float(np.log(ppl)),
        "tokens_scored": 1000, "windows": 2, "window": 512, "kv_fraction": kv_of(rate, cache),
        "kv_bytes": round(1e6 * kv_of(rate, cache))})]
    if harness or (harness is None and full):
        out.append(write(root / model / "eval" / name / "harness.json", {
            "stage": "evaluate-harness", **_common(model, policy), **setting,
            "tasks": {t: {"acc": acc_of(rate, t) - (0.1 if cache else 0), "acc_stderr": 0.05, "acc_norm": 0.5,
                          "acc_norm_stderr": 0.05, "samples": 20, "samples_total": 433} for t in TASKS}}))
    if full:
        factor = 0.5 if cache else 1.0
        cells = [{"length": n, "depth": d, "trials": 4, "correct": round(4 * factor * cell_acc(rate, n, d)),
                  "accuracy": factor * cell_acc(rate, n, d)} for n in LENGTHS for d in DEPTHS]
        out.append(write(root / model / "eval" / name / "longctx.json", {
            "stage": "evaluate-longctx", **_common(model, policy), **setting, "accuracy": factor * passkey_of(rate),
            "correct": 0, "trials_total": 24, "cells": cells}))
    return out


def passkey_of(rate):
    return float(np.mean([cell_acc(rate, n, d) for n in LENGTHS for d in DEPTHS]))


def make_distances(root: Path, model: str, metric: str, n: int = N_LAYERS) -> Path:
    rng = np.random.default_rng(len(metric))
    m = rng.uniform(1, 20, (n, n))
    m = (m + m.T) / 2
    np.fill_diagonal(m, 0.0)
    return write(root / model / "distances" / f"{metric}.json", {
        "metric": metric, "model": f"results/models/{model}", "n_layers": n, "matrix": m.tolist(),
        "ranking_dissimilar": [[i, j, m[i, j]] for i in range(n) for j in range(i)]})


@pytest.fixture
def inputs(tmp_path):
    return build_inputs(tmp_path)


def build_inputs(tmp_path: Path) -> dict:
    """Synthetic results: {"policies": [...], "evals": [...], "distances": [...], "main": {rate: path}}."""
    root = tmp_path / "results"
    policies, evals, main = [], [], {}
    evals += make_evals(root, "tiny", None, 0.0, ppl_of(0.0), full=True)
    for rate in RATES:
        for order in ("dissimilar", "similar", "random"):
            for seed in ((0, 1) if order == "random" else (0,)):
                p = make_policy(root, "tiny", rate, order, seed=seed)
                policies.append(p)
                dissimilar = order == "dissimilar"
                evals += make_evals(root, "tiny", p, rate, ppl_of(rate, order, seed=seed), full=dissimilar)
                if dissimilar:
                    main[rate] = p
    for metric in ("cosine", "cka"):
        p = make_policy(root, "tiny", 0.25, metric=metric)
        policies.append(p)
        evals += make_evals(root, "tiny", p, 0.25, ppl_of(0.25, metric=metric), full=False)
    for rate in (0.25, 0.5):
        p = make_policy(root, "tiny", rate, threshold=0.9)
        policies.append(p)
        evals += make_evals(root, "tiny", p, rate, ppl_of(rate, threshold=0.9), full=False)
    # model "other": a search given a layer count (rate_requested null -> target / n_layers = 25 %)
    p = make_policy(root, "other", 0.25, layers=2)
    policies.append(p)
    evals += make_evals(root, "other", None, 0.0, 11.0, full=False)
    evals += make_evals(root, "other", p, 0.25, 13.0, full=False)
    distances = [make_distances(root, "tiny", "euclidean"), make_distances(root, "tiny", "cosine"),
                 make_distances(root, "other", "euclidean")]
    # compositions on "tiny": H2O (all three stages) and int4/int8 with and without 25 % sharing, MiniCache
    for cache in ("h2o:0.5", "int4", "int8"):
        for rate, policy in ((0.0, None), (0.25, main[0.25])):
            ppl = ppl_of(rate) * (1.5 if cache == "h2o:0.5" else 1.2 if cache == "int4" else 1.01)
            evals += make_evals(root, "tiny", policy, rate, ppl, full=cache == "h2o:0.5", cache=cache, harness=True)
    for rate in (0.125, 0.25):
        evals += make_evals(root, "tiny", None, 0.0, ppl_of(rate) * 2, full=False, cache=f"minicache:{rate:g}", harness=True)
    # the measured order at two rates, and PPL on a further held-out corpus for the plain model, the
    # dissimilar and measured policies and MiniCache at 25 %
    for rate in (0.125, 0.25):
        p = make_policy(root, "tiny", rate, "measured-kl")
        policies.append(p)
        evals += make_evals(root, "tiny", p, rate, ppl_of(rate, "measured-kl"), full=False)
    for name, policy, ppl, cache in (("plain", None, ppl_of(0.0), None),
                                     ("r0.25_dissimilar_euclidean_T0.5_s0", main[0.25], ppl_of(0.25), None),
                                     ("r0.25_measured-kl_euclidean_T0.5_s0", policies[-1], ppl_of(0.25, "measured-kl"), None),
                                     ("plain+minicache-0.25", None, ppl_of(0.25) * 2, "minicache:0.25")):
        evals.append(write(root / "tiny" / "eval" / name / "ppl_docstrings.json", {
            "stage": "evaluate-ppl", **_common("tiny", policy), "cache": cache, "corpus": "docstrings",
            "cache_family": "minicache" if cache else None, "ppl": ppl * SECOND_CORPUS_FACTOR,
            "kv_fraction": kv_of(0.25 if policy else 0.0, cache)}))
    profile = root / "tiny" / "profile.csv"
    rows = [{"model": "tiny", "rate": r, "intra": "none" if c == "none" else c.split(":")[0], "budget": "" if c == "none" else 0.5,
             "batch": b, "context": 32, "kv_bytes": 1000 * b * (1 - r), "expected_kv_bytes": 1000 * b * (1 - r), "peak_bytes": 10**6 * b * (2 - r),
             "prefill_s": 0.1, "decode_tok_s": 100.0 * b * (1 + r), "kind": "grid", "cache": c}
            for r in (0.0, 0.25) for c in ("none", "h2o:0.5") for b in (1, 4)]
    pd.DataFrame(rows).to_csv(profile, index=False)
    return {"policies": policies, "evals": evals, "distances": distances, "main": main, "root": root,
            "profile": profile}


def args_for(stage: str, inputs: dict, out: Path, with_distances: bool = True) -> list[str]:
    argv = [stage, "--policies", *map(str, inputs["policies"]), "--evals", *map(str, inputs["evals"]),
            "--profile", str(inputs["profile"])]
    if stage == "figures" and with_distances:
        argv += ["--distances", *map(str, inputs["distances"])]
    return argv + ["--out-dir", str(out)]


TABLES = ("ppl_vs_rate", "table1", "order_ablation", "metric_ablation", "threshold_ablation", "acceptance_by_rank", "search_cost",
          "table2_compose", "quantization", "minicache", "search_procedures")
FIGURES = ("ppl_vs_rate", "order_ablation", "distance_heatmap", "acceptance_vs_rank", "threshold_ablation", "metric_ablation", "passkey",
           "search_scaling", "profile_memory", "profile_throughput", "compose", "quantization", "minicache", "niah")


def read(out: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(out / f"{name}.csv")


# ------------------------------------------------------------------------------------------------
# tables
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def tables(inputs, tmp_path):
    out = tmp_path / "tables"
    assert cli(args_for("tables", inputs, out)) == 0
    return out


def test_tables_files(tables):
    assert sorted(p.name for p in tables.iterdir()) == sorted(f"{t}.{x}" for t in TABLES for x in ("csv", "md"))


def test_table1_holds_the_inputs(tables):
    t1 = read(tables, "table1")
    tiny = t1[t1["model"] == "tiny"].set_index("rate_pct")
    assert list(tiny.index) == [0.0, 12.5, 25.0, 50.0]
    assert list(tiny["layers_shared"]) == [0, 1, 2, 4]
    for rate in (0.0, *RATES):
        row = tiny.loc[rate * 100]
        assert row["ppl"] == ppl_of(rate)
        for task in TASKS:
            assert row[f"{task} (acc)"] == acc_of(rate, task)
        assert row["passkey"] == pytest.approx(passkey_of(rate), rel=1e-12)
        mean = np.mean([acc_of(rate, t) for t in TASKS] + [passkey_of(rate)])
        assert row["mean_score"] == pytest.approx(mean, rel=1e-12)
        plain_mean = np.mean([acc_of(0.0, t) for t in TASKS] + [passkey_of(0.0)])
        assert row["pct_of_plain"] == pytest.approx(mean / plain_mean * 100, rel=1e-12)
    # "other": rate from target / n_layers; no harness/passkey results -> no mean score
    other = t1[t1["model"] == "other"]
    assert list(other["rate_pct"]) == [0.0, 25.0] and list(other["ppl"]) == [11.0, 13.0]
    assert other["mean_score"].isna().all() and other["pct_of_plain"].isna().all()
    md = (tables / "table1.md").read_text()
    assert "% of plain" in md and "| tiny" in md


def test_table2_composes_sharing_and_token_methods_with_the_profile(tables):
    t = read(tables, "table2_compose")
    assert list(zip(t["rate_pct"], t["cache"])) == [(0, "none"), (0, "h2o:0.5"), (25, "none"), (25, "h2o:0.5")]
    assert list(t["kv_pct"]) == pytest.approx([100, 50, 75, 37.5])
    assert list(t["ppl"]) == pytest.approx([ppl_of(0), ppl_of(0) * 1.5, ppl_of(0.25), ppl_of(0.25) * 1.5])
    # profile: the largest batch (4) measured for that rate and method
    assert list(t["profile_batch"]) == [4, 4, 4, 4]
    assert list(t["decode_tok_s"]) == pytest.approx([400, 400, 500, 500])
    assert list(t["peak_mb"]) == pytest.approx([8e6 / 2**20, 8e6 / 2**20, 7e6 / 2**20, 7e6 / 2**20])
    plain_acc = np.mean([acc_of(0, task) for task in TASKS])
    assert t["mean_acc"][0] == pytest.approx(plain_acc) and t["mean_acc"][1] == pytest.approx(plain_acc - 0.1)
    assert t["passkey"][3] == pytest.approx(0.5 * passkey_of(0.25))


def test_quantization_table_total_compression(tables):
    q = read(tables, "quantization")
    assert list(zip(q["rate_pct"], q["kv_bits"])) == [(0, 16), (0, 8), (0, 4), (25, 16), (25, 8), (25, 4)]
    assert list(q["compression"]) == pytest.approx([1, 1 / 0.5625, 1 / 0.3125, 1 / 0.75, 1 / (0.75 * 0.5625),
                                                    1 / (0.75 * 0.3125)])


def test_minicache_sits_next_to_kvsharer_at_the_same_rate(tables):
    m = read(tables, "minicache")
    pairs = m[m["rate_pct"] == 25].set_index("method")
    assert set(pairs.index) == {"KVSharer", "MiniCache"}
    assert pairs.loc["KVSharer", "ppl"] == pytest.approx(ppl_of(0.25))
    assert pairs.loc["MiniCache", "ppl"] == pytest.approx(ppl_of(0.25) * 2)
    assert pairs.loc["MiniCache", "kv_pct"] == pytest.approx(78)
    assert list(m[m["method"] == "plain"]["rate_pct"]) == [0]


def test_composed_results_stay_out_of_table1(tables):
    t1 = read(tables, "table1")
    assert t1[t1["model"] == "tiny"]["ppl"].iloc[0] == pytest.approx(ppl_of(0.0))  # not the H2O run


def test_headline_shows_the_papers_order_and_ours_against_the_plain_model(tables):
    """ppl_vs_rate: the dissimilar and measured orders (not the controls), each as a multiple of plain's PPL, the plain
    model first; the other model's search by layer count sits at its rate."""
    t = read(tables, "ppl_vs_rate")
    assert list(t.columns) == ["model", "rate_pct", "ppl:dissimilar", "ppl:measured-kl", "x_plain:dissimilar",
                               "x_plain:measured-kl"]
    tiny = t[t["model"] == "tiny"].set_index("rate_pct")
    assert list(tiny.index) == [0.0, 12.5, 25.0, 50.0]
    assert tiny.loc[0.0, "ppl:dissimilar"] == ppl_of(0.0) and tiny.loc[0.0, "x_plain:measured-kl"] == 1
    for rate in RATES:
        assert tiny.loc[rate * 100, "ppl:dissimilar"] == ppl_of(rate)
        assert tiny.loc[rate * 100, "x_plain:dissimilar"] == pytest.approx(ppl_of(rate) / ppl_of(0.0))
    assert tiny.loc[25.0, "ppl:measured-kl"] == ppl_of(0.25, "measured-kl") and np.isnan(tiny.loc[50.0, "ppl:measured-kl"])
    other = t[t["model"] == "other"].set_index("rate_pct")
    assert other.loc[25.0, "x_plain:dissimilar"] == pytest.approx(13.0 / 11.0)


def test_headline_figure_draws_the_papers_order_and_ours_the_ablation_every_order(inputs):
    import matplotlib.pyplot as plt

    from kvsharer.report.collect import collect
    from kvsharer.report.figures import build_figures

    makers = build_figures(collect(inputs["policies"], inputs["evals"]), [])
    for name, orders in (("ppl_vs_rate", {"dissimilar", "measured-kl"}),
                         ("order_ablation", {"dissimilar", "similar", "random", "measured-kl"})):
        fig = makers[name]()
        ax = next(ax for ax in fig.axes if ax.get_title().startswith("tiny"))
        shown = {t.get_text() for t in ax.get_legend().get_texts()} - {"order", "plain model"}
        assert shown == orders, (name, shown)
        plt.close(fig)


def test_order_ablation_random_mean_std(tables):
    t = read(tables, "order_ablation").set_index("rate_pct")
    assert list(t.index) == [12.5, 25.0, 50.0] and set(t["model"]) == {"tiny"}
    for rate in RATES:
        row = t.loc[rate * 100]
        seeds = [ppl_of(rate, "random", seed=s) for s in (0, 1)]
        assert row["ppl:dissimilar"] == ppl_of(rate)
        assert row["ppl:similar"] == ppl_of(rate, "similar")
        assert row["ppl:random_mean"] == pytest.approx(np.mean(seeds), rel=1e-12)
        assert row["ppl:random_std"] == pytest.approx(np.std(seeds, ddof=1), rel=1e-12)
        assert row["random_seeds"] == 2


def test_metric_and_threshold_ablation(tables):
    m = read(tables, "metric_ablation")
    assert len(m) == 1 and m.loc[0, "rate_pct"] == 25.0
    for metric in ("euclidean", "cosine", "cka"):
        assert m.loc[0, f"ppl:{metric}"] == ppl_of(0.25, metric=metric)
    t = read(tables, "threshold_ablation")
    assert list(zip(t["rate_pct"], t["threshold"])) == [(25.0, 0.5), (25.0, 0.9), (50.0, 0.5), (50.0, 0.9)]
    assert list(t["layers_shared"]) == [2, 2, 4, 2]
    assert list(t["complete"]) == [True, True, True, False]
    assert list(t["candidates_evaluated"]) == [3, 5, 6, 8]
    assert list(t["ppl"]) == [ppl_of(0.25), ppl_of(0.25, threshold=0.9), ppl_of(0.5), ppl_of(0.5, threshold=0.9)]


def test_acceptance_by_rank_counts_each_rank_once(tables):
    a = read(tables, "acceptance_by_rank")
    euc = a[a["metric"] == "euclidean"]
    got = {(r.threshold, r.rank_lo): (r.candidates, r.accepted, r.accepted_fraction) for r in euc.itertuples()}
    # T=0.5: ranks 0 1 3 4 | 12 13 with accepted 1 0 1 1 | 0 1; the 12.5 % and 25 % traces are prefixes
    # T=0.9: ranks 0 1 3 4 | 12 13 | 20 27 with accepted 1 0 0 0 | 1 0 | 0 0
    assert got == {(0.5, 0): (4, 3, 0.75), (0.5, 10): (2, 1, 0.5),
                   (0.9, 0): (4, 1, 0.25), (0.9, 10): (2, 1, 0.5), (0.9, 20): (2, 0, 0.0)}
    assert set(a["metric"]) == {"euclidean", "cosine", "cka"}  # similar/random orders are not in it
    assert list(a.loc[a["metric"] == "cka", "accepted_fraction"]) == [pytest.approx(2 / 3)]


def test_search_cost(tables, inputs):
    s = read(tables, "search_cost")
    assert len(s) == len(inputs["policies"])
    for path in inputs["policies"]:
        data = json.loads(path.read_text())
        row = s[s["policy"] == path.stem].iloc[0]
        assert row["candidates_evaluated"] == data["candidates_evaluated"]
        assert row["seconds"] == data["seconds"]
        assert row["seconds_per_candidate"] == pytest.approx(data["seconds_per_candidate"], rel=1e-12)
        assert row["forwards"] == data["forwards"]


def test_search_procedures_compare_orders_measured_search_and_minicache(tables):
    t = read(tables, "search_procedures")
    tiny = t[t["model"] == "tiny"]
    at25 = tiny[tiny["rate_pct"] == 25.0].set_index("method")
    assert list(at25.index) == ["dissimilar", "similar", "random (mean of 2)", "measured-kl", "MiniCache"]
    assert at25.loc["measured-kl", "ppl"] == ppl_of(0.25, "measured-kl")
    assert at25.loc["random (mean of 2)", "ppl"] == pytest.approx((ppl_of(0.25, "random") + ppl_of(0.25, "random", seed=1)) / 2)
    # the further corpus where it was evaluated, empty where not
    assert at25.loc["measured-kl", "ppl:docstrings"] == pytest.approx(ppl_of(0.25, "measured-kl") * SECOND_CORPUS_FACTOR)
    assert at25.loc["MiniCache", "ppl:docstrings"] == pytest.approx(ppl_of(0.25) * 2 * SECOND_CORPUS_FACTOR)
    assert math.isnan(at25.loc["similar", "ppl:docstrings"])
    # tasks and passkey where they ran (the dissimilar policies here)
    assert at25.loc["dissimilar", "mean_acc"] == pytest.approx(np.mean([acc_of(0.25, t) for t in TASKS]))
    assert at25.loc["dissimilar", "passkey"] == pytest.approx(passkey_of(0.25))
    assert math.isnan(at25.loc["similar", "passkey"])
    # KV held: sharing 2 of 8 layers holds 75 %; MiniCache what its evaluation measured
    assert at25.loc["measured-kl", "kv_pct"] == pytest.approx(75.0)
    assert at25.loc["MiniCache", "kv_pct"] == pytest.approx(kv_of(0.0, "minicache:0.25") * 100)
    # search cost: the measured policy's trace has 4 candidates (forwards = 2.5 per candidate here)
    assert at25.loc["measured-kl", "candidates"] == 4 and at25.loc["measured-kl", "forwards"] == 10.0
    assert math.isnan(at25.loc["MiniCache", "candidates"]) and math.isnan(at25.loc["MiniCache", "layers_shared"])
    plain_row = tiny[tiny["method"] == "plain"]
    assert list(plain_row["rate_pct"]) == [0.0] and list(plain_row["ppl:docstrings"]) == [ppl_of(0.0) * SECOND_CORPUS_FACTOR]
    assert set(t["rate_pct"]) >= {12.5, 25.0, 50.0}


def test_missing_ablations_give_header_only_tables(inputs, tmp_path):
    main = [inputs["main"][r] for r in RATES]
    keep = {str(p) for p in main}
    evals = [e for e in inputs["evals"] if e.parent.name in {"plain"} | {p.stem for p in main} and "tiny" in e.parts]
    out = tmp_path / "few"
    assert cli(["tables", "--policies", *keep, "--evals", *map(str, evals), "--out-dir", str(out)]) == 0
    assert len(read(out, "table1")) == 4
    for name, first in (("order_ablation", "model,rate_pct,ppl:dissimilar,ppl:similar,ppl:random_mean"),
                        ("metric_ablation", "model,rate_pct,ppl:euclidean,ppl:cosine,ppl:cka"),
                        ("threshold_ablation", "model,rate_pct,threshold,target,layers_shared")):
        lines = (out / f"{name}.csv").read_text().splitlines()
        assert len(lines) == 1 and lines[0].startswith(first), lines
        assert read(out, name).empty
        md = (out / f"{name}.md").read_text().splitlines()
        assert len(md) == 2 and md[0].startswith("| model")
    # nothing at all: still every file, header only
    out = tmp_path / "none"
    assert cli(["tables", "--policies", "--evals", "--out-dir", str(out)]) == 0
    assert all(read(out, t).empty for t in TABLES)


def test_markdown_without_tabulate(monkeypatch):
    from kvsharer.report import tables

    frame = pd.DataFrame({"model": ["a|b"], "rate_pct": [25.0], "ppl": [12.345678], "complete": [True]})
    with_tabulate = tables.markdown(frame)
    monkeypatch.setattr(tables.importlib.util, "find_spec", lambda name: None)
    plain = tables.markdown(frame)
    assert plain.splitlines() == ["| model | rate (%) | PPL | complete |", "|---|---:|---:|---|",
                                  "| a\\|b | 25 | 12.3457 | yes |"]
    assert "12.3457" in with_tabulate and "rate (%)" in with_tabulate


# ------------------------------------------------------------------------------------------------
# figures
# ------------------------------------------------------------------------------------------------


def assert_figures(out: Path) -> None:
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{f}.{x}" for f in FIGURES for x in ("png", "pdf"))
    for name in FIGURES:
        png, pdf = (out / f"{name}.png").read_bytes(), (out / f"{name}.pdf").read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 2000, name
        assert pdf.startswith(b"%PDF") and len(pdf) > 1000, name


def test_figures(inputs, tmp_path, caplog):
    out = tmp_path / "figures"
    caplog.set_level("INFO", logger="kvsharer")
    assert cli(args_for("figures", inputs, out)) == 0
    assert_figures(out)
    # every figure has data except the one of the stage these synthetic inputs lack (search-scaling)
    lacking = ("search_scaling",)
    assert caplog.text.count("no data") == len(lacking)
    assert all(f"figure {name} (no data" in caplog.text for name in lacking)


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_figures_read_at_a_glance(inputs):
    """Bytes in kB/MB/GB without a 1e9 offset; every legend outside the data area of every axes, each
    label once; the profile figures share one legend (with the model-shape crosses) instead of one per panel."""
    import matplotlib.pyplot as plt

    from kvsharer.report.collect import collect
    from kvsharer.report.figures import build_figures
    from kvsharer.report.tables import read_profiles

    profile = read_profiles([inputs["profile"]])
    big = profile.assign(kv_bytes=profile["kv_bytes"] * 10**6, expected_kv_bytes=profile["expected_kv_bytes"] * 10**6)
    makers = build_figures(collect(inputs["policies"], inputs["evals"]), [], profile=big)
    for name in ("ppl_vs_rate", "compose", "quantization", "minicache", "threshold_ablation", "profile_memory",
                 "profile_throughput"):
        fig = makers[name]()
        fig.tight_layout()  # as figures.save does before writing the files
        fig.canvas.draw()
        axes = [ax for ax in fig.axes if ax.get_visible()]
        legends = [ax.get_legend() for ax in axes if ax.get_legend() is not None] + list(fig.legends)
        assert legends, name
        for legend in legends:
            labels = [t.get_text() for t in legend.get_texts()]
            assert len(labels) == len(set(labels)), (name, labels)
            box = legend.get_window_extent()
            assert not any(_overlaps(box, ax.get_window_extent()) for ax in axes), name
        if name.startswith("profile"):
            assert len(fig.legends) == 1 and not any(ax.get_legend() for ax in axes)
            labels = [t.get_text() for t in fig.legends[0].get_texts()]
            # the fixture's two methods hold the same bytes and speed: the legend says the first is drawn under
            assert labels[:2] == ["sharing only (= + h2o:0.5)", "+ h2o:0.5"]
            assert ("from the model shape" in labels) == (name == "profile_memory")
        if name == "profile_memory":  # 1e9 .. 4e9 bytes
            for ax in axes:
                assert ax.yaxis.get_offset_text().get_text() == ""
                ticks = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
                assert ticks and all(t.endswith(" GB") for t in ticks), ticks
        plt.close(fig)


def test_figures_without_inputs_still_write_every_file(tmp_path, caplog):
    out = tmp_path / "figures"
    caplog.set_level("INFO", logger="kvsharer")
    assert cli(["figures", "--policies", "--evals", "--distances", "--out-dir", str(out)]) == 0
    assert_figures(out)
    assert caplog.text.count("no data") == len(FIGURES)


def test_heatmap_marks_largest_main_rate_up_to_25(inputs):
    from kvsharer.report.collect import collect, results_frame
    from kvsharer.report.figures import main_policy

    results = results_frame(collect(inputs["policies"], inputs["evals"]))
    assert main_policy(results, "tiny", "euclidean", 0.5, 0.25)["policy"] == inputs["main"][0.25].stem
    assert main_policy(results, "tiny", "euclidean", 0.5, 0.3)["policy"] == inputs["main"][0.25].stem
    assert main_policy(results, "tiny", "euclidean", 0.5, 0.2)["policy"] == inputs["main"][0.125].stem
    assert main_policy(results, "tiny", "euclidean", 0.5, 0.1)["policy"] == inputs["main"][0.125].stem  # smallest
    assert main_policy(results, "other", "euclidean", 0.5, 0.25)["policy"] == "l2_dissimilar"


# ------------------------------------------------------------------------------------------------
# bad input, no torch
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["tables", "figures"])
def test_eval_of_a_policy_not_given(inputs, tmp_path, caplog, stage):
    missing = inputs["main"][0.25]
    inputs["policies"] = [p for p in inputs["policies"] if p != missing]
    assert cli(args_for(stage, inputs, tmp_path / "out")) == 2
    assert "was run with policy" in caplog.text and missing.name in caplog.text
    assert "not among the --policies files" in caplog.text
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("stage", ["tables", "figures"])
def test_unreadable_json(inputs, tmp_path, caplog, stage):
    inputs["evals"][3].write_text('{"stage": "evaluate-ppl", ')
    assert cli(args_for(stage, inputs, tmp_path / "out")) == 2
    assert f"evaluation file {inputs['evals'][3]} is not valid JSON" in caplog.text


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("duplicate", "two evaluate-ppl results for model 'tiny'"),
    ("stale", "used a different map than its policy"),
    ("stage", "has stage 'search'"),
    ("no-ppl", "needs a numeric 'ppl'"),
    ("distances", "'matrix' must be a square"),
    ("rank-bin", "--rank-bin must be at least 1"),
])
def test_bad_input(inputs, tmp_path, caplog, case, message):
    argv = args_for("figures", inputs, tmp_path / "out")
    ppl_file = next(e for e in inputs["evals"] if e.name == "ppl.json" and "r0.25_dissimilar_euclidean_T0.5" in str(e))
    data = json.loads(ppl_file.read_text())
    if case == "missing":
        argv[argv.index("--evals") + 1] = str(tmp_path / "nope.json")
    elif case == "duplicate":
        copy = write(tmp_path / "copy" / "ppl.json", data)
        argv.insert(argv.index("--evals") + 1, str(copy))
    elif case == "stale":
        write(ppl_file, {**data, "map": list(range(N_LAYERS))})
    elif case == "stage":
        write(ppl_file, {**data, "stage": "search"})
    elif case == "no-ppl":
        write(ppl_file, {k: v for k, v in data.items() if k != "ppl"})
    elif case == "distances":
        write(inputs["distances"][0], {"metric": "euclidean", "model": "results/models/tiny", "matrix": [[0, 1]]})
    elif case == "rank-bin":
        argv += ["--rank-bin", "0"]
    assert cli(argv) == 2
    assert message in caplog.text


def test_no_torch(inputs, tmp_path):
    """Both stages, run through the CLI in a fresh interpreter, never import torch or transformers."""
    code = (
        "import json, sys\n"
        "from kvsharer.cli import main\n"
        f"rc = [main({args_for('tables', inputs, tmp_path / 't')!r}), main({args_for('figures', inputs, tmp_path / 'f')!r})]\n"
        "import kvsharer.report.collect, kvsharer.report.tables, kvsharer.report.figures\n"
        "print(json.dumps({'rc': rc, 'loaded': sorted(m for m in ('torch', 'transformers') if m in sys.modules)}))\n"
    )
    env = {**os.environ, "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"rc": [0, 0], "loaded": []}, proc.stderr


# ------------------------------------------------------------------------------------------------
# benchmarks as the paper reports them: groups by their aggregate, generation tasks by their metric
# ------------------------------------------------------------------------------------------------

MMLU_SUBJECTS = ("mmlu_anatomy", "mmlu_astronomy", "mmlu_college_physics", "mmlu_econometrics", "mmlu_virology")


def lm_eval_like_harness(root: Path, model: str, policy: Path | None, rate: float) -> Path:
    """A harness result as evaluate-harness writes it for hellaswag, mmlu (a group) and xsum (generation):
    lm-eval's ``results`` hold every subject of mmlu and its category subgroup besides the group itself."""
    subjects = {s: 0.3 + 0.1 * k - rate / 10 for k, s in enumerate(MMLU_SUBJECTS)}
    group_acc = 0.47 - rate / 10  # lm-eval's size-weighted aggregate: not the plain mean of the subjects
    tasks = {"hellaswag": {"acc": 0.6 - rate / 5, "acc_norm": 0.7}, "mmlu": {"acc": group_acc},
             "mmlu_stem": {"acc": 0.44}, **{s: {"acc": a} for s, a in subjects.items()},
             "xsum": {"rouge": 0.21 - rate / 20, "rouge_stderr": 0.01}}
    scores = {
        "hellaswag": {"metric": "acc", "label": "acc", "value": tasks["hellaswag"]["acc"], "kind": "task"},
        "mmlu": {"metric": "acc", "label": "acc", "value": group_acc, "kind": "group", "subtasks": len(subjects)},
        "xsum": {"metric": "rouge", "label": "rougeL", "value": tasks["xsum"]["rouge"], "kind": "task"},
    }
    name = policy.stem if policy else "plain"
    return write(root / model / "eval" / name / "harness.json", {
        "stage": "evaluate-harness", **_common(model, policy), "cache": None, "cache_family": None, "chunk": None,
        "tasks": tasks, "scores": scores, "requested": ["hellaswag", "mmlu", "xsum"]})


def test_table1_reports_groups_by_their_aggregate_and_generation_tasks_by_their_metric(tmp_path):
    root = tmp_path / "results"
    policy = make_policy(root, "bench", 0.25)
    evals = [lm_eval_like_harness(root, "bench", None, 0.0), lm_eval_like_harness(root, "bench", policy, 0.25)]
    evals += make_evals(root, "bench", None, 0.0, 10.0, full=False) + make_evals(root, "bench", policy, 0.25, 12.0,
                                                                                 full=False)
    out = tmp_path / "tables"
    assert cli(["tables", "--policies", str(policy), "--evals", *map(str, evals), "--out-dir", str(out)]) == 0
    t1 = read(out, "table1").set_index("rate_pct")
    scores = ["hellaswag (acc)", "mmlu (acc, group)", "xsum (rougeL)"]
    # one column per benchmark, named by its metric; no subject or subgroup of mmlu as a benchmark of its own
    assert [c for c in t1.columns if "(" in c] == scores
    assert not any(c.startswith(("mmlu_", "acc:")) for c in t1.columns)
    for rate in (0.0, 25.0):
        r = rate / 100
        assert t1.loc[rate, "mmlu (acc, group)"] == pytest.approx(0.47 - r / 10)  # the group's aggregate
        assert t1.loc[rate, "xsum (rougeL)"] == pytest.approx(0.21 - r / 20)  # not dropped
        assert t1.loc[rate, "mean_score"] == pytest.approx(np.mean([0.6 - r / 5, 0.47 - r / 10, 0.21 - r / 20]))
    md = (out / "table1.md").read_text()
    assert "mmlu (acc, group)" in md and "xsum (rougeL)" in md


def test_harness_results_written_before_scores_keep_their_requested_names(tmp_path):
    """Older harness files (no ``scores``): the requested names' ``acc``, the group's aggregate included."""
    root = tmp_path / "results"
    path = lm_eval_like_harness(root, "bench", None, 0.0)
    data = json.loads(path.read_text())
    del data["scores"]
    write(path, {**data, "requested": ["hellaswag", "mmlu"]})
    out = tmp_path / "tables"
    assert cli(["tables", "--evals", str(path), *map(str, make_evals(root, "bench", None, 0.0, 10.0, full=False)),
                "--out-dir", str(out)]) == 0
    t1 = read(out, "table1")
    assert [c for c in t1.columns if "(" in c] == ["hellaswag (acc)", "mmlu (acc)"]
    assert t1.loc[0, "mmlu (acc)"] == pytest.approx(0.47)


def test_ruler_results_beside_the_benchmarks_add_their_columns(tmp_path):
    """A setting's RULER result (evaluation.ruler: a second evaluate-harness file, ruler.json) and its benchmark
    result are both read: RULER's tasks become columns named by their metric; the same file twice is an error."""
    root = tmp_path / "results"
    policy = make_policy(root, "bench", 0.25)
    evals = [lm_eval_like_harness(root, "bench", p, r) for p, r in ((None, 0.0), (policy, 0.25))]
    for p, score in ((None, 0.9), (policy, 0.5)):
        evals.append(write(root / "bench" / "eval" / (p.stem if p else "plain") / "ruler.json", {
            "stage": "evaluate-harness", **_common("bench", p), "cache": None, "cache_family": None, "chunk": None,
            "tasks": {"niah_single_1": {"metric": "string_match_all", "score": score, "samples": 4}},
            "scores": {"niah_single_1": {"metric": "string_match_all", "label": "string_match_all", "value": score,
                                         "stderr": None, "kind": "task", "subtasks": 0}},
            "requested": ["niah_single_1"], "max_seq_lengths": [256, 512]}))
    evals += make_evals(root, "bench", None, 0.0, 10.0, full=False) + make_evals(root, "bench", policy, 0.25, 12.0,
                                                                                 full=False)
    out = tmp_path / "tables"
    assert cli(["tables", "--policies", str(policy), "--evals", *map(str, evals), "--out-dir", str(out)]) == 0
    t1 = read(out, "table1").set_index("rate_pct")
    assert t1.loc[0.0, "niah_single_1 (string_match_all)"] == 0.9 and t1.loc[25.0, "niah_single_1 (string_match_all)"] == 0.5
    assert t1.loc[25.0, "hellaswag (acc)"] == pytest.approx(0.55)
    assert cli(["tables", "--policies", str(policy), "--evals", *map(str, evals), str(evals[-1]),
                "--out-dir", str(out)]) == 2  # the same result twice


def test_niah_panel_of_a_setting_a_model_did_not_run_says_so():
    """InternLM2 in the paper config runs no token methods: its H2O panels are empty and say why."""
    from kvsharer.report.figures import fig_niah

    cells = pd.DataFrame([
        dict(model=model, policy_path=None, order=None, metric=None, threshold=None, rate_requested=0.0,
             cache=cache, length=length, depth=depth, accuracy=1.0)
        for model, caches in (("llama", ["none", "h2o:0.5"]), ("internlm2", ["none"]))
        for cache in caches for length in (256, 512) for depth in (0.0, 1.0)])
    fig = fig_niah(cells, "euclidean", 0.5)
    empty = [ax.get_title() for ax in fig.axes if any("not run for this model" in t.get_text() for t in ax.texts)]
    assert empty == ["internlm2: plain + h2o:0.5"]


def test_search_scaling_axes_read_as_plain_numbers():
    """The measured panel's log axes say 0.1 s and 5 GFLOPs, not 10^-1 and 5x10^9."""
    import matplotlib.pyplot as plt

    from kvsharer.report.figures import fig_search_scaling

    grid = [(8, 64, 0.08), (8, 128, 0.16), (16, 64, 0.12), (16, 128, 0.48)]
    scaling = {
        "measurements": [dict(layers=layers, hidden=hidden, samples=30, tokens=64, candidates=2,
                              layers_computed=2 * layers - 1, flops_per_layer_token=24.0 * hidden ** 2, seconds=s)
                         for layers, hidden, s in grid],
        "fit": {"throughput_flops": 6e10, "fixed_seconds_per_candidate": 0.01, "r2": 0.99},
        "projection": [{"model": "Llama-2-7B", "gpu_seconds_expected": 3.4, "gpu_seconds_official_expected": 11.4,
                        "gpu_seconds_worst": 19.1}],
        "assumptions": {"gpu_flops": 3.956e14},
    }
    fig = fig_search_scaling(scaling)
    fig.canvas.draw()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            labels = [t.get_text() for t in axis.get_ticklabels(which="both") if t.get_text()]
            assert not any("times" in t or "^" in t or "e+" in t or "e-" in t for t in labels), labels
    measured = fig.axes[0]
    assert "GFLOPs" in measured.get_xlabel()
    assert {"0.1", "0.2"} <= {t.get_text() for t in measured.yaxis.get_ticklabels(which="both")}
    plt.close(fig)


def test_profile_legend_says_which_line_hides_under_another():
    """H2O and PyramidInfer at one budget hold the same KV bytes: the later-drawn line covers the other's,
    and the legend says so; where the values differ (throughput) the labels stay plain."""
    from kvsharer.report.figures import fig_profile_memory, fig_profile_throughput

    rows = [{"model": "tiny", "rate": r, "batch": 1, "context": 32, "kind": "grid", "cache": c,
             "kv_bytes": 1e6 * (1 - r) * (1 if c == "none" else 0.5),
             "expected_kv_bytes": 1e6 * (1 - r) * (1 if c == "none" else 0.5),
             "decode_tok_s": {"none": 100.0, "h2o:0.5": 90.0, "pyramidinfer:0.5": 95.0}[c] * (1 + r)}
            for r in (0.0, 0.25) for c in ("none", "h2o:0.5", "pyramidinfer:0.5")]
    profile = pd.DataFrame(rows)

    def labels(fig):
        return [t.get_text() for t in fig.legends[0].get_texts()][:3]

    assert labels(fig_profile_memory(profile)) == ["sharing only", "+ h2o:0.5 (= + pyramidinfer:0.5)",
                                                   "+ pyramidinfer:0.5"]
    assert labels(fig_profile_throughput(profile)) == ["sharing only", "+ h2o:0.5", "+ pyramidinfer:0.5"]
