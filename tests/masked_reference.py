"""The slow reference of decoding after eviction: the plain model, no cache, each new query of a layer
masked to the positions that layer's cache kept (one set per layer, or one per KV head)."""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask


def reference_new_logits(model, full_tokens, kept, share_map, n_new):
    """Plain model, no cache: each of the last ``n_new`` queries of layer l sees only the positions its
    cache kept before them (``kept[source] [B, k]``, or ``[B, kv_heads, k]`` per KV head), plus the new
    tokens up to itself (an independent slow implementation)."""
    batch, length = full_tokens.shape
    first_new = length - n_new

    def masked(module, query, key, value, mask, **kwargs):
        heads = query.shape[1]
        positions = kept[share_map[module.layer_idx]]
        positions = positions[:, None] if positions.dim() == 2 else positions  # [B, 1 | kv_heads, k]
        old = torch.zeros(batch, positions.shape[1], first_new, dtype=torch.bool).scatter_(2, positions, True)
        old = old.repeat_interleave(heads // positions.shape[1], dim=1)  # [B, heads, first_new]
        visible = torch.ones(length, length, dtype=torch.bool).tril()[None, None].repeat(batch, heads, 1, 1)
        visible[:, :, first_new:, :first_new] = old[:, :, None, :]
        return sdpa_attention_forward(module, query, key, value, visible, **kwargs)

    AttentionInterface.register("kvsharer_intra_reference", masked)
    AttentionMaskInterface.register("kvsharer_intra_reference", sdpa_mask)
    inner = model.config._attn_implementation
    model.config._attn_implementation = "kvsharer_intra_reference"
    try:
        return model(full_tokens, use_cache=False).logits[:, first_new:]
    finally:
        model.config._attn_implementation = inner
