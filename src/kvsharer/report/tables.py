"""The paper-style tables (CSV + Markdown) from policy and evaluation files (stage ``tables``,
:mod:`kvsharer.stages.tables`).

Writes, under ``--out-dir``, always the same files (a table without inputs is written with its header
only, so Snakemake outputs stay fixed): ``<name>.csv`` and ``<name>.md`` for every name in ``TABLES``:

* ``ppl_vs_rate`` (the headline): per model and rate, PPL of the paper's order (dissimilar) and ours (the measured
  and fitted orders: ``names.HEADLINE_ORDERS``) at the main metric and threshold, each also as a multiple of the
  plain model's PPL (``x_plain:<order>``), with the plain model's PPL as a first row (rate 0);
* ``table1``: per model, the plain model and the dissimilar order (the paper's method) at every requested
  rate, at the main metric and threshold: PPL, one score per requested benchmark, its column naming the
  metric (``hellaswag (acc)``; a group by lm-eval's aggregate, ``mmlu (acc, group)``; a generation task by
  its own metric, ``xsum (rougeL)``; see ``collect.harness_scores``), passkey accuracy, their mean
  (``mean_score``) and that mean as a percentage of the plain model's (``pct_of_plain``);
* ``order_ablation``: PPL per rate for the dissimilar, similar and random orders (random: mean and sample
  standard deviation, ddof=1, over seeds), at the main metric and threshold;
* ``metric_ablation``: PPL per rate per distance metric (dissimilar order, main threshold);
* ``threshold_ablation``: per rate and threshold T (dissimilar order, main metric): layers shared,
  complete, candidates evaluated, PPL;
* ``acceptance_by_rank``: share of accepted candidates per bin of the dissimilarity rank (dissimilar
  order; per model, metric and threshold), from the search traces;
* ``search_cost``: per policy: candidates evaluated, seconds, seconds per candidate, decoder forwards
  (decoder layers computed / (layers x samples): the fast search replays the layers before a change);
* ``search_procedures``: per model and rate, every search order at the main metric and threshold (the
  ranked orders of the paper's loop, random as the mean over seeds, and the measured orders) and MiniCache
  at its measured KV: layers shared, KV % of plain, PPL on the held-out text and on every further
  held-out corpus (``ppl:<corpus>``), mean task accuracy and passkey accuracy where they were run, and
  what finding the policy cost from scratch (candidates, decoder
  forwards, seconds of candidate evaluations — those taken from a smaller target's journal included);
* ``table2_compose`` (the paper's Table 2, extended): per model, sharing rate (plain and every rate a token
  method was composed with) and token method (none, H2O, PyramidInfer, KVMerger): the KV the setting held
  (% of plain, measured), KV bytes, peak memory and decode throughput from the profile (largest batch and
  context measured there; empty when the profile did not run that combination), PPL, mean accuracy,
  passkey accuracy;
* ``quantization``: sharing rate x KV bits (16 = not quantized): KV % of plain, total compression
  (plain KV / held KV), PPL, mean accuracy;
* ``minicache``: MiniCache vs KVSharer (dissimilar order, main metric and threshold) at the same rate,
  i.e. about equal KV bytes: KV % of plain measured for both, PPL and mean accuracy side by side.

With a ``serving`` section in the config (``--serving``: the ``serving`` stage's JSON files, vLLM), also
``SERVING_TABLES``:

* ``serving`` (serving throughput vs rate): per model, KV-cache budget, sharing rate and policy (plain, the
  paper's and the measured orders): layers shared, the KV blocks vLLM allocated, the blocks the budget must hold
  (``budget // (block bytes per layer x (L - k))``), both as a ratio to plain beside ``L / (L - k)``, the
  maximum concurrency of the request set and its ratio, output tokens/s (its ratio: the median over rounds of
  the ratio within a round) and mean latency and time to first token.

The ablation tables hold only the rates at which the ablation has a variant besides the main setting
(the main setting's column is there for comparison); without any, they are empty. CSV keeps full
precision (what the inputs hold); Markdown rounds to 4 decimals.
"""

