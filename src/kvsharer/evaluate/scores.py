"""One score per requested lm-eval name, from ``simple_evaluate``'s output (torch-free).

lm-eval's ``results`` holds every task it ran, the subtasks of a group included (``mmlu``: 57 subjects
and 4 categories; ``cmmlu``: 67 subjects); a group's aggregate (``acc`` weighted by subtask size) is in
``groups``. The paper reports one number per benchmark, so each *requested* name gets one score:

* a group with an aggregate: its aggregate metric (kind ``group``);
* a task: ``acc`` for multiple choice, else its own first metric (kind ``task``): a generation task such
  as xsum reports ``rouge``, whose value is unitxt's main ROUGE score, rougeL (``label``);
* a group or tag without an aggregate: lm-eval gives no single number; each of its tasks is scored on its
  own (kind ``subtask of <name>``). Preflight refuses such names before any job runs.
"""

from __future__ import annotations

from typing import Callable

from .lm_tasks import primary_metric


def flatten_metrics(task_results: dict) -> dict:
    """``{"alias": .., "acc,none": 0.5, "acc_stderr,none": 0.1}`` -> ``{"acc": 0.5, "acc_stderr": 0.1}``.
    A filter other than ``none`` stays in the name (``metric,filter``); non-numbers ("N/A") become None."""
    out = {}
    for key, value in task_results.items():
        if "," not in key:
            continue
        metric, filter_name = key.split(",", 1)
        name = metric if filter_name == "none" else key
        out[name] = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    return out


def _score(metrics: dict, metric: str | None, kind: str, label: Callable[[str], str]) -> dict:
    names = [k for k in metrics if not k.split(",")[0].endswith("_stderr")]
    if metric not in names:
        metric = primary_metric(names)
    stderr = metrics.get(f"{metric}_stderr") if metric and "," not in metric else None
    return {"metric": metric, "label": label(metric) if metric else None,
            "value": metrics.get(metric) if metric else None, "stderr": stderr, "kind": kind}


def requested_scores(out: dict, requested: list[str], metrics: dict[str, str | None] | None = None,
                     label: Callable[[str, str], str] | None = None,
                     members: dict[str, list[str]] | None = None) -> dict[str, dict]:
    """``{name: {"metric", "label", "value", "stderr", "kind", "subtasks"}}`` for every requested name.

    ``metrics``: the metric lm-eval's config names for a name (a group's first aggregate metric); without
    one, :func:`primary_metric` of what was reported. ``label(task, metric)``: how the column names the
    metric (default: the metric itself). ``members``: the tasks of a tag (lm-eval's output does not list
    them)."""
    metrics = metrics or {}
    results, groups = out.get("results", {}), out.get("groups", {})
    subtasks = out.get("group_subtasks", {})
    scores: dict[str, dict] = {}

    def leaves(name: str) -> list[str]:
        found = []
        for child in subtasks.get(name, (members or {}).get(name, [])):
            found += leaves(child) if child in subtasks else [child]
        return found

    for name in requested:
        def lab(metric, task=name):
            return label(task, metric) if label else metric

        if name in groups:
            score = _score(flatten_metrics(groups[name]), metrics.get(name), "group", lab)
            scores[name] = {**score, "subtasks": len(leaves(name))}
        elif name in results and name not in subtasks:
            scores[name] = {**_score(flatten_metrics(results[name]), metrics.get(name), "task", lab), "subtasks": 0}
        else:
            for leaf in leaves(name):
                if leaf in results:
                    score = _score(flatten_metrics(results[leaf]), None, f"subtask of {name}",
                                   lambda m, t=leaf: label(t, m) if label else m)
                    scores[leaf] = {**score, "subtasks": 0}
    return scores
