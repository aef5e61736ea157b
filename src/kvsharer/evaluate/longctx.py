"""Passkey retrieval (a needle in a haystack) under a sharing policy (stage ``evaluate-longctx``,
:mod:`kvsharer.stages.evaluate_longctx`).

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

import logging
import random

import torch
from tqdm import tqdm

from ..models.loading import EMBEDDED_PREFIX, embedded_gguf, text_config

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


def passkey_cells(model, tokenizer, haystack: list[int], ends: list[bool], lengths: list[int], depths: list[float],
                  trials: int, seed: int, max_new_tokens: int, batch_size: int | None = None) -> list[dict]:
    """The passkey grid: per (length, depth) cell, ``trials`` prompts of ``length`` tokens of ``haystack`` (cut
    at sentence ends, ``ends``: :func:`sentence_ends`) with a random 5-digit key at ``depth``, answered
    greedily (``batch_size`` prompts per generate call, default a whole cell); one dict per cell with its
    accuracy and outputs. Run it inside the setting it evaluates."""
    starts = [0] + [i + 1 for i, end in enumerate(ends[:-1]) if end]
    cells = []
    grid = [(length, depth) for length in lengths for depth in depths]
    for length, depth in tqdm(grid, desc="passkey", unit="cell"):
        rng = random.Random(f"{seed}:{length}:{depth}")
        keys, prompts, needle_at = [], [], []
        for _ in range(trials):
            key, start = rng.randint(10000, 99999), rng.choice(starts)
            ids, at = passkey_prompt(tokenizer, haystack, ends, start, length, depth, key)
            keys.append(key)
            prompts.append(ids)
            needle_at.append(at)
        answers = greedy_answers(model, tokenizer, prompts, max_new_tokens, batch_size or trials)
        correct = sum(str(key) in answer for key, answer in zip(keys, answers))
        cells.append({
            "length": length, "depth": depth, "trials": trials, "correct": correct,
            "accuracy": correct / trials,
            "outputs": [{"key": k, "answer": a, "needle_at": p} for k, a, p in zip(keys, answers, needle_at)],
        })
        log.debug("length %d depth %.2f: %d/%d", length, depth, correct, trials)
    return cells


# ------------------------------------------------------------------------------------------------
# checks before loading
# ------------------------------------------------------------------------------------------------


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