from __future__ import annotations

import importlib.util
import logging
import math

import numpy as np
import pandas as pd

from ..names import HEADLINE_ORDERS, ORDERS, RANKED_ORDERS
from .collect import (METRICS, NO_CACHE, Collection, order_rank, plain, policies_frame, read_json, results_frame,
                      select, settings_frame, task_columns, traces_frame)

log = logging.getLogger("kvsharer")

DEFAULT_METRIC = "euclidean"
DEFAULT_THRESHOLD = 0.5
DEFAULT_RANK_BIN = 10

# Markdown headers for the CSV column names that are not self-explanatory
HEADERS = {
    "rate_pct": "rate (%)", "layers_shared": "layers shared", "n_layers": "layers", "ppl": "PPL",
    "mean_score": "mean score", "pct_of_plain": "% of plain", "random_seeds": "random seeds",
    "candidates_evaluated": "candidates", "candidates_resumed": "resumed", "pairs_skipped": "pairs skipped",
    "seconds_per_candidate": "s / candidate", "accepted_fraction": "accepted fraction",
    "mean_similarity": "mean similarity", "rank_lo": "rank from", "rank_hi": "rank to", "threshold": "T",
    "kv_pct": "KV (% of plain)", "kv_bytes": "KV bytes", "peak_mb": "peak memory (MB)",
    "decode_tok_s": "decode tokens/s", "mean_acc": "mean acc", "compression": "total compression (x)",
    "kv_bits": "KV bits", "profile_batch": "profile batch", "profile_context": "profile context",
    "kv_mib": "KV budget (MiB)", "kv_blocks": "KV blocks", "blocks_expected": "expected blocks",
    "blocks_x_plain": "blocks x plain", "expected_x": "L/(L-k)", "max_concurrency": "max concurrency",
    "concurrency_x_plain": "concurrency x plain", "output_tok_s": "output tokens/s", "tok_s_x_plain": "tokens/s x plain",
    "latency_s": "mean latency (s)", "ttft_s": "time to first token (s)",
}


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def rate_pct(rate: pd.Series) -> pd.Series:
    """Requested rate as a percentage, rounded to 10 decimals (0.1 * 100 is 10.000000000000002)."""
    return (pd.to_numeric(rate, errors="coerce").astype(float) * 100).round(10)


def _integral(frame: pd.DataFrame, columns) -> pd.DataFrame:
    for column in columns:
        if column in frame:
            values = pd.to_numeric(frame[column], errors="coerce").astype(float)
            finite = values.dropna()
            frame[column] = values.astype("Int64") if finite.eq(finite.round()).all() else values
    return frame


def _collapse(frame: pd.DataFrame, keys: list[str], columns: list[str]) -> pd.DataFrame:
    """One row per ``keys`` (several policies of the same setting, e.g. fast and official procedure):
    the mean of the numeric ``columns``; ``complete`` only if all are."""
    numeric = [c for c in columns if c != "complete"]
    data = frame[keys + columns].copy()
    for column in numeric:
        data[column] = pd.to_numeric(data[column], errors="coerce").astype(float)
    grouped = data.groupby(keys, sort=False, dropna=False)
    out = grouped[numeric].mean().reset_index() if numeric else grouped.size().reset_index()[keys]
    if "complete" in columns:
        out["complete"] = grouped["complete"].agg(lambda s: bool(s.dropna().all()) if s.notna().any() else None).values
    return out


def _rates_with_variant(frame: pd.DataFrame, column: str, main) -> pd.DataFrame:
    """The rows at the (model, rate) where some row's ``column`` differs from ``main``."""
    if frame.empty:
        return frame
    if isinstance(main, float):
        other = ~np.isclose(frame[column].astype(float).to_numpy(), main, rtol=0, atol=1e-9)
    else:
        other = frame[column].ne(main).to_numpy()
    keys = frame.loc[other, ["model", "rate_requested"]].drop_duplicates()
    return frame.merge(keys, on=["model", "rate_requested"], how="inner")


