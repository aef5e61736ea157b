"""Load the pipeline's result JSON files into tidy pandas DataFrames (pure: no torch, no plotting).

Inputs are explicit file lists (Snakemake passes them); nothing scans a directory.

* policy files (stage ``search``): one row each in :func:`policies_frame`, one row per trace entry in
  :func:`traces_frame`;
* evaluation files (``evaluate-ppl``, ``evaluate-harness``, ``evaluate-longctx``): joined to their policy
  by the evaluation's ``policy`` field == the policy file path (compared as normalized absolute paths);
  ``policy: null`` is the plain model (rate 0) of its model. :func:`results_frame` has one row per
  (model, policy) with the search settings and every metric (evaluations without a cache method);
  :func:`settings_frame` one row per (model, policy, cache method) for all of them, with the KV bytes
  the setting held; :func:`passkey_cells_frame` one row per passkey (length, depth) cell;
* distance files (stage ``distances``): :func:`load_distances`.

The model label is the model folder's name (``results/models/smollm2`` -> ``smollm2``). Inconsistent
input (an evaluation of a policy that was not given, two results for the same thing, an evaluation
whose map differs from its policy's) raises ``ValueError`` with one message naming the files.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from ..method_registry import CacheSpec
from ..names import METRICS, ORDERS  # display order; others (baselines) come after

EVAL_STAGES = ("evaluate-ppl", "evaluate-harness", "evaluate-longctx")
PLAIN = "plain"

# columns of policies_frame / results_frame, in this order (metric columns follow in results_frame)
POLICY_COLUMNS = [
    "model", "policy", "policy_path", "order", "metric", "threshold", "seed", "procedure",
    "rate_requested", "rate", "num_shared", "n_layers", "target", "complete",
    "candidates_evaluated", "candidates_resumed", "pairs_skipped", "pairs_total",
    "search_seconds", "seconds_per_candidate", "forwards", "search_seconds_total",
]
INT_COLUMNS = ["seed", "num_shared", "n_layers", "target", "candidates_evaluated", "candidates_resumed",
               "pairs_skipped", "pairs_total"]
TRACE_COLUMNS = [
    "model", "policy", "policy_path", "order", "metric", "threshold", "seed", "procedure", "target",
    "rate_requested", "pairs_total", "calibration_sha256", "rank", "layer", "source", "distance",
    "similarity", "accepted", "seconds",
]
CELL_COLUMNS = ["model", "policy", "policy_path", "order", "metric", "threshold", "seed", "rate_requested",
                "num_shared", "cache", "length", "depth", "trials", "correct", "accuracy"]
NO_CACHE = "none"  # the cache column of an evaluation without a cache method


# ------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------


def read_json(path: str | os.PathLike, what: str) -> dict:
    """The JSON object in ``path``; a missing, unreadable or non-object file is a ``ValueError``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} file {path} is not valid JSON: {err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read {what} file {path}: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} file {path} must hold a JSON object, not {type(data).__name__}")
    return data


def path_key(path: str | os.PathLike) -> str:
    """How policy paths are compared: normalized and absolute (``a/./b.json`` == ``a/b.json``)."""
    return os.path.normpath(os.path.abspath(os.fspath(path)))


def model_label(model: Any) -> str:
    """``results/models/smollm2`` -> ``smollm2``; a hub id ``org/name`` -> ``name``."""
    text = str(model).rstrip("/\\")
    return Path(text).name or text


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_map(share_map: Any, path: Path, what: str) -> list[int]:
    if not isinstance(share_map, list) or not share_map or not all(isinstance(s, int) for s in share_map):
        raise ValueError(f"{what} file {path} needs a non-empty 'map' list of layer indices")
    return share_map


