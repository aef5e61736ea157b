"""What an lm-eval task name stands for, read from lm-eval's task index (no task is built, nothing downloaded).

For each requested name: whether it is a plain task, a group with an aggregate (``mmlu``: lm-eval
reports one ``acc`` weighted over its subtasks) or a group/tag without one (lm-eval reports only the
subtasks), its leaf tasks, the datasets they read (hub ids) and the Python packages their code imports
beyond lm-eval's own requirements (``xsum`` is a unitxt task: it needs ``unitxt``; LongBench's metrics
``jieba``, ``fuzzywuzzy`` and ``rouge``), and the metric the
report shows for it (:func:`primary_metric`). Preflight checks these before any job; the harness stage
records them with its scores. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# lm_eval/tasks/<folder> -> packages the folder's Python code imports (lm-eval does not install them)
FOLDER_PACKAGES = {"unitxt": ("unitxt",), "longbench": ("jieba", "fuzzywuzzy", "rouge")}
# metrics computed by a package lm-eval does not require
METRIC_PACKAGES = {"rouge": ("rouge_score",), "bleu": ("sacrebleu",), "chrf": ("sacrebleu",), "ter": ("sacrebleu",)}
# unitxt metrics that need NLTK data at scoring time (unitxt downloads it then: no internet, no score)
UNITXT_METRIC_NLTK_DATA = {"metrics.rouge": ("tokenizers/punkt_tab",)}
# dataset_path values that are local `datasets` builders, not hub ids
LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas", "imagefolder", "audiofolder"}


@dataclass
class TaskNeeds:
    name: str
    kind: str  # "task", "group" (lm-eval aggregates it), "group without aggregate", "tag"
    leaves: list[str] = field(default_factory=list)
    datasets: set[str] = field(default_factory=set)
    packages: set[str] = field(default_factory=set)
    nltk_data: set[str] = field(default_factory=set)  # NLTK resources its metrics load (nltk.data.find)
    metric: str | None = None  # what the report shows: a group's aggregate, a task's primary metric


def primary_metric(metrics: list[str]) -> str | None:
    """The metric a task is reported by: ``acc`` when it has one (multiple choice), else its first metric
    (a generation task's own: ``rouge`` for xsum, ``exact_match``, ...)."""
    if not metrics:
        return None
    return "acc" if "acc" in metrics else metrics[0]


def _metrics(cfg: dict) -> list[str]:
    return [m["metric"] for m in cfg.get("metric_list") or [] if isinstance(m, dict) and "metric" in m]


def _unitxt_catalog(name: str | None) -> dict:
    """An entry of unitxt's catalog (``cards.xsum`` -> catalog/cards/xsum.json) when unitxt is installed."""
    import importlib.util
    import json

    spec = importlib.util.find_spec("unitxt")
    if not isinstance(name, str) or spec is None or not spec.submodule_search_locations:
        return {}
    path = Path(list(spec.submodule_search_locations)[0], "catalog", *name.split(".")).with_suffix(".json")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _unitxt_recipe(cfg: dict, needs: "TaskNeeds") -> str | None:
    """The hub dataset of a unitxt recipe (``card=cards.xsum,...``), and the NLTK data its task's metrics load."""
    recipe = dict(part.split("=", 1) for part in str(cfg.get("recipe", "")).split(",") if "=" in part)
    card = _unitxt_catalog(recipe.get("card"))
    task = card.get("task")
    metrics = (_unitxt_catalog(task) if isinstance(task, str) else task or {}).get("metrics") or []
    for metric in metrics:
        needs.nltk_data.update(UNITXT_METRIC_NLTK_DATA.get(metric, ()))
    loader = card.get("loader") or {}
    return loader.get("path") if loader.get("__type__") == "load_hf" else None


def _leaf(entry, needs: TaskNeeds) -> None:
    cfg = entry.cfg or {}
    needs.leaves.append(entry.name)
    folder = Path(entry.yaml_path).parent.name if entry.yaml_path else ""
    needs.packages.update(FOLDER_PACKAGES.get(folder, ()))
    for metric in _metrics(cfg):
        needs.packages.update(METRIC_PACKAGES.get(metric, ()))
    path = cfg.get("dataset_path") or (_unitxt_recipe(cfg, needs) if folder == "unitxt" else None)
    if path and path not in LOCAL_BUILDERS and not Path(str(path)).exists():
        needs.datasets.add(str(path))


def _children(entry, index: dict) -> list:
    from lm_eval.tasks._index import Kind

    if entry.kind == Kind.TAG:
        return [e for e in index.values() if entry.name in (e.tags or ()) and e.kind in (Kind.TASK, Kind.PY_TASK)]
    out = []
    for child in (entry.cfg or {}).get("task") or []:
        name = child.get("task") if isinstance(child, dict) else child
        if isinstance(name, str) and name in index:
            out.append(index[name])
    return out


def task_needs(names: list[str], manager) -> dict[str, TaskNeeds]:
    """``TaskNeeds`` of each known name (unknown names are left out: the caller reports them)."""
    from lm_eval.tasks._index import Kind

    index = manager.task_index
    out = {}
    for name in names:
        entry = index.get(name)
        if entry is None:
            continue
        if entry.kind in (Kind.TASK, Kind.PY_TASK):
            needs = TaskNeeds(name, "task")
            _leaf(entry, needs)
            needs.metric = primary_metric(_metrics(entry.cfg or {}))
        else:
            aggregate = [m["metric"] for m in (entry.cfg or {}).get("aggregate_metric_list") or [] if "metric" in m]
            kind = "tag" if entry.kind == Kind.TAG else "group" if aggregate else "group without aggregate"
            needs = TaskNeeds(name, kind, metric=primary_metric(aggregate))
            stack, seen = list(_children(entry, index)), set()
            while stack:
                child = stack.pop()
                if child.name in seen:
                    continue
                seen.add(child.name)
                if child.kind in (Kind.TASK, Kind.PY_TASK):
                    _leaf(child, needs)
                else:
                    stack.extend(_children(child, index))
            needs.leaves.sort()
        out[name] = needs
    return out
