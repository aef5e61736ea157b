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

lm-eval's RULER tasks that generate their data offline (niah_single_1, niah_multikey_2, ruler_vt, ...;
see :mod:`kvsharer.evaluate.ruler`) run at the lengths of ``--max-seq-lengths``, one lm-eval evaluation
per length (``--limit`` counts per length); their result carries RULER's own score (not ``acc``) overall
and per length. RULER tasks that download their data are refused before the model loads.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from ..atomic import atomic_write_text
from . import result_header
from .lm_tasks import task_needs
from .scores import flatten_metrics, requested_scores
from ..models.loading import DTYPES, check_source, find_parts, load_model, resolve_device, text_config
from ..cache.compose import apply_setting
from ..cache.policy import SharingPolicy
from . import add_setting_arguments, parse_setting
from .longctx import context_window
from .ruler import check_window, parse_lengths, ruler_metadata, ruler_metrics, split_ruler

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


def task_results(out: dict) -> dict:
    """``{task: flattened metrics + samples, samples_total}`` of one ``simple_evaluate`` output."""
    counts = out.get("n-samples", {})
    return {
        name: {**flatten_metrics(metrics),
               "samples": counts.get(name, {}).get("effective"),
               "samples_total": counts.get(name, {}).get("original")}
        for name, metrics in out["results"].items()
    }


def tokenizer_folder(source: str, tokenizer, scratch: Path) -> str:
    """A folder RULER's generators can load the tokenizer from: the model folder, else a saved copy."""
    if Path(source).is_dir():
        return str(Path(source).resolve())
    tokenizer.save_pretrained(scratch)
    return str(scratch)


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
    parser.add_argument("--limit", type=int, default=None,
                        help="examples per task at most (RULER tasks: per length; default: all)")
    parser.add_argument("--max-seq-lengths", default=None,
                        help="RULER tasks only: comma-separated sequence lengths in tokens (default 4096)")
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
    ruler_names, other_names = split_ruler(names)
    lengths = parse_lengths(args.max_seq_lengths, ruler_names)
    check_window(lengths, context_window(args.model))
    policy, method = parse_setting(args)
    chunk = args.chunk if method is not None else None
    task_dir = args.task_dir.resolve() if args.task_dir is not None else None
    # RULER names are lm-eval's own (checked by split_ruler); each length gets its own TaskManager below
    task_manager, local = task_manager_for(other_names, task_dir) if other_names else (None, False)
    if local:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    model, tokenizer = load_model(args.model, dtype=args.dtype, attn_implementation=args.attn,
                                  device=resolve_device(args.device))
    check_window(lengths, getattr(text_config(model), "max_position_embeddings", None))
    policy = policy or SharingPolicy.identity(find_parts(model).n_layers)

    import lm_eval
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = streaming_lm(HFLM, chunk)(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size)

    def evaluate(task_names: list[str], manager) -> dict:
        return simple_evaluate(model=lm, tasks=task_names, limit=args.limit, num_fewshot=args.num_fewshot,
                               task_manager=manager, log_samples=False)

    tasks: dict = {}
    scores: dict = {}
    seconds_by_length = {}
    start = time.perf_counter()
    with apply_setting(model, policy, method), tempfile.TemporaryDirectory() as scratch:
        if other_names:
            out = evaluate(other_names, task_manager)
            tasks.update(task_results(out))
            # one score per requested name (a group's aggregate, a generation task's own metric): the tables' columns
            needs = task_needs(other_names, task_manager)
            scores.update(requested_scores(out, other_names, {name: n.metric for name, n in needs.items()},
                                           metric_label(task_manager), {name: n.leaves for name, n in needs.items()}))
        runs: dict = {name: {} for name in ruler_names}
        for length in lengths:
            t0 = time.perf_counter()
            metadata = ruler_metadata(length, tokenizer_folder(args.model, tokenizer, Path(scratch)))
            for name, metrics in task_results(evaluate(ruler_names, TaskManager(metadata=metadata))).items():
                runs[name][length] = (metrics, metrics["samples"])
            seconds_by_length[str(length)] = time.perf_counter() - t0
        tasks.update({name: ruler_metrics(by_length) for name, by_length in runs.items()})
    for name in ruler_names:  # a RULER task's score: its own metric, sample-weighted over the lengths
        scores[name] = {"metric": tasks[name]["metric"], "label": tasks[name]["metric"], "value": tasks[name]["score"],
                        "stderr": None, "kind": "task", "subtasks": 0}
    seconds = time.perf_counter() - start

    summary = {
        **result_header("evaluate-harness", args.model, args.policy, policy, method, chunk),
        "tasks": tasks, "scores": scores,
        "requested": names, "task_dir": str(task_dir) if task_dir else None,
        "limit": args.limit, "num_fewshot": args.num_fewshot, "batch_size": args.batch_size,
        "max_seq_lengths": lengths or None, "ruler_seconds_by_length": seconds_by_length or None,
        "dtype": args.dtype, "device": str(model.device), "lm_eval_version": lm_eval.__version__,
        "seconds": seconds,
    }
    atomic_write_text(args.out, json.dumps(summary, indent=2) + "\n")
    for name, score in scores.items():
        log.info("%s (%s): %s %s", name, score["kind"], score["label"], score["value"])
    log.info("harness (%d/%d layers shared) in %.1f s -> %s", policy.num_shared, policy.n_layers, seconds, args.out)
    return 0
