"""Stage ``evaluate-longctx``: passkey retrieval over lengths x depths under a sharing policy and a cache
method (:mod:`kvsharer.evaluate.longctx`), as one JSON result."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from ..atomic import atomic_write_text
from ..cache.compose import apply_setting
from ..cache.policy import SharingPolicy
from ..data import check_text_source, load_corpus, sha256_text
from ..evaluate import result_header
from ..evaluate.longctx import check_lengths, context_window, passkey_cells, sentence_ends
from ..models.loading import DTYPES, check_source, find_parts, load_model, resolve_device, text_config
from .common import add_setting_arguments, parse_setting

log = logging.getLogger("kvsharer")


def parse_list(text: str, kind, what: str) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--{what} must be a comma-separated list of {kind.__name__}s, got {text!r}") from None
    if not values:
        raise ValueError(f"--{what} is empty")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model folder, hub id or embedded:<name>")
    add_setting_arguments(parser, chunked=False)
    parser.add_argument("--text", required=True, help="held-out text for the filler: a file (or embedded:pydoc, hf:...)")
    parser.add_argument("--lengths", default="1024,2048,4096", help="comma-separated context lengths in tokens")
    parser.add_argument("--depths", default="0,0.5,1", help="comma-separated needle depths in [0, 1]")
    parser.add_argument("--trials", type=int, default=2, help="trials per (length, depth) cell")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=8, help="answer tokens generated greedily")
    parser.add_argument("--batch-size", type=int, default=None, help="trials per generate call (default: a whole cell)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", required=True, type=Path, help="result JSON")


def main(args: argparse.Namespace) -> int:
    lengths = parse_list(args.lengths, int, "lengths")
    depths = parse_list(args.depths, float, "depths")
    if min(lengths) < 1:
        raise ValueError(f"--lengths must be positive, got {args.lengths}")
    if not all(0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"--depths must lie in [0, 1], got {args.depths}")
    if args.trials < 1 or args.max_new_tokens < 1:
        raise ValueError(f"--trials and --max-new-tokens must be at least 1, got {args.trials}, {args.max_new_tokens}")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    check_source(args.model)
    check_text_source(args.text)
    check_lengths(lengths, args.max_new_tokens, context_window(args.model))
    policy, method = parse_setting(args)
    text = load_corpus(args.text)

    model, tokenizer = load_model(args.model, dtype=args.dtype, attn_implementation=args.attn,
                                  device=resolve_device(args.device))
    check_lengths(lengths, args.max_new_tokens, getattr(text_config(model), "max_position_embeddings", None))
    policy = policy or SharingPolicy.identity(find_parts(model).n_layers)
    haystack = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not haystack:
        raise ValueError(f"the text {args.text} is empty")
    ends = sentence_ends(tokenizer, haystack)

    start_time = time.perf_counter()
    with apply_setting(model, policy, method):
        cells = passkey_cells(model, tokenizer, haystack, ends, lengths, depths, args.trials, args.seed,
                              args.max_new_tokens, args.batch_size)
    seconds = time.perf_counter() - start_time

    total_correct = sum(c["correct"] for c in cells)
    total_trials = sum(c["trials"] for c in cells)
    summary = {
        **result_header("evaluate-longctx", args.model, args.policy, policy, method),
        "accuracy": total_correct / total_trials, "correct": total_correct, "trials_total": total_trials,
        "cells": cells,
        "lengths": lengths, "depths": depths, "trials": args.trials, "seed": args.seed,
        "max_new_tokens": args.max_new_tokens,
        "text": args.text, "text_sha256": sha256_text(text),
        "dtype": args.dtype, "device": str(model.device),
        "seconds": seconds,
    }
    atomic_write_text(args.out, json.dumps(summary, indent=2) + "\n")
    log.info("passkey accuracy %.3f (%d/%d, %d/%d layers shared) in %.1f s -> %s", summary["accuracy"],
             total_correct, total_trials, policy.num_shared, policy.n_layers, seconds, args.out)
    return 0
