"""The attention function that also scores cached tokens: eager attention in fp32, registered by name.

SDPA never returns attention weights, so compressed models run this function instead (registered with
``AttentionInterface.register(ATTENTION_NAME, ...)``; its masks come from ``sdpa_mask``, registered with
``AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)`` — a custom name without a registered mask
function gets no mask at all). Per call it

1. finds the layer's ``CompressedLayer`` (through the ``KVCompression`` attached to the attention module;
   for a layer that shares another layer's KV, the source's cache);
2. builds the boolean mask over the keys it got: the model's mask is in *position* coordinates
   (``[B, 1, q, seen + q]``, or ``None`` for plain causal), so it gathers the columns of the positions
   this cache stores (``positions [B, S]``); with no compressed cache it uses the mask as given;
3. computes softmax(QKᵀ·scale) V in fp32 per KV-head group (no ``repeat_kv`` copy), zeroing the rows of
   padding queries (fully masked rows would be NaN, and NaN outputs at padding positions would poison
   the V of later layers through ``0 · NaN``);
4. hands the probabilities to the cache (``observe``), which accumulates the method's scores and, after
   the last layer of a sharing group, compresses the cache.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import sdpa_mask

from .cache import CompressedLayer

ATTENTION_NAME = "kvsharer_intra"


def _as_bool(mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return mask
    return mask == 0  # additive float mask: 0 = attend, large negative = masked


def compressed_layer_for(module) -> CompressedLayer | None:
    """The compressed cache layer that ``module`` (an attention module) reads in this forward, if any."""
    compression = getattr(module, "_kvsharer_intra", None)
    cache = compression.current_cache if compression is not None else None
    if cache is None or module.layer_idx >= len(cache.layers):
        return None
    layer = cache.layers[module.layer_idx]
    layer = getattr(layer, "source", layer)  # a SharedLayer reads its source's cache
    return layer if isinstance(layer, CompressedLayer) else None


def scoring_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None or getattr(module, "sinks", None) is not None:
        raise NotImplementedError("kvsharer.intra attention supports neither logit soft-capping nor attention sinks")
    batch, heads, q_len, dim = query.shape
    kv_heads, stored = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    scaling = dim**-0.5 if scaling is None else scaling
    layer = compressed_layer_for(module)
    device = query.device

    if layer is not None:
        if layer.positions is None or layer.positions.shape[-1] != stored:
            raise RuntimeError(
                f"layer {module.layer_idx}: the compressed cache stores {None if layer.positions is None else layer.positions.shape[-1]} "
                f"positions for {stored} keys"
            )
        q_pos = torch.arange(layer.seen - q_len, layer.seen, device=device)
        if attention_mask is None:  # plain causal, no padding
            visible = layer.positions[:, None, None, :] <= q_pos[None, None, :, None]
            query_valid = torch.ones(batch, q_len, dtype=torch.bool, device=device)
        else:
            full = _as_bool(attention_mask)
            if full.shape[-1] != layer.seen:
                raise RuntimeError(
                    f"layer {module.layer_idx}: the attention mask has {full.shape[-1]} columns, expected {layer.seen} "
                    "(tokens seen); was the mask built for a different cache?"
                )
            full = full.expand(batch, 1, q_len, layer.seen)
            visible = full.gather(-1, layer.positions[:, None, None, :].expand(batch, 1, q_len, stored))
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
    if layer is not None:
        layer.observe(module.layer_idx, weights, query_valid)
    return out, weights


AttentionInterface.register(ATTENTION_NAME, scoring_attention_forward)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
