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
from transformers.cache_utils import DynamicCache

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

    ``chunk``: None scores a window in one forward; an int streams it through one cache in chunks of that
    many tokens (needed to see a cache method).
    Returns ``ppl``, ``nll_mean`` (nats per scored token), ``nll_sum``, ``tokens_scored``, ``windows``
    and ``window``. Per-token NLLs come from the model's logits in float32 and are summed in float64.
    Also the K/V the setting held for one window, measured on the cache the first window was scored
    through (it goes alone: what a method keeps, e.g. MiniCache's retained tokens, can differ by row),
    next to the plain model's (every layer stores W tokens): ``kv_bytes``, ``kv_bytes_plain``,
    ``kv_fraction``.
    """
    from ..cache.sharing import cache_nbytes, expected_kv_nbytes

    n, window = input_ids_windows.shape
    nll_sum = torch.zeros((), dtype=torch.float64)
    held = None
    for start, end in tqdm([(0, 1)] + [(s, min(s + batch_size, n)) for s in range(1, n, batch_size)],
                           desc="ppl", unit="batch", leave=False):
        batch = input_ids_windows[start:end].to(model.device)
        cache = DynamicCache(config=model.config)
        if chunk is None:
            nll_sum += _nll(model(input_ids=batch, past_key_values=cache, use_cache=True).logits, batch[:, 1:])
        else:
            for at, logits in chunk_logits(model, batch, chunk, cache=cache):
                targets = batch[:, at + 1 : at + 1 + logits.shape[1]]
                if targets.shape[1]:
                    nll_sum += _nll(logits, targets)
        if held is None:
            held = cache_nbytes(cache)
        del cache
    scored = n * (window - 1)
    nll_mean = nll_sum.item() / scored
    plain = expected_kv_nbytes(model, None, 1, window, model.dtype.itemsize)
    return {
        "ppl": math.exp(nll_mean),
        "nll_mean": nll_mean,
        "nll_sum": nll_sum.item(),
        "tokens_scored": scored,
        "windows": n,
        "window": window,
        "kv_bytes": held, "kv_bytes_plain": plain, "kv_fraction": held / plain,
    }
