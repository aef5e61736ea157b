"""Feed sequences through one cache in chunks, so that cache methods are seen by the scores.

A cache method (token eviction, quantization, MiniCache; see :mod:`kvsharer.cache.compose`) acts on the cache
between forwards. ``chunk_logits`` runs ``[B, T]`` tokens as ``ceil(T / chunk)`` forwards that share one
``DynamicCache``, yielding each chunk's logits: token ``t`` of chunk ``c`` is predicted from what the cache
kept of chunks ``0 … c-1`` plus the exact K/V of chunk ``c`` up to ``t``. Without a cache method the
logits equal a single forward (up to float summation order).
"""

from __future__ import annotations

import inspect
from typing import Iterator

import torch
from transformers.cache_utils import DynamicCache


def check_chunk(chunk: int | None) -> None:
    if chunk is not None and chunk < 1:
        raise ValueError(f"--chunk must be at least 1 token, got {chunk}")


def takes_logits_to_keep(model) -> bool:
    """Whether the model's forward computes the LM head for the last positions only (transformers'
    ``logits_to_keep``; a remote-code model may not have it)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


@torch.inference_mode()
def chunk_logits(model, input_ids: torch.Tensor, chunk: int, prefill: int = 0,
                 cache: DynamicCache | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(start, logits of input_ids[:, start:start+chunk])`` through one cache, chunk by chunk.

    ``prefill`` > 0: tokens ``[0, prefill)`` first go through as one forward whose logits are not wanted
    (a prompt prefilled at once, then compressed by the cache method); the chunks start at ``prefill``.
    ``cache``: the (empty) cache to stream through, for a caller that measures it afterwards.

    No attention mask is passed, as in one causal forward: right padding only ever follows the tokens
    that are scored.
    """
    check_chunk(chunk)
    cache = DynamicCache(config=model.config) if cache is None else cache
    if prefill > 0:
        keep = {"logits_to_keep": 1} if takes_logits_to_keep(model) else {}
        model(input_ids=input_ids[:, :prefill], past_key_values=cache, use_cache=True, **keep)
    for start in range(max(prefill, 0), input_ids.shape[1], chunk):
        out = model(input_ids=input_ids[:, start : start + chunk], past_key_values=cache, use_cache=True)
        yield start, out.logits


def streamed_logits(model, input_ids: torch.Tensor, chunk: int, prefill: int = 0) -> torch.Tensor:
    """Logits ``[B, T - prefill, V]`` of positions ``prefill …`` of a chunked pass."""
    return torch.cat([logits for _, logits in chunk_logits(model, input_ids, chunk, prefill)], dim=1)


@torch.inference_mode()
def scored_logits(model, input_ids: torch.Tensor, first: int, chunk: int | None = None) -> torch.Tensor:
    """Logits ``[B, T - first, V]`` of positions ``first …`` of ``input_ids [B, T]``: no LM head (nor, with a
    cache method, any exact K/V) for the positions before ``first``, which nothing scores. ``chunk`` None:
    one forward; an int: ``[0, first)`` as one prefill through a cache, then chunks of ``chunk``."""
    if chunk is not None:
        return streamed_logits(model, input_ids, chunk, prefill=first)
    keep = input_ids.shape[1] - first
    kwargs = {"logits_to_keep": keep} if takes_logits_to_keep(model) and 0 < keep < input_ids.shape[1] else {}
    logits = model(input_ids=input_ids, use_cache=False, **kwargs).logits
    return logits[:, logits.shape[1] - keep :]


def first_scored_position(input_ids: torch.Tensor, longest_continuation: int | None, pad_id: int = 0) -> int:
    """The earliest position whose logit lm-eval may score in a right-padded batch ``[B, T]``: each row's
    real length is at least the position after its last non-pad token (a real token equal to ``pad_id``
    at the end only makes this earlier), less the longest continuation of the requests. 0 when
    ``longest_continuation`` is unknown (every position may be scored)."""
    if not longest_continuation:
        return 0
    nonpad = input_ids != pad_id  # [B, T]
    positions = torch.arange(1, input_ids.shape[1] + 1)
    real = (nonpad * positions).amax(dim=1)  # [B] position after each row's last non-pad token
    return max(0, int(real.min()) - longest_continuation)
