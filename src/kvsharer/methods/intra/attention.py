"""The attention function that also scores cached tokens: fp32 attention over blocks of queries,
registered by name.

SDPA never returns attention weights, so compressed models run this function instead (registered with
``AttentionInterface.register(ATTENTION_NAME, ...)``; its masks come from ``sdpa_mask``, registered with
``AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)`` — a custom name without a registered mask
function gets no mask at all). Per call it

1. finds the layer's ``CompressedLayer`` (through the ``KVCompression`` attached to the attention module;
   for a layer that shares another layer's KV, the source's cache);
2. describes, per block of queries, the boolean mask over the keys it got: the model's mask is in
   *position* coordinates (``[B, 1, q, seen + q]``, or ``None`` for plain causal), so it gathers the
   columns of the positions this cache stores (``positions [B, S]``; ``[B, kv_heads, S]`` for a per-head
   method, giving one mask per KV head); with no compressed cache it uses the mask as given. A padding
   query is one that cannot see its own position;
3. computes softmax(QKᵀ·scale) V in fp32 per KV-head group, one block of queries at a time
   (:mod:`kvsharer.methods.intra.blockwise`: the [q, S] matrix of probabilities never exists), zeroing the rows
   of padding queries, and the attention each stored key received (plus the last rows the method asks
   for, ``method.recent_queries``);
4. hands those scores to the cache (``observe``), which accumulates the method's scores and, after the
   last layer of a sharing group, compresses the cache.

It returns no attention weights (``None``, as SDPA does): ``output_attentions=True`` gets ``None`` per
layer while a token method is attached.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import sdpa_mask

from . import blockwise
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


def _compressed_masks(module, layer: CompressedLayer, attention_mask, batch: int, q_len: int, stored: int):
    """(visible(start, stop) -> [B, 1, n, S], query_valid [B, q]) over the keys this cache stores."""
    if layer.positions is None or layer.positions.shape[-1] != stored:
        raise RuntimeError(
            f"layer {module.layer_idx}: the compressed cache stores {None if layer.positions is None else layer.positions.shape[-1]} "
            f"positions for {stored} keys"
        )
    positions = layer.positions  # [B, S], or [B, kv_heads, S] for a per-head method
    # as a mask's [B, 1 | kv_heads, queries, S] (blockwise broadcasts a mask over the query heads of a KV head)
    pos4 = positions[:, None, None, :] if positions.dim() == 2 else positions[:, :, None, :]
    q_pos = torch.arange(layer.seen - q_len, layer.seen, device=positions.device)  # [q]
    if attention_mask is None:  # plain causal, no padding
        def visible(start, stop):
            return pos4 <= q_pos[None, None, start:stop, None]

        return visible, torch.ones(batch, q_len, dtype=torch.bool, device=positions.device)

    if attention_mask.shape[-1] != layer.seen:
        raise RuntimeError(
            f"layer {module.layer_idx}: the attention mask has {attention_mask.shape[-1]} columns, expected {layer.seen} "
            "(tokens seen); was the mask built for a different cache?"
        )
    full = attention_mask.expand(batch, 1, q_len, layer.seen)  # a view: [B, 1, q, seen]

    def visible(start, stop):
        columns = pos4.expand(batch, pos4.shape[1], stop - start, stored)
        return _as_bool(full[:, :, start:stop].expand(batch, pos4.shape[1], stop - start, layer.seen).gather(-1, columns))

    # a token is padding iff it cannot see itself
    query_valid = _as_bool(full[:, 0, torch.arange(q_len, device=positions.device), q_pos])
    return visible, query_valid


def _plain_mask(module, attention_mask, q_len: int, stored: int, device):
    """visible(start, stop) -> [B|1, 1, n, S] for keys as given (no compressed cache)."""
    if attention_mask is not None:
        return lambda start, stop: _as_bool(attention_mask[:, :, start:stop])
    if not getattr(module, "is_causal", True):
        return lambda start, stop: torch.ones(1, 1, stop - start, stored, dtype=torch.bool, device=device)
    offset = stored - q_len  # bottom-right aligned causal mask
    keys = torch.arange(stored, device=device)
    return lambda start, stop: (keys[None, :] <= torch.arange(start, stop, device=device)[:, None] + offset)[None, None]


def scoring_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None or getattr(module, "sinks", None) is not None:
        raise NotImplementedError("kvsharer.methods.intra attention supports neither logit soft-capping nor attention sinks")
    batch, heads, q_len, dim = query.shape
    stored = key.shape[2]
    scaling = dim**-0.5 if scaling is None else scaling
    layer = compressed_layer_for(module)

    if layer is not None:
        visible, query_valid = _compressed_masks(module, layer, attention_mask, batch, q_len, stored)
    else:
        visible, query_valid = _plain_mask(module, attention_mask, q_len, stored, query.device), None
    out, scores = blockwise.blockwise_scoring_attention(
        query, key, value, visible, scaling, query_valid,
        recent_rows=layer.method.recent_queries if layer is not None else 0,
        block=blockwise.query_block(batch, heads, stored),
        dropout=dropout if module.training else 0.0,
        per_head=layer is not None and layer.method.per_head,
    )  # out [B, q, H, D]
    if layer is not None:
        layer.observe(module.layer_idx, scores, query_valid)
    return out, None


AttentionInterface.register(ATTENTION_NAME, scoring_attention_forward)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