# ------------------------------------------------------------------------------------------------
# the tables
# ------------------------------------------------------------------------------------------------


def table1(results: pd.DataFrame, metric: str, threshold: float) -> pd.DataFrame:
    tasks = task_columns(results)
    scores = tasks + ["passkey"]
    columns = ["model", "rate_pct", "layers_shared", "n_layers", "ppl", *scores, "mean_score", "pct_of_plain"]
    rows = pd.concat([plain(results).assign(_plain=0), select(results, "dissimilar", metric, threshold).assign(_plain=1)])
    rows = rows.dropna(subset=["ppl", *scores], how="all")
    if rows.empty:
        return pd.DataFrame(columns=columns)
    out = _collapse(rows, ["model", "_plain", "rate_requested"], ["num_shared", "n_layers", "ppl", *scores])
    out = out.sort_values(["model", "_plain", "rate_requested"], kind="stable").reset_index(drop=True)
    out["rate_pct"] = rate_pct(out["rate_requested"])
    out = out.rename(columns={"num_shared": "layers_shared"})
    out["mean_score"] = math.nan
    out["pct_of_plain"] = math.nan
    for model, index in out.groupby("model", sort=False).groups.items():
        part = out.loc[index]
        present = [c for c in scores if part[c].notna().any()]  # the same score set for every rate
        if not present:
            continue
        out.loc[index, "mean_score"] = part[present].mean(axis=1, skipna=False)
        base = out.loc[index][out.loc[index, "_plain"] == 0]["mean_score"]
        if len(base) == 1 and base.iloc[0] and not math.isnan(base.iloc[0]):
            out.loc[index, "pct_of_plain"] = out.loc[index, "mean_score"] / base.iloc[0] * 100
    return _integral(out, ["layers_shared", "n_layers"])[columns]


def ppl_vs_rate(results: pd.DataFrame, metric: str, threshold: float) -> pd.DataFrame:
    """The headline: PPL per rate of the paper's order and ours, and as a multiple of the plain model's."""
    sub = select(results, metric=metric, threshold=threshold)
    sub = sub[sub["order"].isin(HEADLINE_ORDERS) & sub["ppl"].notna()]
    orders = sorted(set(sub["order"]), key=lambda o: (order_rank(o), o))
    columns = ["model", "rate_pct", *[f"ppl:{o}" for o in orders], *[f"x_plain:{o}" for o in orders]]
    base = plain(results).dropna(subset=["ppl"]).groupby("model")["ppl"].mean()  # model -> plain PPL
    rows = []
    for model in sorted(set(sub["model"]) | set(base.index)):
        reference = base.get(model, math.nan)
        if not math.isnan(reference):
            rows.append({"model": model, "rate_pct": 0.0, **{f"ppl:{o}": reference for o in orders},
                         **{f"x_plain:{o}": 1.0 for o in orders}})
        for rate, part in sub[sub["model"] == model].groupby("rate_requested", sort=True):
            row = {"model": model, "rate_pct": rate}
            for order in orders:
                values = part.loc[part["order"] == order, "ppl"]
                row[f"ppl:{order}"] = values.mean() if len(values) else math.nan
                row[f"x_plain:{order}"] = row[f"ppl:{order}"] / reference
            rows.append(row)
    out = pd.DataFrame(rows, columns=columns)
    out["rate_pct"] = rate_pct(out["rate_pct"])
    return out


def order_long(results: pd.DataFrame, metric: str, threshold: float) -> pd.DataFrame:
    """Policies with a PPL at the main metric and threshold, at the rates where an order other than
    dissimilar was run."""
    sub = select(results, metric=metric, threshold=threshold)
    sub = sub[sub["order"].notna() & sub["ppl"].notna()]
    return _rates_with_variant(sub, "order", "dissimilar")


