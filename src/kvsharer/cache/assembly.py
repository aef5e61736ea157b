"""Assemble a forward's cache (a ``DynamicCache``, ``StaticCache`` or any transformers ``Cache`` made of
per-layer objects) from the cache methods attached: every method builds its layers
in turn (KV sharing first), the transformers way — a cache is its list of layers (``Cache(layers=...)``).

A cache is wired once: it remembers the methods it was wired for (``WIRED``, its one kvsharer attribute),
so the forwards after the first (decoding steps, chunks of a streamed score) use it as it is.
"""

from __future__ import annotations

from typing import Sequence

from transformers.cache_utils import Cache

WIRED = "_kvsharer_wiring"  # on a cache: the ``wiring`` of the methods it was assembled for, in order


def source_of(layers: Sequence, i: int) -> int:
    """The layer whose cache layer ``i`` reads: itself, or (a KV-sharing ``SharedLayer``) its source."""
    return getattr(layers[i], "source_idx", i)


def assemble_cache(cache, methods: Sequence, n_layers: int):
    """Give ``cache`` the layers of ``methods`` (in place; ``methods`` in wiring order, KV sharing first).

    A layer that reads another layer's cache (``source_idx``) is pointed at that layer's final cache layer.
    Refused: a cache that is not a transformers ``Cache``, one wired for other methods, one that already holds
    tokens, one with another number of layers than the model.
    """
    wiring = tuple(method.wiring for method in methods)
    wired = getattr(cache, WIRED, None)
    if wired == wiring:
        return cache
    names = " and ".join(method.title for method in methods)
    if not isinstance(cache, Cache):
        raise TypeError(f"{names} works with a transformers Cache (DynamicCache, StaticCache, ...); "
                        f"got {type(cache).__name__}")
    if wired is not None:
        raise ValueError(f"this cache was wired for other cache methods than {names}; start a fresh cache")
    if cache.get_seq_length() > 0:
        raise ValueError(f"cannot apply {names} to a cache that already holds tokens computed without it")
    if cache.layer_class_to_replicate is not None:  # a cache built without a config: one layer per decoder layer
        while len(cache.layers) < n_layers:
            cache.layers.append(cache.layer_class_to_replicate())
    if len(cache.layers) != n_layers:
        raise ValueError(f"cache has {len(cache.layers)} layers, the model {n_layers}")
    layers = cache.layers
    for method in methods:
        for i in range(n_layers):
            layers[i] = method.build_layer(i, layers)
        for layer in layers:  # a sharer reads its source's new cache layer
            if hasattr(layer, "source_idx"):
                layer.connect(layers[layer.source_idx])
    setattr(cache, WIRED, wiring)
    return cache
