"""A token-level method as a cache method, alone or together with KV sharing.

``KVCompression(model, method)`` (or ``with compress_kv(model, method): ...``) is a
:class:`~kvsharer.cache.method.KVMethod`; attached, it does three things and undoes them exactly on detach:

1. **Attention implementation, on a copy of the config** (:func:`kvsharer.cache.hooks.swap_attention`).
   Every module that holds the decoder's config gets a shallow copy whose ``_attn_implementation`` is the
   scoring attention (:mod:`kvsharer.methods.intra.attention`). The original config object is never
   mutated, so another model built from the same config object is unaffected.
2. **Its cache layers.** Every layer that *stores* K/V holds a ``CompressedLayer``. With a sharing policy
   attached (``share_kv``), a source layer and its sharers form ONE physical cache: one ``CompressedLayer``
   at the source whose ``group`` lists every layer that reads it; the sharers keep their ``SharedLayer``s,
   pointing at it. The cache is scored by the attention of every layer in the group and compressed once the
   last of them has attended.
3. **A link from each attention module to this object** (``_kvsharer_intra``), through which the attention
   function finds the cache of the current forward (``current_cache``).

Composition: ``with share_kv(model, policy), compress_kv(model, method): ...`` (in either order) or,
equivalently, ``with compress_kv(model, method, policy=policy): ...``.
"""

from __future__ import annotations

from torch import nn

from ...cache.assembly import source_of
from ...cache.hooks import current_cache, restore_configs, swap_attention
from ...cache.method import KVMethod
from ...cache.policy import SharingPolicy
from ...cache.sharing import with_policy
from .attention import ATTENTION_NAME
from .base import TokenMethod
from .cache import CompressedLayer


class KVCompression(KVMethod):
    """A token-level method attached to a model. Use ``compress_kv(model, method)`` as a context manager."""

    title = "a token-level method (compress_kv)"
    with_sharing = True  # one CompressedLayer per sharing group, at its source
    replaces_layers = True

    def __init__(self, model: nn.Module, method: TokenMethod):
        if not isinstance(method, TokenMethod):
            raise TypeError(f"method must be a kvsharer.intra method (see kvsharer.intra.METHODS); got {method!r}")
        super().__init__(model)
        self.method = method
        self._config_swaps: list[tuple[nn.Module, object]] = []

    @classmethod
    def from_spec(cls, model: nn.Module, spec) -> "KVCompression":
        from . import make_method

        return cls(model, make_method(spec.name, spec.value))

    def build_layer(self, i: int, layers):
        if not self.own_layer(i, layers):
            return layers[i]  # a sharer reads its source's CompressedLayer; a layer without K/V keeps its own
        share_map = [source_of(layers, j) for j in range(len(layers))]
        group = [j for j, src in enumerate(share_map) if src == i]  # [i, its sharers...]
        sources = [j for j, src in enumerate(share_map) if src == j and self.parts.kinds[j].has_kv]  # storing, by depth
        sliding = getattr(layers[i], "is_sliding", False)
        return CompressedLayer(self.method, i, group, sources.index(i), len(sources), sliding)

    def on_attach(self) -> None:
        self._config_swaps = swap_attention(self.model, self.parts, ATTENTION_NAME)
        for attn in self.parts.attentions:
            if attn is not None:
                attn._kvsharer_intra = self

    def on_detach(self) -> None:
        for attn in self.parts.attentions:
            if attn is not None and getattr(attn, "_kvsharer_intra", None) is self:
                del attn._kvsharer_intra
        restore_configs(self._config_swaps)
        self._config_swaps = []

    @property
    def current_cache(self):
        """The cache of the model's forward in progress (read by the attention function)."""
        return current_cache(self.model)


def stored_tokens(cache) -> list[int | None]:
    """Per layer: tokens its cache really stores (None for a layer that shares another's KV)."""
    out = []
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        out.append(None if keys is None else int(keys.shape[-2]))
    return out


def compress_kv(model: nn.Module, method: TokenMethod, policy: SharingPolicy | None = None):
    """``with compress_kv(model, method[, policy]) as compression: ...`` — compressed (and shared) inside,
    untouched after.

    ``method``: a method instance, e.g. ``H2O(0.5)`` or ``make_method("h2o", 0.5)``.
    ``policy``: optional KV-sharing policy, attached for the duration too (same as nesting ``share_kv``).
    """
    return with_policy(KVCompression(model, method), policy)