def order_ablation(results: pd.DataFrame, metric: str, threshold: float) -> pd.DataFrame:
    sub = order_long(results, metric, threshold)
    extra = sorted({o for o in sub["order"] if o not in RANKED_ORDERS}, key=lambda o: (order_rank(o), o))
    columns = ["model", "rate_pct", "ppl:dissimilar", "ppl:similar", "ppl:random_mean", "ppl:random_std",
               "random_seeds", *[f"ppl:{o}" for o in extra]]
    rows = []
    for (model, rate), part in sub.groupby(["model", "rate_requested"], sort=True):
        row = {"model": model, "rate_pct": rate}
        for order in ("dissimilar", "similar", *extra):
            values = part.loc[part["order"] == order, "ppl"]
            row[f"ppl:{order}"] = values.mean() if len(values) else math.nan
        # one value per seed (several procedures of one seed are averaged first)
        seeds = part[part["order"] == "random"].groupby("seed", dropna=False)["ppl"].mean()
        row["ppl:random_mean"] = seeds.mean() if len(seeds) else math.nan
        row["ppl:random_std"] = seeds.std(ddof=1) if len(seeds) > 1 else math.nan
        row["random_seeds"] = len(seeds)
        rows.append(row)
    out = pd.DataFrame(rows, columns=columns)
    out["rate_pct"] = rate_pct(out["rate_pct"])
    return _integral(out, ["random_seeds"])


def metric_long(results: pd.DataFrame, metric: str, threshold: float) -> pd.DataFrame:
    """Dissimilar-order policies with a PPL at the main threshold, at the rates where a metric other than
    the main one was run."""
    sub = select(results, order="dissimilar", threshold=threshold)
    sub = sub[sub["metric"].notna() & sub["ppl"].notna()]
    return _rates_with_variant(sub, "metric", metric)


def metric_ablation(results: pd.DataFrame, metric: str, threshold: float) -> pd.DataFrame:
    sub = metric_long(results, metric, threshold)
    metrics = list(METRICS) + sorted({m for m in list(sub["metric"]) + [metric] if m not in METRICS})
    columns = ["model", "rate_pct", *[f"ppl:{m}" for m in metrics]]
    rows = []
    for (model, rate), part in sub.groupby(["model", "rate_requested"], sort=True):
        row = {"model": model, "rate_pct": rate}
        for m in metrics:
            values = part.loc[part["metric"] == m, "ppl"]
            row[f"ppl:{m}"] = values.mean() if len(values) else math.nan
        rows.append(row)
    out = pd.DataFrame(rows, columns=columns)
    out["rate_pct"] = rate_pct(out["rate_pct"])
    return out


def threshold_ablation(results: pd.DataFrame, metric: str, threshold: float) -> pd.DataFrame:
    columns = ["model", "rate_pct", "threshold", "target", "layers_shared", "complete", "candidates_evaluated", "ppl"]
    sub = select(results, order="dissimilar", metric=metric)
    sub = _rates_with_variant(sub[sub["threshold"].notna()], "threshold", float(threshold))
    if sub.empty:
        return pd.DataFrame(columns=columns)
    out = _collapse(sub, ["model", "rate_requested", "threshold"],
                    ["target", "num_shared", "complete", "candidates_evaluated", "ppl"])
    out = out.sort_values(["model", "rate_requested", "threshold"], kind="stable").reset_index(drop=True)
    out["rate_pct"] = rate_pct(out["rate_requested"])
    out = out.rename(columns={"num_shared": "layers_shared"})
    return _integral(out, ["target", "layers_shared", "candidates_evaluated"])[columns]


