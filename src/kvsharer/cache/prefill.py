"""A cache for one prefill-only forward that keeps every token each attention layer attended over.

Calibration and the fast search run prefill-only forwards and read each storing layer's K/V afterwards. A
sliding-window cache layer stores only its last ``window - 1`` tokens, although its attention saw all of them
(transformers' mask, built from the config's layer types, does the windowing). With past recording on
(``activate_past_recording``, transformers' own switch for assisted decoding) it keeps them all until a
``crop``, and still returns to attention exactly what it would without it — so the forward is unchanged and
the K/V read afterwards cover every token, as for a full-attention layer.
"""

from __future__ import annotations

from transformers.cache_utils import DynamicCache


def prefill_cache(config) -> DynamicCache:
    """The config's own cache (a layer object per layer type: sliding, hybrid, linear …) whose sliding layers
    keep every token of the forward."""
    cache = DynamicCache(config=config)
    for layer in cache.layers:
        if getattr(layer, "is_sliding", False) and hasattr(layer, "activate_past_recording"):
            layer.activate_past_recording()
    return cache
