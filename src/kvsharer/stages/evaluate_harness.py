"""Stage ``evaluate-harness``: lm-eval harness accuracy under a sharing policy and a cache method
(:mod:`kvsharer.evaluate.harness`), as one JSON result."""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from ..atomic import atomic_write_text
from ..cache.compose import apply_setting
from ..cache.policy import SharingPolicy
from ..evaluate import result_header
from ..evaluate.harness import evaluate_tasks, scoring_lm, task_manager_for
from ..evaluate.longctx import context_window
from ..evaluate.ruler import check_window, parse_lengths, split_ruler
from ..evaluate.ruler_samples import build_ruler_tasks
from ..models.loading import (DTYPES, check_source, find_parts, load_model, resolve_device, text_config,
                              tokenizer_folder)
from .common import add_setting_arguments, parse_setting

log = logging.getLogger("kvsharer")


def parse_tasks(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError("--tasks names no task (give a comma-separated list, e.g. kvs_next_sentence,kvs_cloze)")
    return names


def check_max_length(max_length: int | None, window: int | None) -> None:
    if max_length is not None and window is not None and max_length > window:
        raise ValueError(f"--max-length {max_length} exceeds the model's window of {window} tokens "
                         "(max_position_embeddings)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model folder, hub id or embedded:<name>")
    add_setting_arguments(parser)
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task, group or tag names")
    parser.add_argument("--task-dir", type=Path, help="folder of local task YAMLs (from make-tasks)")
    parser.add_argument("--limit", type=int, default=None,
                        help="examples per task at most (RULER tasks: per length; default: all)")
    parser.add_argument("--max-seq-lengths", default=None,
                        help="RULER tasks only: comma-separated sequence lengths in tokens (default 4096)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="prompt + answer tokens at most: lm-eval truncates longer prompts from the left "
                             "(LongBench; default: the model's window)")
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
    if args.max_length is not None and args.max_length < 64:
        raise ValueError(f"--max-length must be at least 64 tokens, got {args.max_length}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.task_dir is not None and not args.task_dir.is_dir():
        raise ValueError(f"--task-dir {args.task_dir} is not a folder (build one with make-tasks)")
    check_source(args.model)
    ruler_names, other_names = split_ruler(names)
    lengths = parse_lengths(args.max_seq_lengths, ruler_names)
    check_window(lengths, context_window(args.model))
    check_max_length(args.max_length, context_window(args.model))
    policy, method = parse_setting(args)
    chunk = args.chunk if method is not None else None
    task_dir = args.task_dir.resolve() if args.task_dir is not None else None
    # RULER names are lm-eval's own (checked by split_ruler); each length gets its own TaskManager below
    task_manager, local = task_manager_for(other_names, task_dir) if other_names else (None, False)
    if local:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    with tempfile.TemporaryDirectory() as scratch:
        # RULER's data: generated from the tokenizer and checked for an answer before the model loads
        ruler_tasks = (build_ruler_tasks(ruler_names, lengths, tokenizer_folder(args.model, Path(scratch)))
                       if ruler_names else {})

        model, tokenizer = load_model(args.model, dtype=args.dtype, attn_implementation=args.attn,
                                      device=resolve_device(args.device))
        window = getattr(text_config(model), "max_position_embeddings", None)
        check_window(lengths, window)
        check_max_length(args.max_length, window)
        policy = policy or SharingPolicy.identity(find_parts(model).n_layers)

        import lm_eval
        from lm_eval.models.huggingface import HFLM

        lm = scoring_lm(HFLM, chunk)(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size,
                                     max_length=args.max_length)
        start = time.perf_counter()
        with apply_setting(model, policy, method):
            tasks, scores, seconds_by_length = evaluate_tasks(lm, other_names, task_manager, ruler_tasks,
                                                              args.limit, args.num_fewshot)
        seconds = time.perf_counter() - start

    summary = {
        **result_header("evaluate-harness", args.model, args.policy, policy, method, chunk),
        "tasks": tasks, "scores": scores,
        "requested": names, "task_dir": str(task_dir) if task_dir else None,
        "limit": args.limit, "num_fewshot": args.num_fewshot, "batch_size": args.batch_size,
        "max_length": args.max_length,
        "max_seq_lengths": lengths or None, "ruler_seconds_by_length": seconds_by_length or None,
        "dtype": args.dtype, "device": str(model.device), "lm_eval_version": lm_eval.__version__,
        "seconds": seconds,
    }
    atomic_write_text(args.out, json.dumps(summary, indent=2) + "\n")
    for name, score in scores.items():
        log.info("%s (%s): %s %s", name, score["kind"], score["label"], score["value"])
    log.info("harness (%d/%d layers shared) in %.1f s -> %s", policy.num_shared, policy.n_layers, seconds, args.out)
    return 0
