"""Stage ``evaluate-ppl``: perplexity of a model under a sharing policy (and cache method) on held-out text.

The text is tokenized without special tokens; its first ``--max-tokens`` tokens (default: all of it) are
cut into non-overlapping windows of ``--window`` tokens, and the rest is dropped. Every window is scored
on its own, with no context carried over from the window before, so a window of W tokens scores its last
W - 1 tokens. The NLL is summed in float64; PPL = exp(NLL sum / tokens scored).

With a cache method (``--cache``) each window is streamed in chunks of ``--chunk`` tokens through one
cache (:mod:`kvsharer.evaluate.streaming`), so every prediction reads the compressed cache.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..atomic import atomic_write_text
from . import result_header
from ..data import check_text_source, load_corpus, sha256_text
from ..models.loading import DTYPES, check_source, find_parts, load_model, resolve_device, text_config
from ..cache.compose import apply_setting
from ..cache.policy import SharingPolicy
from . import add_setting_arguments, parse_setting
from .streaming import chunk_logits

log = logging.getLogger("kvsharer")


def cut_windows(ids: list[int], window: int, max_tokens: int | None = None) -> torch.Tensor:
    """``[n, window]`` non-overlapping windows over the first ``max_tokens`` ids (default: all of them)."""
    budget = len(ids) if max_tokens is None else max_tokens
    if budget > len(ids):
        raise ValueError(f"the text has {len(ids)} tokens, fewer than --max-tokens {max_tokens}")
    n = budget // window
    if n < 1:
        raise ValueError(f"{budget} tokens do not fill one window of {window} tokens")
    return torch.tensor(ids[: n * window], dtype=torch.long).view(n, window)


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed NLL (float64) of ``targets`` under ``logits`` (the first ``targets.shape[1]`` positions)."""
    logits = logits[:, : targets.shape[1]]
    token_nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return token_nll.double().sum().cpu()


@torch.inference_mode()
def perplexity(model, input_ids_windows: torch.Tensor, batch_size: int, chunk: int | None = None) -> dict:
    """Score every window independently (inside ``share_kv``/``apply_setting`` to score a setting).

    ``chunk``: None scores a window in one forward without a cache; an int streams it through one cache
    in chunks of that many tokens (needed to see a cache method).
    Returns ``ppl``, ``nll_mean`` (nats per scored token), ``nll_sum``, ``tokens_scored``, ``windows``
    and ``window``. Per-token NLLs come from the model's logits in float32 and are summed in float64.
    """
    n, window = input_ids_windows.shape
    nll_sum = torch.zeros((), dtype=torch.float64)
    for start in tqdm(range(0, n, batch_size), desc="ppl", unit="batch", leave=False):
        batch = input_ids_windows[start : start + batch_size].to(model.device)
        if chunk is None:
            nll_sum += _nll(model(input_ids=batch, use_cache=False).logits, batch[:, 1:])
            continue
        for at, logits in chunk_logits(model, batch, chunk):
            targets = batch[:, at + 1 : at + 1 + logits.shape[1]]
            if targets.shape[1]:
                nll_sum += _nll(logits, targets)
    scored = n * (window - 1)
    nll_mean = nll_sum.item() / scored
    return {
        "ppl": math.exp(nll_mean),
        "nll_mean": nll_mean,
        "nll_sum": nll_sum.item(),
        "tokens_scored": scored,
        "windows": n,
        "window": window,
    }


@torch.inference_mode()
def kv_footprint(model, window_ids: torch.Tensor, chunk: int | None) -> dict:
    """K/V bytes the cache holds after one window ``[1, W]`` went through it (chunked like the scoring),
    next to the plain model's (every layer stores W tokens): ``kv_bytes``, ``kv_bytes_plain``,
    ``kv_fraction``. Call it inside the setting it measures."""
    from transformers.cache_utils import DynamicCache

    from ..cache.sharing import cache_nbytes, expected_kv_nbytes

    ids = window_ids.to(model.device)
    cache = DynamicCache(config=model.config)
    step = chunk or ids.shape[1]
    for start in range(0, ids.shape[1], step):
        model(input_ids=ids[:, start : start + step], past_key_values=cache, use_cache=True)
    held = cache_nbytes(cache)
    plain = expected_kv_nbytes(model, None, 1, ids.shape[1], model.dtype.itemsize)
    return {"kv_bytes": held, "kv_bytes_plain": plain, "kv_fraction": held / plain}


# ------------------------------------------------------------------------------------------------
# stage evaluate-ppl
# ------------------------------------------------------------------------------------------------


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
        result = perplexity(model, windows, args.batch_size, chunk)
        seconds = time.perf_counter() - start
        footprint = kv_footprint(model, windows[:1], chunk)

    summary = {
        **result_header("evaluate-ppl", args.model, args.policy, policy, method, chunk),
        "text": args.text, "corpus": args.corpus, "text_sha256": sha256_text(text), "text_tokens": len(ids),
        **result, **footprint,
        "max_tokens": args.max_tokens, "batch_size": args.batch_size,
        "dtype": args.dtype, "device": str(model.device),
        "seconds": seconds,
    }
    atomic_write_text(args.out, json.dumps(summary, indent=2) + "\n")
    log.info(
        "PPL %.4f (%d windows x %d tokens, %d/%d layers shared, cache %s, KV %.1f %% of plain) in %.1f s -> %s",
        result["ppl"], result["windows"], result["window"], policy.num_shared, policy.n_layers,
        method.spec if method else "plain", 100 * footprint["kv_fraction"], seconds, args.out,
    )
    return 0
