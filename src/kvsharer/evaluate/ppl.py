"""Perplexity of a model under a sharing policy (and cache method) on held-out text (stage ``evaluate-ppl``,
:mod:`kvsharer.stages.evaluate_ppl`).

The text is tokenized without special tokens; its first ``--max-tokens`` tokens (default: all of it) are
cut into non-overlapping windows of ``--window`` tokens, and the rest is dropped. Every window is scored
on its own, with no context carried over from the window before, so a window of W tokens scores its last
W - 1 tokens. The NLL is summed in float64; PPL = exp(NLL sum / tokens scored).

With a cache method (``--cache``) each window is streamed in chunks of ``--chunk`` tokens through one
cache (:mod:`kvsharer.evaluate.streaming`), so every prediction reads the compressed cache.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .streaming import chunk_logits


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
