"""The scoring attention as it was before it went blockwise: the full fp32 [B, H, q, S] matrix of
probabilities, kept (in the tests, not in src) as the slow reference that the blockwise version must equal.

``reference_scoring_attention`` is the old ``kvsharer.methods.intra.attention.scoring_attention_forward`` line
for line, except that it returns ``(out, weights, query_valid)`` instead of handing ``weights`` to the
cache. ``reference_scores`` reduces ``weights`` the way the methods used to (H2O/KVMerger: sum over heads
and queries; PyramidInfer: per recent query, summed over heads). Used by tests/test_intra.py and by
benchmarks/scoring_attention.py.
"""

from __future__ import annotations

import torch

from kvsharer.methods.intra.attention import _as_bool, compressed_layer_for
from kvsharer.methods.intra.blockwise import AttentionScores


def reference_scoring_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """(out [B, q, H, D], weights [B, H, q, S] fp32, query_valid [B, q] or None)."""
    batch, heads, q_len, dim = query.shape
    kv_heads, stored = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    scaling = dim**-0.5 if scaling is None else scaling
    layer = compressed_layer_for(module)
    device = query.device

    if layer is not None:
        if layer.positions is None or layer.positions.shape[-1] != stored:
            raise RuntimeError("positions do not match the keys")
        q_pos = torch.arange(layer.seen - q_len, layer.seen, device=device)
        # [B, 1, 1, S], or [B, kvh, 1, S] when the method keeps one set of tokens per KV head
        pos = layer.positions[:, None, None, :] if layer.positions.dim() == 2 else layer.positions[:, :, None, :]
        if attention_mask is None:  # plain causal, no padding
            visible = pos <= q_pos[None, None, :, None]
            query_valid = torch.ones(batch, q_len, dtype=torch.bool, device=device)
        else:
            full = _as_bool(attention_mask)
            full = full.expand(batch, pos.shape[1], q_len, layer.seen)
            visible = full.gather(-1, pos.expand(batch, pos.shape[1], q_len, stored))
            # a token is padding iff it cannot see itself
            query_valid = full[:, 0, torch.arange(q_len, device=device), q_pos]
    else:
        query_valid = None
        if attention_mask is None:
            offset = stored - q_len  # bottom-right aligned causal mask
            visible = (torch.arange(stored, device=device)[None, :]
                       <= torch.arange(q_len, device=device)[:, None] + offset)[None, None]
            if not getattr(module, "is_causal", True):
                visible = torch.ones_like(visible)
        else:
            visible = _as_bool(attention_mask)

    q32 = query.float().reshape(batch, kv_heads, groups, q_len, dim)
    k32, v32 = key.float()[:, :, None], value.float()[:, :, None]  # [B, kvh, 1, S, D]
    logits = torch.matmul(q32, k32.transpose(-1, -2)) * scaling  # [B, kvh, g, q, S]
    logits.masked_fill_(~visible[:, :, None], float("-inf"))
    weights = torch.softmax(logits, dim=-1)
    del logits
    if query_valid is None:
        weights = torch.nan_to_num_(weights, nan=0.0)
    elif not bool(query_valid.all()):
        weights.masked_fill_(~query_valid[:, None, None, :, None], 0.0)
    if dropout > 0.0 and module.training:
        weights = torch.nn.functional.dropout(weights, p=dropout)
    out = torch.matmul(weights, v32)  # [B, kvh, g, q, D]
    out = out.reshape(batch, heads, q_len, dim).transpose(1, 2).contiguous().to(query.dtype)
    weights = weights.reshape(batch, heads, q_len, stored)
    return out, weights, query_valid


def reference_scores(weights: torch.Tensor, recent_rows: int, kv_heads: int | None = None) -> AttentionScores:
    """The reductions the methods used to take of ``weights [B, H, q, S]`` (``kv_heads``: also the recent
    rows per KV head, for a per-head method)."""
    rows = weights.sum(dim=1)  # [B, q, S]
    first = rows.shape[1] - min(recent_rows, rows.shape[1])
    heads = None
    if kv_heads is not None:
        batch, n_heads, q_len, stored = weights.shape
        heads = weights.reshape(batch, kv_heads, n_heads // kv_heads, q_len, stored).sum(dim=2)[:, :, first:]
    return AttentionScores(received=weights.sum(dim=(1, 2)), recent=rows[:, first:], recent_heads=heads)


def reference_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The old registered function: full-matrix attention, then the cache observes its reductions."""
    out, weights, query_valid = reference_scoring_attention(module, query, key, value, attention_mask, scaling, dropout)
    layer = compressed_layer_for(module)
    if layer is not None:
        kv_heads = key.shape[1] if layer.method.per_head else None
        layer.observe(module.layer_idx, reference_scores(weights, layer.method.recent_queries, kv_heads), query_valid)
    return out, weights
