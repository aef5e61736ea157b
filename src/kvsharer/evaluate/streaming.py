"""Feed sequences through one cache in chunks, so that cache methods are seen by the scores.

A cache method (token eviction, quantization, MiniCache; see :mod:`kvsharer.cache.compose`) acts on the cache
between forwards. ``chunk_logits`` runs ``[B, T]`` tokens as ``ceil(T / chunk)`` forwards that share one
``DynamicCache``, yielding each chunk's logits: token ``t`` of chunk ``c`` is predicted from what the cache
kept of chunks ``0 … c-1`` plus the exact K/V of chunk ``c`` up to ``t``. Without a cache method the
logits equal a single forward (up to float summation order).
"""

from __future__ import annotations

from typing import Iterator

import torch
from transformers.cache_utils import DynamicCache


def check_chunk(chunk: int | None) -> None:
    if chunk is not None and chunk < 1:
        raise ValueError(f"--chunk must be at least 1 token, got {chunk}")


@torch.inference_mode()
def chunk_logits(model, input_ids: torch.Tensor, chunk: int) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(start, logits of input_ids[:, start:start+chunk])`` through one cache, chunk by chunk.

    No attention mask is passed, as in one causal forward: right padding only ever follows the tokens
    that are scored.
    """
    check_chunk(chunk)
    cache = DynamicCache(config=model.config)
    for start in range(0, input_ids.shape[1], chunk):
        out = model(input_ids=input_ids[:, start : start + chunk], past_key_values=cache, use_cache=True)
        yield start, out.logits


def streamed_logits(model, input_ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """All logits ``[B, T, V]`` of a chunked pass (what lm-eval's ``_model_call`` returns)."""
    return torch.cat([logits for _, logits in chunk_logits(model, input_ids, chunk)], dim=1)