def _require(data: dict, keys: Iterable[str], path: Path, what: str) -> None:
    missing = [k for k in keys if k not in data]
    if missing:
        raise ValueError(f"{what} file {path} lacks {', '.join(repr(k) for k in missing)}")


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    """Integer columns as nullable integers (so a missing value does not turn 8 into 8.0)."""
    for column in INT_COLUMNS:
        if column in frame:
            values = pd.to_numeric(frame[column], errors="coerce")
            if values.dropna().eq(values.dropna().round()).all():
                frame[column] = values.astype("Int64")
    for column in ("threshold", "rate_requested", "rate", "search_seconds", "seconds_per_candidate", "forwards",
                   "search_seconds_total"):
        if column in frame:
            frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
    return frame


def order_rank(order: Any) -> int:
    return ORDERS.index(order) if order in ORDERS else len(ORDERS)


# ------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------


@dataclass
class Policy:
    path: str        # as given on the command line
    data: dict       # the file's JSON
    row: dict        # settings and search results: one row of policies_frame


@dataclass
class Evaluation:
    path: str
    stage: str
    model: str                  # model label
    policy_key: str | None      # path_key of its policy file, None for the plain model
    data: dict

    @property
    def cache(self) -> str:
        """The cache method's spec (``h2o:0.5``, ``int4``, ``minicache:0.25``) or ``none``."""
        return self.data.get("cache") or NO_CACHE

    @property
    def ppl_column(self) -> str:
        """``ppl`` on the main held-out text, ``ppl:<label>`` on a further corpus (``evaluate-ppl --corpus``)."""
        return f"ppl:{self.data['corpus']}" if self.data.get("corpus") else "ppl"


@dataclass
class Collection:
    """Policies (by path key) and the evaluations joined to them."""

    policies: dict[str, Policy] = field(default_factory=dict)
    evals: list[Evaluation] = field(default_factory=list)


def policy_row(path: str | os.PathLike, data: dict) -> dict:
    """One row of settings and search results for a policy file's JSON."""
    path = Path(path)
    settings = data.get("settings") or {}
    if not isinstance(settings, dict):
        raise ValueError(f"policy file {path}: 'settings' must be an object")
    share_map = _check_map(data.get("map"), path, "policy")
    n_layers = data.get("n_layers") or len(share_map)
    num_shared = data.get("num_shared")
    if num_shared is None:
        num_shared = sum(1 for layer, source in enumerate(share_map) if source != layer)
    target = data.get("target", settings.get("target"))
    rate_requested = data.get("rate_requested")
    if rate_requested is None and target is not None:  # the search was given a layer count
        rate_requested = target / n_layers
    return {
        "model": model_label(data["model"]),
        "policy": path.stem,
        "policy_path": str(path),
        "order": settings.get("order"),
        "metric": settings.get("metric"),
        "threshold": settings.get("threshold"),
        "seed": settings.get("seed"),
        "procedure": settings.get("procedure"),
        "rate_requested": rate_requested,
        "rate": data.get("rate", num_shared / n_layers),
        "num_shared": num_shared,
        "n_layers": n_layers,
        "target": target,
        "complete": data.get("complete"),
        "candidates_evaluated": data.get("candidates_evaluated"),
        "candidates_resumed": data.get("candidates_resumed"),
        "pairs_skipped": data.get("pairs_skipped"),
        "pairs_total": data.get("pairs_total"),
        "search_seconds": data.get("seconds"),
        "seconds_per_candidate": data.get("seconds_per_candidate"),
        # the cost of finding the policy from scratch: a search that took its first candidates from the
        # journal of a smaller target reports them in these totals (older files: this run's own cost)
        "forwards": data.get("candidate_forwards_total", data.get("forwards")),
        "search_seconds_total": data.get("candidate_seconds_total", data.get("seconds")),
    }


def plain_row(model: str, n_layers: int | None) -> dict:
    row = dict.fromkeys(POLICY_COLUMNS)
    row.update(model=model, policy=PLAIN, rate_requested=0.0, rate=0.0, num_shared=0, n_layers=n_layers,
               target=0)
    return row


def load_policies(paths: Sequence[str | os.PathLike]) -> dict[str, Policy]:
    policies: dict[str, Policy] = {}
    for path in paths:
        data = read_json(path, "policy")
        _require(data, ("map", "model"), Path(path), "policy")
        key = path_key(path)
        if key in policies:
            raise ValueError(f"policy file {path} is given twice")
        policies[key] = Policy(str(path), data, policy_row(path, data))
    return policies


