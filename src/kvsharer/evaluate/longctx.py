"""Stage ``evaluate-longctx``: passkey retrieval (a needle in a haystack) under a sharing policy.

A prompt of exactly ``length`` tokens is: the tokenizer's special prefix (e.g. BOS), a one-line
instruction, filler (held-out text from a random sentence start, wrapping around at the end), the needle
"The pass key is 12345. Remember it. 12345 is the pass key." inserted at the sentence boundary nearest to
``depth`` of the filler (0: first, 1: last), and the question "What is the pass key? The pass key is".
The model answers greedily for a few tokens; a trial is correct when the answer contains the key.

Every (length, depth) cell runs ``--trials`` trials with their own 5-digit key and filler, seeded by
``(seed, length, depth)``: a cell gives the same result whatever else is in the grid. All prompts of a
cell have exactly ``length`` tokens, so its trials batch without any padding.

With a cache method (``--cache``) the prompt is prefilled exactly, the method then acts on the cache
(evicts to its budget, quantizes, merges layers), and the answer is decoded from what it kept: the
needle-in-a-haystack grid of a compressed cache.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..atomic import atomic_write_text
from . import result_header
from ..data import check_text_source, load_corpus, sha256_text
from ..models.loading import (DTYPES, EMBEDDED_PREFIX, check_source, embedded_gguf, find_parts, load_model,
                      resolve_device, text_config)
from ..cache.compose import apply_setting
from ..cache.policy import SharingPolicy
from . import add_setting_arguments, parse_setting

log = logging.getLogger("kvsharer")

INSTRUCTION = ("There is an important piece of information hidden inside a lot of irrelevant text. "
               "Find it and memorize it. I will quiz you about it.\n\n")
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\n\nWhat is the pass key? The pass key is"


# ------------------------------------------------------------------------------------------------
# prompts (pure)
# ------------------------------------------------------------------------------------------------


def sentence_ends(tokenizer, ids: list[int]) -> list[bool]:
    """``ends[i]``: token ``i`` closes a sentence or a line, so a needle may follow it."""
    unique = sorted(set(ids))
    texts = tokenizer.batch_decode([[t] for t in unique])
    closes = {t: s.rstrip(" ").endswith((".", "!", "?", "\n")) for t, s in zip(unique, texts)}
    return [closes[t] for t in ids]


def passkey_prompt(tokenizer, haystack: list[int], ends: list[bool], start: int, length: int, depth: float,
                   key: int) -> tuple[list[int], int]:
    """``(prompt ids, index of the needle's first token)``: exactly ``length`` tokens, filler read from
    ``haystack[start:]`` (wrapping around), the needle at the sentence boundary nearest to ``depth``."""
    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    prefix = tokenizer("", add_special_tokens=True)["input_ids"]  # BOS or nothing, as the model expects
    head, needle, question = prefix + encode(INSTRUCTION), encode(NEEDLE.format(key=key)), encode(QUESTION)
    n_fill = length - len(head) - len(needle) - len(question)
    if n_fill < 0:
        raise ValueError(
            f"context length {length} is too short: instruction, pass key and question alone take "
            f"{length - n_fill} tokens"
        )
    positions = [(start + k) % len(haystack) for k in range(n_fill)]
    filler = [haystack[p] for p in positions]
    cuts = [0] + [k + 1 for k, p in enumerate(positions) if ends[p]] + [n_fill]
    cut = min(cuts, key=lambda c: (abs(c - depth * n_fill), c))
    return head + filler[:cut] + needle + filler[cut:] + question, len(head) + cut


@torch.inference_mode()
def greedy_answers(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy continuations of equal-length prompts, ``batch_size`` at a time."""
    answers = []
    for i in range(0, len(prompts), batch_size):
        batch = torch.tensor(prompts[i : i + batch_size], dtype=torch.long, device=model.device)
        out = model.generate(
            input_ids=batch, attention_mask=torch.ones_like(batch), max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=tokenizer.pad_token_id,
        )
        answers += tokenizer.batch_decode(out[:, batch.shape[1]:], skip_special_tokens=True)
    return answers


# ------------------------------------------------------------------------------------------------
# checks before loading
# ------------------------------------------------------------------------------------------------


def parse_list(text: str, kind, what: str) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--{what} must be a comma-separated list of {kind.__name__}s, got {text!r}") from None
    if not values:
        raise ValueError(f"--{what} is empty")
    return values


def context_window(source: str) -> int | None:
    """``max_position_embeddings`` from the model's config alone (no weights); None when unreadable."""
    from transformers import AutoConfig

    try:
        if source.startswith(EMBEDDED_PREFIX):
            gguf = embedded_gguf(source[len(EMBEDDED_PREFIX):])
            config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        else:
            config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError):
        return None  # e.g. a hub id offline: checked again once the model is loaded
    return getattr(text_config(config), "max_position_embeddings", None)


def check_lengths(lengths: list[int], max_new_tokens: int, window: int | None) -> None:
    too_long = [n for n in lengths if window is not None and n + max_new_tokens > window]
    if too_long:
        raise ValueError(
            f"context length(s) {', '.join(map(str, too_long))} plus {max_new_tokens} answer tokens exceed the "
            f"model's window of {window} tokens (max_position_embeddings)"
        )


# ------------------------------------------------------------------------------------------------
# stage evaluate-longctx
# ------------------------------------------------------------------------------------------------


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
    starts = [0] + [i + 1 for i, end in enumerate(ends[:-1]) if end]

    cells = []
    start_time = time.perf_counter()
    grid = [(length, depth) for length in lengths for depth in depths]
    with apply_setting(model, policy, method):
        for length, depth in tqdm(grid, desc="passkey", unit="cell"):
            rng = random.Random(f"{args.seed}:{length}:{depth}")
            keys, prompts, needle_at = [], [], []
            for _ in range(args.trials):
                key, start = rng.randint(10000, 99999), rng.choice(starts)
                ids, at = passkey_prompt(tokenizer, haystack, ends, start, length, depth, key)
                keys.append(key)
                prompts.append(ids)
                needle_at.append(at)
            answers = greedy_answers(model, tokenizer, prompts, args.max_new_tokens, args.batch_size or args.trials)
            correct = sum(str(key) in answer for key, answer in zip(keys, answers))
            cells.append({
                "length": length, "depth": depth, "trials": args.trials, "correct": correct,
                "accuracy": correct / args.trials,
                "outputs": [{"key": k, "answer": a, "needle_at": p} for k, a, p in zip(keys, answers, needle_at)],
            })
            log.debug("length %d depth %.2f: %d/%d", length, depth, correct, args.trials)
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
