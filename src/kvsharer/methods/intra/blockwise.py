"""Scoring attention over blocks of queries: softmax(QKᵀ·scale)·V in fp32, and the attention each key
receives, without ever holding the [q, S] matrix of probabilities.

The token methods need two reductions of the fp32 attention probabilities ``P [B, H, q, S]``:

* ``received [B, S]``   — P summed over heads and queries (H2O's and KVMerger's scores);
* ``recent [B, r, S]``  — P summed over heads, for the last ``r`` queries (PyramidInfer's window);
* ``recent_heads [B, kvh, r, S]`` — the same rows summed over the query heads of each KV head only
  (SnapKV's per-head observation window; computed only when asked for).

Softmax runs over keys, so every query row is independent: a block of ``block`` queries yields exactly
those rows of the full matrix, and the output rows and the reductions are accumulated block by block
(only the fp32 summation order of ``received`` differs from a full-matrix sum). The extra memory is two
``[B, H, block, S]`` fp32 buffers (logits, probabilities) instead of two ``[B, H, q, S]`` ones: at 8k
tokens of a 9-head layer, 2 × 2.4 GB become 2 × ``BLOCK_BYTES``.

Per block, the keys to the right of the last key any of its queries may see are skipped (they would get
probability 0): in a causal prefill the block of queries ``i0..i1`` reads keys ``0..i1`` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

BLOCK_BYTES = 64 * 2**20  # one fp32 [B, H, block, S] buffer of logits (or probabilities) at most


@dataclass
class AttentionScores:
    """What one attention call hands to a cache's method (fp32, padding queries contribute nothing)."""

    received: torch.Tensor  # [B, S]: attention each stored key received, summed over heads and queries
    recent: torch.Tensor  # [B, r, S]: rows of the last r queries (r = min(requested, q)), summed over heads
    recent_heads: torch.Tensor | None = None  # [B, kvh, r, S]: those rows per KV head (per-head methods only)


def query_block(batch: int, heads: int, keys: int, budget_bytes: int | None = None) -> int:
    """Queries per block so that one fp32 [batch, heads, block, keys] buffer fits ``budget_bytes``
    (default ``BLOCK_BYTES``, read at call time); at least 1."""
    budget_bytes = BLOCK_BYTES if budget_bytes is None else budget_bytes
    return max(1, budget_bytes // (4 * batch * heads * max(keys, 1)))


def _last_visible_column(visible: torch.Tensor) -> int:
    """1 + index of the last key that any query of ``visible [b, 1, n, S]`` may see (0 if none)."""
    cols = visible.reshape(-1, visible.shape[-1]).any(dim=0)  # [S]
    seen = cols.nonzero()
    return int(seen[-1, 0]) + 1 if seen.numel() else 0


def blockwise_scoring_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    visible: Callable[[int, int], torch.Tensor],
    scaling: float,
    query_valid: torch.Tensor | None = None,
    recent_rows: int = 0,
    block: int | None = None,
    dropout: float = 0.0,
    per_head: bool = False,
) -> tuple[torch.Tensor, AttentionScores]:
    """Attention output ``[B, q, H, D]`` (query's dtype) and the scores of the stored keys.

    ``query [B, H, q, D]``, ``key``/``value [B, kvh, S, D]``; head ``h`` reads KV head ``h // (H / kvh)``
    (grouped-query attention without a ``repeat_kv`` copy). ``visible(start, stop)`` returns the boolean
    mask ``[B or 1, 1, stop - start, S]`` of the keys that queries ``start..stop-1`` may attend to.
    ``query_valid [B, q]``: rows of padding queries are zeroed; with ``None`` rows that see no key are
    zeroed (softmax over nothing is NaN, and NaN outputs would poison later layers through ``0 · NaN``).
    ``recent_rows``: how many of the last queries' rows ``scores.recent`` keeps. ``dropout`` (training
    only) applies to the probabilities before they are used, as eager attention does. ``per_head``:
    also keep those rows per KV head (``scores.recent_heads``).
    """
    batch, heads, q_len, dim = query.shape
    kv_heads, stored = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    block = block or query_block(batch, heads, stored)

    q32 = query.float().reshape(batch, kv_heads, groups, q_len, dim)
    k32, v32 = key.float()[:, :, None], value.float()[:, :, None]  # [B, kvh, 1, S, D]
    out = q32.new_zeros(batch, kv_heads, groups, q_len, dim)
    received = q32.new_zeros(batch, stored)
    n_recent = min(recent_rows, q_len)
    first_recent = q_len - n_recent  # index of the first query whose row `recent` keeps
    recent = q32.new_zeros(batch, n_recent, stored)
    recent_heads = q32.new_zeros(batch, kv_heads, n_recent, stored) if per_head else None

    for start in range(0, q_len, block):
        stop = min(start + block, q_len)
        mask = visible(start, stop)  # [B|1, 1, n, S]
        # one block (decoding, short prompts): every key, without the host sync of finding the last one
        width = stored if stop - start == q_len else _last_visible_column(mask)
        if width == 0:  # no query of the block sees any key: its rows stay zero
            continue
        mask = mask[..., :width]
        logits = torch.matmul(q32[:, :, :, start:stop], k32[:, :, :, :width].transpose(-1, -2))  # [B, kvh, g, n, w]
        logits.mul_(scaling).masked_fill_(~mask[:, :, None], float("-inf"))
        weights = torch.softmax(logits, dim=-1)  # [B, kvh, g, n, w]
        del logits
        if query_valid is None:
            weights = torch.nan_to_num_(weights, nan=0.0)
        else:
            valid = query_valid[:, start:stop]  # [B, n]
            if not bool(valid.all()):
                weights.masked_fill_(~valid[:, None, None, :, None], 0.0)
        if dropout > 0.0:
            weights = torch.nn.functional.dropout(weights, p=dropout)
        out[:, :, :, start:stop] = torch.matmul(weights, v32[:, :, :, :width])  # [B, kvh, g, n, D]
        received[:, :width] += weights.sum(dim=(1, 2, 3))  # [B, w]
        lo = max(start, first_recent)
        if lo < stop:  # this block holds some of the last `n_recent` queries
            recent[:, lo - first_recent:stop - first_recent, :width] = weights[:, :, :, lo - start:].sum(dim=(1, 2))
            if per_head:
                recent_heads[:, :, lo - first_recent:stop - first_recent, :width] = weights[:, :, :, lo - start:].sum(dim=2)
        del weights

    out = out.reshape(batch, heads, q_len, dim).transpose(1, 2).contiguous().to(query.dtype)  # [B, q, H, D]
    return out, AttentionScores(received, recent, recent_heads)