def _check_eval(path: Path, data: dict) -> str:
    stage = data.get("stage")
    if stage not in EVAL_STAGES:
        raise ValueError(f"evaluation file {path} has stage {stage!r}; expected one of {', '.join(EVAL_STAGES)}")
    _require(data, ("model", "policy"), path, "evaluation")
    if stage == "evaluate-ppl" and not _number(data.get("ppl")):
        raise ValueError(f"evaluation file {path} ({stage}) needs a numeric 'ppl'")
    if stage == "evaluate-harness":
        tasks = data.get("tasks")
        if not isinstance(tasks, dict) or not all(isinstance(v, dict) for v in tasks.values()):
            raise ValueError(f"evaluation file {path} ({stage}) needs 'tasks': {{task: {{'acc': ...}}}}")
        scores = data.get("scores")
        if scores is not None and (not isinstance(scores, dict) or not all(isinstance(v, dict) for v in scores.values())):
            raise ValueError(f"evaluation file {path} ({stage}): 'scores' must be {{task: {{'metric': ..., 'value': ...}}}}")
    if stage == "evaluate-longctx":
        cells = data.get("cells")
        if not _number(data.get("accuracy")) or not isinstance(cells, list):
            raise ValueError(f"evaluation file {path} ({stage}) needs a numeric 'accuracy' and a 'cells' list")
        for cell in cells:
            if not isinstance(cell, dict) or not all(_number(cell.get(k)) for k in ("length", "depth", "accuracy")):
                raise ValueError(f"evaluation file {path} ({stage}): every cell needs numeric length, depth, accuracy")
    return stage


def load_evals(paths: Sequence[str | os.PathLike], policies: dict[str, Policy]) -> list[Evaluation]:
    """Evaluations joined to ``policies``; an evaluation of a policy that is not there is an error."""
    evals: list[Evaluation] = []
    seen: dict[tuple, str] = {}
    for path in paths:
        path = Path(path)
        data = read_json(path, "evaluation")
        stage = _check_eval(path, data)
        model = model_label(data["model"])
        key = None
        if data["policy"] is not None:
            key = path_key(data["policy"])
            policy = policies.get(key)
            if policy is None:
                raise ValueError(f"evaluation file {path} was run with policy {data['policy']}, "
                                 "which is not among the --policies files")
            if policy.row["model"] != model:
                raise ValueError(f"evaluation file {path} ran model {model!r} but its policy {policy.path} "
                                 f"was searched on model {policy.row['model']!r}")
            if data.get("map") is not None and data["map"] != policy.data["map"]:
                raise ValueError(f"evaluation file {path} used a different map than its policy {policy.path} "
                                 "(the policy changed after the evaluation: rerun it)")
        # a setting may have several harness results with different tasks (the benchmarks, RULER)
        ident = (stage, model, key, data.get("cache") or NO_CACHE, data.get("corpus"),
                 tuple(data.get("requested") or ()))
        if ident in seen:
            raise ValueError(f"two {stage} results for model {model!r}, policy "
                             f"{data['policy'] or PLAIN}, cache {ident[3]}: {seen[ident]} and {path}")
        seen[ident] = str(path)
        evals.append(Evaluation(str(path), stage, model, key, data))
    return evals


def collect(policy_paths: Sequence[str | os.PathLike], eval_paths: Sequence[str | os.PathLike] = ()) -> Collection:
    policies = load_policies(policy_paths)
    return Collection(policies, load_evals(eval_paths, policies))


# ------------------------------------------------------------------------------------------------
# frames
# ------------------------------------------------------------------------------------------------