def acceptance_by_rank(traces: pd.DataFrame, width: int = DEFAULT_RANK_BIN) -> pd.DataFrame:
    """Accepted share of the evaluated candidates per bin of ``width`` dissimilarity ranks (dissimilar order).

    Searches of the same setting at different rates walk the same ranking, so the smaller one's trace is
    a prefix of the larger one's: each rank counts once per (model, metric, threshold, calibration),
    taken from the policy with the largest target."""
    columns = ["model", "metric", "threshold", "rank_lo", "rank_hi", "candidates", "accepted",
               "accepted_fraction", "mean_similarity"]
    sub = traces[traces["order"].eq("dissimilar").fillna(False).astype(bool)].copy()
    if sub.empty:
        return pd.DataFrame(columns=columns)
    sub["calibration_sha256"] = sub["calibration_sha256"].fillna("")
    sub = sub.sort_values("target", ascending=False, kind="stable", na_position="last")
    sub = sub.drop_duplicates(["model", "metric", "threshold", "calibration_sha256", "rank"])
    sub["rank_lo"] = (sub["rank"].astype(int) // width) * width
    sub["similarity"] = pd.to_numeric(sub["similarity"], errors="coerce").astype(float)
    sub["accepted"] = sub["accepted"].astype(int)
    out = (sub.groupby(["model", "metric", "threshold", "rank_lo"], sort=True, dropna=False)
              .agg(candidates=("accepted", "size"), accepted=("accepted", "sum"),
                   mean_similarity=("similarity", "mean"))
              .reset_index())
    out["rank_hi"] = out["rank_lo"] + width - 1
    out["accepted_fraction"] = out["accepted"] / out["candidates"]
    return _integral(out, ["rank_lo", "rank_hi", "candidates", "accepted"])[columns]


def search_cost(policies: pd.DataFrame) -> pd.DataFrame:
    columns = ["model", "policy", "order", "metric", "threshold", "seed", "procedure", "rate_pct", "target",
               "layers_shared", "complete", "candidates_evaluated", "candidates_resumed", "pairs_skipped",
               "seconds", "seconds_per_candidate", "forwards"]
    out = policies.rename(columns={"num_shared": "layers_shared", "search_seconds": "seconds"}).copy()
    out["rate_pct"] = rate_pct(out["rate_requested"])
    return out[columns].reset_index(drop=True)


# ------------------------------------------------------------------------------------------------
# compositions: sharing x cache methods
# ------------------------------------------------------------------------------------------------


def _main_or_plain(settings: pd.DataFrame, metric: str, threshold: float) -> pd.DataFrame:
    """Rows of the plain model or of the paper's policy (dissimilar order, main metric and threshold)."""
    main = (settings["order"] == "dissimilar") & (settings["metric"] == metric) & \
        np.isclose(settings["threshold"].astype(float).fillna(np.nan), threshold)
    return settings[(settings["policy"] == "plain") | main].copy()


def _setting_columns(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    frame["rate_pct"] = rate_pct(frame["rate_requested"].fillna(0.0))
    frame["kv_pct"] = frame["kv_fraction"] * 100
    return frame


def profile_point(profile: pd.DataFrame | None) -> pd.DataFrame:
    """Per (model, rate, cache spec): the profile row at the largest batch, then context, measured."""
    columns = ["model", "rate", "cache", "batch", "context", "peak_bytes", "decode_tok_s"]
    if profile is None or profile.empty:
        return pd.DataFrame(columns=columns)
    rows = profile[(profile["kind"] == "grid") & profile["decode_tok_s"].notna()].copy()
    if "cache" not in rows:  # a profile written before cache methods other than token methods existed
        rows["cache"] = [NO_CACHE if i == "none" else f"{i}:{float(b):g}" for i, b in zip(rows["intra"], rows["budget"])]
    rows["rate"] = rows["rate"].astype(float).round(6)
    rows = rows.sort_values(["batch", "context"]).groupby(["model", "rate", "cache"], as_index=False).last()
    return rows[columns]


def _with_profile(frame: pd.DataFrame, profile: pd.DataFrame | None) -> pd.DataFrame:
    point = profile_point(profile).rename(columns={"batch": "profile_batch", "context": "profile_context"})
    point["model"] = point["model"].astype(str)
    frame = frame.assign(rate_key=frame["rate_requested"].fillna(0.0).astype(float).round(6))
    out = frame.merge(point, how="left", left_on=["model", "rate_key", "cache"], right_on=["model", "rate", "cache"],
                      suffixes=("", "_profile"))
    out["peak_mb"] = out["peak_bytes"] / 2**20
    return out


def table2_compose(settings: pd.DataFrame, profile: pd.DataFrame | None, metric: str, threshold: float) -> pd.DataFrame:
    columns = ["model", "rate_pct", "cache", "kv_pct", "kv_bytes", "peak_mb", "decode_tok_s", "profile_batch",
               "profile_context", "ppl", "mean_acc", "passkey"]
    rows = _main_or_plain(settings, metric, threshold)
    composed = rows[rows["cache_family"] == "intra"]
    if composed.empty:
        return pd.DataFrame(columns=columns)
    keep = pd.Series(False, index=rows.index)
    for model, part in composed.groupby("model"):
        rates = set(part["rate_requested"].fillna(0.0).round(6))
        in_model = (rows["model"] == model) & rows["rate_requested"].fillna(0.0).round(6).isin(rates)
        keep |= in_model & rows["cache_family"].isin(["intra", NO_CACHE])
    out = _with_profile(_setting_columns(rows[keep]), profile)
    out = out.sort_values(["model", "rate_pct", "cache"], key=lambda c: c.map(lambda v: (v != NO_CACHE, v))
                          if c.name == "cache" else c, kind="stable")
    return out[columns].reset_index(drop=True)


def quantization(settings: pd.DataFrame, metric: str, threshold: float) -> pd.DataFrame:
    columns = ["model", "rate_pct", "kv_bits", "kv_pct", "compression", "ppl", "mean_acc"]
    rows = _main_or_plain(settings, metric, threshold)
    quant = rows[rows["cache_family"] == "quant"]
    if quant.empty:
        return pd.DataFrame(columns=columns)
    keys = set(zip(quant["model"], quant["rate_requested"].fillna(0.0).round(6)))
    composed_with = pd.Series([k in keys for k in zip(rows["model"], rows["rate_requested"].fillna(0.0).round(6))],
                              index=rows.index)
    base = rows[(rows["cache_family"] == NO_CACHE) & composed_with]
    out = _setting_columns(pd.concat([base, quant]))
    out["kv_bits"] = out["cache_value"].fillna(16).astype(int)
    out["compression"] = 1 / out["kv_fraction"]
    out = out.sort_values(["model", "rate_pct", "kv_bits"], ascending=[True, True, False])
    return out[columns].reset_index(drop=True)


def minicache(settings: pd.DataFrame, metric: str, threshold: float) -> pd.DataFrame:
    columns = ["model", "rate_pct", "method", "kv_pct", "ppl", "mean_acc"]
    rows = _main_or_plain(settings, metric, threshold)
    mini = rows[rows["cache_family"] == "minicache"].copy()
    if mini.empty:
        return pd.DataFrame(columns=columns)
    mini["rate_requested"] = mini["cache_value"]
    mini["method"] = "MiniCache"
    sharer = rows[(rows["cache_family"] == NO_CACHE) & (rows["policy"] != "plain")].copy()
    sharer["method"] = "KVSharer"
    plain_rows = rows[(rows["cache_family"] == NO_CACHE) & (rows["policy"] == "plain")].copy()
    plain_rows["method"] = "plain"
    models = set(mini["model"])
    out = _setting_columns(pd.concat([plain_rows, sharer, mini]))
    out = out[out["model"].isin(models)]
    out = out.sort_values(["model", "rate_pct", "method"], kind="stable")
    return out[columns].reset_index(drop=True)


def search_procedures(settings: pd.DataFrame, policies: pd.DataFrame, metric: str, threshold: float) -> pd.DataFrame:
    corpora = [c for c in settings.columns if c.startswith("ppl:")]
    columns = ["model", "rate_pct", "method", "layers_shared", "kv_pct", "ppl", *corpora, "mean_acc", "passkey",
               "candidates", "forwards", "search_seconds"]
    main = (settings["metric"] == metric) & np.isclose(settings["threshold"].astype(float).fillna(np.nan), threshold)
    plain_row = settings["policy"] == "plain"
    searched = settings[(settings["cache_family"] == NO_CACHE) & (main | plain_row)].copy()
    cost = policies[["model", "policy", "candidates_evaluated", "candidates_resumed", "forwards", "search_seconds_total"]]
    searched = searched.merge(cost, on=["model", "policy"], how="left")
    searched["method"] = searched["order"].where(~searched["policy"].eq("plain"), "plain")
    mini = settings[settings["cache_family"] == "minicache"].copy()
    mini["rate_requested"], mini["method"] = mini["cache_value"], "MiniCache"
    frame = _setting_columns(pd.concat([searched, mini], ignore_index=True))
    if frame.empty or frame["method"].ne("plain").sum() == 0:
        return pd.DataFrame(columns=columns)
    frame["layers_shared"] = frame["num_shared"].where(frame["method"] != "MiniCache")  # it merges, shares none
    frame["candidates"] = frame["candidates_evaluated"] + frame["candidates_resumed"]
    frame["search_seconds"] = frame["search_seconds_total"]
    numeric = ["layers_shared", "kv_pct", "ppl", *corpora, "mean_acc", "passkey", "candidates", "forwards", "search_seconds"]
    for column in numeric:
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
    grouped = frame.groupby(["model", "rate_pct", "method"], sort=False, dropna=False)
    out = grouped[numeric].mean().reset_index()  # random: mean over seeds
    seeds = grouped.size().reset_index(name="n")
    out["method"] = [f"{m} (mean of {n})" if n > 1 else m for m, n in zip(out["method"], seeds["n"])]
    rank = {"plain": -1, "MiniCache": len(ORDERS)}
    out["rank"] = [rank.get(m, order_rank(m.split(" ")[0])) for m in out["method"]]
    out = out.sort_values(["model", "rate_pct", "rank", "method"], kind="stable")
    return _integral(out[columns].reset_index(drop=True), ["layers_shared", "candidates"])


SERVING_COLUMNS = ["model", "kv_mib", "rate_pct", "method", "layers_shared", "kv_blocks", "blocks_expected",
                   "blocks_x_plain", "expected_x", "max_concurrency", "concurrency_x_plain", "output_tok_s",
                   "tok_s_x_plain", "latency_s", "ttft_s"]


def serving_runs(data: dict, path) -> list[dict]:
    """The rows of one ``serving`` stage JSON: one per (KV budget, arm) that ran (an arm that failed is left out)."""
    if data.get("stage") != "serving" or not isinstance(data.get("runs"), list):
        raise ValueError(f"{path} is not a result of the serving stage (python -m kvsharer serving): no 'runs'")
    rows = []
    try:
        for run in data["runs"]:
            if "error" in run:
                continue
            ratio = run["ratio_to_plain"]
            rows.append({
                "model": str(data["model"]), "kv_mib": float(run["kv_cache_mib"]), "arm": run["arm"],
                "order": run.get("order"), "rate_requested": run.get("rate_requested"),
                "layers_shared": run["shared_layers"], "kv_blocks": run["kv_blocks"],
                "blocks_expected": run["kv_blocks_expected"], "blocks_x_plain": ratio["kv_blocks"],
                "expected_x": run["expected_ratio"], "max_concurrency": run["max_concurrency"],
                "concurrency_x_plain": ratio["max_concurrency"], "output_tok_s": run["output_tokens_per_s"],
                "tok_s_x_plain": ratio["output_tokens_per_s_within_rounds_median"], "latency_s": run["latency_mean_s"],
                "ttft_s": run["ttft_mean_s"],
            })
    except (KeyError, TypeError) as err:
        raise ValueError(f"serving result {path} lacks {err} in a run") from None
    return rows


def read_serving(paths) -> pd.DataFrame | None:
    """The ``serving`` stage's JSON files (one per model) as one frame, a row per (model, budget, arm); None
    without any file."""
    if not paths:
        return None
    return pd.DataFrame([row for path in paths for row in serving_runs(read_json(path, "serving result"), path)])


def serving(runs: pd.DataFrame | None) -> pd.DataFrame:
    """Serving throughput vs rate: per model, budget and rate, plain first, then the orders (see the module
    docstring)."""
    if runs is None or runs.empty:
        return pd.DataFrame(columns=SERVING_COLUMNS)
    out = runs.copy()
    plain_arm = out["arm"] == "plain"
    out["method"] = out["order"].where(out["order"].notna(), out["arm"]).where(~plain_arm, "plain")
    out["rate_pct"] = rate_pct(out["rate_requested"].where(~plain_arm, 0.0))
    out["rank"] = [-1 if m == "plain" else order_rank(m) for m in out["method"]]
    out = out.sort_values(["model", "kv_mib", "rate_pct", "rank", "method"], kind="stable")
    return _integral(out[SERVING_COLUMNS].reset_index(drop=True),
                     ["layers_shared", "kv_blocks", "blocks_expected", "max_concurrency"])


def build_tables(collection: Collection, metric: str = DEFAULT_METRIC, threshold: float = DEFAULT_THRESHOLD,
                 rank_bin: int = DEFAULT_RANK_BIN, profile: pd.DataFrame | None = None,
                 serving_results: pd.DataFrame | None = None):
    """``{name: function building that table}`` for every name in ``TABLES`` and ``SERVING_TABLES``."""
    results = results_frame(collection)
    settings = settings_frame(collection)
    return {
        "table2_compose": lambda: table2_compose(settings, profile, metric, threshold),
        "quantization": lambda: quantization(settings, metric, threshold),
        "minicache": lambda: minicache(settings, metric, threshold),
        "ppl_vs_rate": lambda: ppl_vs_rate(results, metric, threshold),
        "table1": lambda: table1(results, metric, threshold),
        "order_ablation": lambda: order_ablation(results, metric, threshold),
        "metric_ablation": lambda: metric_ablation(results, metric, threshold),
        "threshold_ablation": lambda: threshold_ablation(results, metric, threshold),
        "acceptance_by_rank": lambda: acceptance_by_rank(traces_frame(collection), rank_bin),
        "search_cost": lambda: search_cost(policies_frame(collection)),
        "search_procedures": lambda: search_procedures(settings, policies_frame(collection), metric, threshold),
        "serving": lambda: serving(serving_results),
    }


# ------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------


def format_value(value) -> str:
    """A cell as Markdown text: up to 4 decimals, integers plain, missing values empty."""
    if value is None or value is pd.NA or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if value != 0 and abs(value) < 1e-4:
            return f"{value:.3g}"
        text = f"{value:.4f}".rstrip("0").rstrip(".")
        return "0" if text == "-0" else text
    return str(value)


def markdown(frame: pd.DataFrame) -> str:
    """The table in GitHub Markdown (pandas ``to_markdown`` when ``tabulate`` is installed)."""
    headers = [HEADERS.get(c, c) for c in frame.columns]
    cells = [[format_value(v) for v in row] for row in frame.itertuples(index=False, name=None)]
    numeric = [pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c])
               for c in frame.columns]
    if importlib.util.find_spec("tabulate") is not None and cells:
        text = pd.DataFrame(cells, columns=headers).to_markdown(
            index=False, disable_numparse=True, colalign=["right" if n else "left" for n in numeric])
        return text + "\n"

    def line(values):
        return "| " + " | ".join(str(v).replace("|", "\\|") for v in values) + " |"

    rule = "|" + "|".join("---:" if n else "---" for n in numeric) + "|"
    return "\n".join([line(headers), rule, *map(line, cells)]) + "\n"


def read_profiles(paths) -> pd.DataFrame | None:
    """The profile CSVs as one frame (None without any)."""
    if not paths:
        return None
    try:
        return pd.concat([pd.read_csv(p) for p in paths], ignore_index=True)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise ValueError(f"cannot read profile CSV: {err}") from None


def warn_if_no_main(collection: Collection, metric: str, threshold: float) -> None:
    policies = policies_frame(collection)
    dissimilar = select(policies, order="dissimilar")
    if len(dissimilar) and select(dissimilar, metric=metric, threshold=threshold).empty:
        log.warning("no dissimilar-order policy has the main metric %r and threshold %g (check --main-metric and "
                    "--main-threshold): table1 and the main figures will be empty", metric, threshold)
