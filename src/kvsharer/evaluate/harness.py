"""Stage ``evaluate-harness``: lm-eval harness accuracy under a sharing policy.

The lm-evaluation-harness does all the scoring: ``simple_evaluate`` runs on an ``HFLM`` that wraps the
already loaded model, inside ``share_kv(model, policy)``. Nothing here re-implements it. With a cache
method (``--cache``), ``StreamingHFLM`` only changes how the logits are computed: each batch is streamed in
chunks of ``--chunk`` tokens through one cache, so the continuation is scored from the compressed cache.

Task names are checked against lm-eval's registry (plus ``--task-dir``) before the model is loaded. On a
cluster the paper's tasks are named directly (hellaswag, piqa, ...; their datasets come from the hub).
Offline, ``make-tasks`` builds local tasks from the held-out text; when every requested name is found in
``--task-dir`` the stage sets ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` (unless already set), since
such tasks only read local JSON files.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

from ..atomic import atomic_write_text
from . import result_header
from .lm_tasks import task_needs
from .scores import flatten_metrics, requested_scores
from ..models import DTYPES, check_source, find_parts, load_model, resolve_device
from ..compose import apply_setting
from ..policy import SharingPolicy
from . import add_setting_arguments, parse_setting

log = logging.getLogger("kvsharer")


def parse_tasks(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError("--tasks names no task (give a comma-separated list, e.g. kvs_next_sentence,kvs_cloze)")
    return names


def task_manager_for(names: list[str], task_dir: Path | None):
    """``(TaskManager that knows every name, whether all names are local)``, or ValueError naming the
    unknown ones. The task folder is indexed first; lm-eval's own registry (~15k names, a few seconds to
    scan) only when a name is not found there."""
    from lm_eval.tasks import TaskManager

    if task_dir is not None:
        local = TaskManager(include_path=str(task_dir), include_defaults=False)
        if all(name in local.all_tasks for name in names):
            return local, True
    manager = TaskManager(include_path=str(task_dir) if task_dir is not None else None)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        where = f" nor in --task-dir {task_dir}" if task_dir is not None else " (local tasks need --task-dir)"
        raise ValueError(f"unknown lm-eval task name(s): {', '.join(unknown)}; not in lm-eval's registry{where}")
    return manager, False


def metric_label(manager):
    """``label(task, metric)``: how a table names a task's metric. A unitxt task (xsum) reports each unitxt
    metric under its catalog name (``rouge``) with the metric's main score as the value: the label is that
    main score (``rougeL``), read from unitxt's catalog."""
    def label(task: str, metric: str) -> str:
        entry = manager.task_index.get(task)
        if entry is None or entry.yaml_path is None or Path(entry.yaml_path).parent.name != "unitxt":
            return metric
        try:
            from unitxt.artifact import fetch_artifact

            return getattr(fetch_artifact(f"metrics.{metric}")[0], "main_score", None) or metric
        except Exception:  # unitxt missing or no such catalog entry: the metric's own name
            return metric

    return label


def streaming_lm(hflm_class, chunk: int | None):
    """``hflm_class`` itself (no chunk), or a subclass whose ``_model_call`` streams chunks through one cache."""
    if chunk is None:
        return hflm_class
    from .streaming import streamed_logits

    class StreamingHFLM(hflm_class):
        def _model_call(self, inps, attn_mask=None, labels=None):
            if attn_mask is not None or labels is not None:  # seq2seq: not a decoder-only cache
                raise ValueError("--cache streams decoder-only models only")
            return streamed_logits(self.model, inps, chunk)

    return StreamingHFLM


# ------------------------------------------------------------------------------------------------
# stage evaluate-harness
# ------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model folder, hub id or embedded:<name>")
    add_setting_arguments(parser)
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task, group or tag names")
    parser.add_argument("--task-dir", type=Path, help="folder of local task YAMLs (from make-tasks)")
    parser.add_argument("--limit", type=int, default=None, help="examples per task at most (default: all)")
    parser.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", required=True, type=Path, help="result JSON")


def main(args: argparse.Namespace) -> int:
    names = parse_tasks(args.tasks)
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise ValueError(f"--num-fewshot must be at least 0, got {args.num_fewshot}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.task_dir is not None and not args.task_dir.is_dir():
        raise ValueError(f"--task-dir {args.task_dir} is not a folder (build one with make-tasks)")
    check_source(args.model)
    policy, method = parse_setting(args)
    chunk = args.chunk if method is not None else None
    task_dir = args.task_dir.resolve() if args.task_dir is not None else None
    task_manager, local = task_manager_for(names, task_dir)
    if local:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    model, tokenizer = load_model(args.model, dtype=args.dtype, attn_implementation=args.attn,
                                  device=resolve_device(args.device))
    policy = policy or SharingPolicy.identity(find_parts(model).n_layers)

    import lm_eval
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = streaming_lm(HFLM, chunk)(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size)
    start = time.perf_counter()
    with apply_setting(model, policy, method):
        out = simple_evaluate(model=lm, tasks=names, limit=args.limit, num_fewshot=args.num_fewshot,
                              task_manager=task_manager, log_samples=False)
    seconds = time.perf_counter() - start

    counts = out.get("n-samples", {})
    tasks = {
        name: {**flatten_metrics(metrics),
               "samples": counts.get(name, {}).get("effective"),
               "samples_total": counts.get(name, {}).get("original")}
        for name, metrics in out["results"].items()
    }
    # one score per requested name (a group's aggregate, a generation task's own metric): what the tables show
    needs = task_needs(names, task_manager)
    scores = requested_scores(out, names, {name: n.metric for name, n in needs.items()}, metric_label(task_manager),
                              {name: n.leaves for name, n in needs.items()})
    summary = {
        **result_header("evaluate-harness", args.model, args.policy, policy, method, chunk),
        "tasks": tasks, "scores": scores,
        "requested": names, "task_dir": str(task_dir) if task_dir else None,
        "limit": args.limit, "num_fewshot": args.num_fewshot, "batch_size": args.batch_size,
        "dtype": args.dtype, "device": str(model.device), "lm_eval_version": lm_eval.__version__,
        "seconds": seconds,
    }
    atomic_write_text(args.out, json.dumps(summary, indent=2) + "\n")
    for name, score in scores.items():
        log.info("%s (%s): %s %s", name, score["kind"], score["label"], score["value"])
    log.info("harness (%d/%d layers shared) in %.1f s -> %s", policy.num_shared, policy.n_layers, seconds, args.out)
    return 0
