"""Stage ``evaluate-ppl``: perplexity on held-out text under a sharing policy and a cache method
(:mod:`kvsharer.evaluate.ppl`), as one JSON result."""

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
from ..evaluate.ppl import cut_windows, perplexity
from ..models.loading import DTYPES, check_source, find_parts, load_model, resolve_device, text_config
from .common import add_setting_arguments, parse_setting

log = logging.getLogger("kvsharer")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model folder, hub id or embedded:<name>")
    add_setting_arguments(parser)
    parser.add_argument("--text", required=True, help="held-out evaluation text: a file (or embedded:pydoc, hf:...)")
    parser.add_argument("--corpus", default=None,
                        help="label of a further held-out corpus (e.g. docstrings): reported as ppl:<label>; "
                             "default: the main held-out text, reported as ppl")
    parser.add_argument("--window", type=int, default=512, help="tokens per independently scored window")
    parser.add_argument("--max-tokens", type=int, default=None, help="score the first N tokens of the text (default: all)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", required=True, type=Path, help="result JSON")


def main(args: argparse.Namespace) -> int:
    if args.window < 2:
        raise ValueError(f"--window must be at least 2 tokens, got {args.window}")
    if args.max_tokens is not None and args.max_tokens < args.window:
        raise ValueError(f"--max-tokens {args.max_tokens} is smaller than one --window of {args.window}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.corpus is not None and not args.corpus.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"--corpus must be a short label of letters, digits, - and _, got {args.corpus!r}")
    check_source(args.model)
    check_text_source(args.text)
    policy, method = parse_setting(args)
    chunk = args.chunk if method is not None else None
    text = load_corpus(args.text)

    model, tokenizer = load_model(args.model, dtype=args.dtype, attn_implementation=args.attn,
                                  device=resolve_device(args.device))
    policy = policy or SharingPolicy.identity(find_parts(model).n_layers)
    max_positions = getattr(text_config(model), "max_position_embeddings", None)
    if max_positions is not None and args.window > max_positions:
        raise ValueError(f"--window {args.window} exceeds the model's context window of {max_positions} tokens")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    windows = cut_windows(ids, args.window, args.max_tokens)

    start = time.perf_counter()
    with apply_setting(model, policy, method):
        result = perplexity(model, windows, args.batch_size, chunk)  # with the K/V it held for one window
        seconds = time.perf_counter() - start

    summary = {
        **result_header("evaluate-ppl", args.model, args.policy, policy, method, chunk),
        "text": args.text, "corpus": args.corpus, "text_sha256": sha256_text(text), "text_tokens": len(ids),
        **result,
        "max_tokens": args.max_tokens, "batch_size": args.batch_size,
        "dtype": args.dtype, "device": str(model.device),
        "seconds": seconds,
    }
    atomic_write_text(args.out, json.dumps(summary, indent=2) + "\n")
    log.info(
        "PPL %.4f (%d windows x %d tokens, %d/%d layers shared, cache %s, KV %.1f %% of plain) in %.1f s -> %s",
        result["ppl"], result["windows"], result["window"], policy.num_shared, policy.n_layers,
        method.spec if method else "plain", 100 * result["kv_fraction"], seconds, args.out,
    )
    return 0