def _sort(frame: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    if frame.empty:
        return frame.reset_index(drop=True)
    keys = frame[by].copy()
    if "policy" in by:  # plain first
        keys["policy"] = (frame["policy"] != PLAIN).astype(int).astype(str) + frame["policy"].astype(str)
    if "order" in by:
        keys["order"] = frame["order"].map(order_rank)
    order = keys.sort_values(by, kind="stable", na_position="first").index
    return frame.loc[order].reset_index(drop=True)


ROW_ORDER = ["model", "rate_requested", "order", "metric", "threshold", "seed", "policy"]


def policies_frame(collection: Collection) -> pd.DataFrame:
    """One row per policy file: its settings and search results (``search_seconds`` etc.)."""
    rows = [p.row for p in collection.policies.values()]
    frame = pd.DataFrame(rows, columns=POLICY_COLUMNS)
    return _typed(_sort(frame, ROW_ORDER))


SCORE_COLUMN = re.compile(r"^(?P<task>\S+) \((?P<metric>[^()]+)\)$")  # "mmlu (acc, group)", "xsum (rougeL)"


def score_column(task: str, metric: str, group: bool = False) -> str:
    return f"{task} ({metric}{', group' if group else ''})"


def harness_scores(data: dict) -> dict[str, float]:
    """``{column: value}``: one score per benchmark the harness stage was asked for, its column naming the
    metric: a group by lm-eval's aggregate (``mmlu (acc, group)``), a task by ``acc`` or, for a generation
    task, its own metric (``xsum (rougeL)``). Results written before the stage recorded ``scores``: the
    ``acc`` of each requested name (of every task when the names were not recorded either)."""
    scores = data.get("scores")
    out = {}
    if isinstance(scores, dict):
        for task, score in scores.items():
            label = score.get("label") or score.get("metric") or "score"
            value = score.get("value")
            out[score_column(task, label, score.get("kind") == "group")] = float(value) if _number(value) else math.nan
        return out
    tasks = data["tasks"]
    for task in data.get("requested") or list(tasks):
        acc = tasks.get(task, {}).get("acc")
        out[score_column(task, "acc")] = float(acc) if _number(acc) else math.nan
    return out


def add_metrics(row: dict, ev: Evaluation, tasks: set[str]) -> None:
    """Put an evaluation's numbers into its row: ``ppl`` (with ``kv_fraction``/``kv_bytes`` when
    reported; ``ppl:<corpus>`` on a further held-out corpus), one ``<task> (<metric>)`` column per
    benchmark of a harness result (adding it to ``tasks``, see :func:`harness_scores`), or ``passkey``."""
    if ev.stage == "evaluate-ppl" and ev.ppl_column != "ppl":
        row[ev.ppl_column] = float(ev.data["ppl"])
    elif ev.stage == "evaluate-ppl":
        row["ppl"] = float(ev.data["ppl"])
        row["kv_fraction"] = ev.data.get("kv_fraction")
        row["kv_bytes"] = ev.data.get("kv_bytes")
    elif ev.stage == "evaluate-harness":
        for column, value in harness_scores(ev.data).items():
            row[column] = value
            tasks.add(column)
    else:
        row["passkey"] = float(ev.data["accuracy"])


def results_frame(collection: Collection) -> pd.DataFrame:
    """One row per (model, policy), the plain model included when it was evaluated: settings, search
    results, ``ppl``, ``<task> (<metric>)`` for every benchmark (:func:`harness_scores`) and ``passkey``
    (overall accuracy).
    Evaluations with a cache method are left out (they are in :func:`settings_frame`)."""
    rows: dict[tuple, dict] = {}
    for key, policy in collection.policies.items():
        rows[(policy.row["model"], key)] = dict(policy.row)
    tasks: set[str] = set()
    for ev in collection.evals:
        if ev.cache != NO_CACHE:
            continue
        n_layers = len(ev.data["map"]) if isinstance(ev.data.get("map"), list) else None
        add_metrics(rows.setdefault((ev.model, ev.policy_key), plain_row(ev.model, n_layers)), ev, tasks)
    corpora = sorted({ev.ppl_column for ev in collection.evals if ev.stage == "evaluate-ppl"} - {"ppl"})
    columns = POLICY_COLUMNS + ["ppl", *corpora] + sorted(tasks) + ["passkey"]
    frame = pd.DataFrame(list(rows.values()), columns=columns)
    for column in columns[len(POLICY_COLUMNS):]:
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
    return _typed(_sort(frame, ROW_ORDER))


SETTING_COLUMNS = ["model", "policy", "order", "metric", "threshold", "seed", "rate_requested", "rate",
                   "num_shared", "n_layers", "cache", "cache_family", "cache_value", "kv_fraction", "kv_bytes", "ppl"]


def settings_frame(collection: Collection) -> pd.DataFrame:
    """One row per evaluated (model, policy, cache method): the policy's settings, the cache method
    (``cache``: spec or ``none``; ``cache_family``: intra, quant, minicache or none; ``cache_value``:
    budget, bits or rate), ``kv_fraction``/``kv_bytes`` (the K/V the setting held for one PPL window,
    as a fraction of the plain model's), ``ppl``, ``<task> (<metric>)`` per benchmark, their mean ``mean_acc``
    and ``passkey``."""
    rows: dict[tuple, dict] = {}
    tasks: set[str] = set()
    for ev in collection.evals:
        n_layers = len(ev.data["map"]) if isinstance(ev.data.get("map"), list) else None
        ident = (ev.model, ev.policy_key, ev.cache)
        if ident not in rows:
            base = plain_row(ev.model, n_layers) if ev.policy_key is None else collection.policies[ev.policy_key].row
            family = ev.data.get("cache_family") or NO_CACHE
            rows[ident] = {**{k: base.get(k) for k in SETTING_COLUMNS[:10]}, "cache": ev.cache,
                           "cache_family": family, "cache_value": _cache_value(ev.cache)}
        add_metrics(rows[ident], ev, tasks)
    acc = sorted(tasks)
    corpora = sorted({ev.ppl_column for ev in collection.evals if ev.stage == "evaluate-ppl"} - {"ppl"})
    frame = pd.DataFrame(list(rows.values()), columns=SETTING_COLUMNS + corpora + acc + ["mean_acc", "passkey"])
    for column in ["kv_fraction", "kv_bytes", "ppl", "cache_value", "passkey", *corpora, *acc]:
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
    frame["mean_acc"] = frame[acc].mean(axis=1) if acc else math.nan
    frame["cache_rank"] = frame["cache"] != NO_CACHE
    frame = _typed(_sort(frame, ["model", "cache_rank", "cache", "rate_requested", "policy"]))
    return frame.drop(columns="cache_rank")


def _cache_value(spec: str) -> float | None:
    parsed = CacheSpec.parse(spec)  # None for NO_CACHE
    return None if parsed is None else float(parsed.value)


def task_columns(frame: pd.DataFrame) -> list[str]:
    """The benchmark score columns (``<task> (<metric>)``) of a results or settings frame."""
    return [c for c in frame.columns if SCORE_COLUMN.match(str(c))]


def traces_frame(collection: Collection) -> pd.DataFrame:
    """One row per evaluated search candidate (trace entry) with its policy's settings:
    ``rank`` (position in the pair ranking), ``layer`` -> ``source``, ``similarity``, ``accepted``."""
    rows = []
    for policy in collection.policies.values():
        trace = policy.data.get("trace") or []
        if not isinstance(trace, list):
            raise ValueError(f"policy file {policy.path}: 'trace' must be a list")
        base = {k: policy.row[k] for k in ("model", "policy", "policy_path", "order", "metric", "threshold",
                                           "seed", "procedure", "target", "rate_requested", "pairs_total")}
        base["calibration_sha256"] = policy.data.get("calibration_sha256")
        for entry in trace:
            if not isinstance(entry, dict) or not _number(entry.get("rank")) or "accepted" not in entry:
                raise ValueError(f"policy file {policy.path}: every trace entry needs 'rank' and 'accepted'")
            pair = entry.get("pair") or [None, None]
            rows.append({**base, "rank": entry["rank"], "layer": pair[0], "source": pair[1],
                         "distance": entry.get("distance"), "similarity": entry.get("similarity"),
                         "accepted": bool(entry["accepted"]), "seconds": entry.get("seconds")})
    frame = pd.DataFrame(rows, columns=TRACE_COLUMNS)
    frame["accepted"] = frame["accepted"].astype(bool)
    for column in ("rank", "layer", "source"):
        frame[column] = pd.to_numeric(frame[column]).astype("Int64")
    return _typed(_sort(frame, ["model", "order", "metric", "threshold", "target", "policy", "rank"]))


def passkey_cells_frame(collection: Collection) -> pd.DataFrame:
    """One row per passkey cell (length, depth) of every ``evaluate-longctx`` result."""
    rows = []
    for ev in collection.evals:
        if ev.stage != "evaluate-longctx":
            continue
        if ev.policy_key is None:
            base = plain_row(ev.model, None)
        else:
            base = collection.policies[ev.policy_key].row
        base = {k: base[k] for k in CELL_COLUMNS if k in base}
        base["cache"] = ev.cache
        for cell in ev.data["cells"]:
            rows.append({**base, "length": cell["length"], "depth": cell["depth"], "trials": cell.get("trials"),
                         "correct": cell.get("correct"), "accuracy": float(cell["accuracy"])})
    frame = pd.DataFrame(rows, columns=CELL_COLUMNS)
    frame["depth"] = pd.to_numeric(frame["depth"]).astype(float)
    for column in ("length", "trials", "correct"):
        frame[column] = pd.to_numeric(frame[column]).astype("Int64")
    return _typed(_sort(frame, ["model", "cache", "rate_requested", "order", "metric", "threshold", "seed",
                               "policy", "length", "depth"]))


# ------------------------------------------------------------------------------------------------
# distances
# ------------------------------------------------------------------------------------------------


@dataclass
class Distances:
    path: str
    model: str        # model label
    metric: str
    matrix: np.ndarray  # [L, L]


def load_distances(paths: Sequence[str | os.PathLike]) -> list[Distances]:
    out: list[Distances] = []
    seen: dict[tuple, str] = {}
    for path in paths:
        data = read_json(path, "distances")
        _require(data, ("metric", "model", "matrix"), Path(path), "distances")
        try:
            matrix = np.asarray(data["matrix"], dtype=float)
        except (TypeError, ValueError):
            matrix = np.empty(0)
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] < 2:
            raise ValueError(f"distances file {path}: 'matrix' must be a square L x L list of numbers")
        if data.get("n_layers") not in (None, matrix.shape[0]):
            raise ValueError(f"distances file {path}: n_layers {data['n_layers']} but a {matrix.shape[0]}-layer matrix")
        item = Distances(str(path), model_label(data["model"]), str(data["metric"]), matrix)
        ident = (item.model, item.metric)
        if ident in seen:
            raise ValueError(f"two {item.metric} distance files for model {item.model!r}: {seen[ident]} and {path}")
        seen[ident] = str(path)
        out.append(item)
    return sorted(out, key=lambda d: (d.model, METRICS.index(d.metric) if d.metric in METRICS else 99, d.metric))


# ------------------------------------------------------------------------------------------------
# selections shared by tables and figures
# ------------------------------------------------------------------------------------------------


def select(frame: pd.DataFrame, order: str | None = None, metric: str | None = None,
           threshold: float | None = None) -> pd.DataFrame:
    """Rows with this order / metric / threshold (``None``: any); the plain row never matches."""
    mask = pd.Series(True, index=frame.index)
    if order is not None:
        mask &= frame["order"].eq(order).fillna(False).astype(bool)
    if metric is not None:
        mask &= frame["metric"].eq(metric).fillna(False).astype(bool)
    if threshold is not None:
        values = pd.to_numeric(frame["threshold"], errors="coerce").to_numpy(dtype=float)
        mask &= pd.Series(np.isclose(values, threshold, rtol=0, atol=1e-9), index=frame.index)
    return frame[mask]


def plain(frame: pd.DataFrame) -> pd.DataFrame:
    """The plain-model rows (evaluations with ``policy: null``)."""
    return frame[frame["policy_path"].isna()]
