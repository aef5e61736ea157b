"""Attach a token-level method to a model, alone or together with KV sharing.

``KVCompression(model, method).attach()`` (or ``with compress_kv(model, method): ...``) does three things
and undoes them exactly on ``detach``:

1. **Attention implementation, on a copy of the config.** Every module that holds the decoder's config
   gets a shallow copy whose ``_attn_implementation`` is the scoring attention
   (:mod:`kvsharer.intra.attention`). The original config object is never mutated, so another model
   built from the same config object is unaffected; detach puts the original objects back.
2. **A forward pre-hook on the decoder** (``prepend=True``: it runs before KV sharing's hook, whatever
   the order of attachment) that wires whatever ``DynamicCache`` the forward gets — or a fresh one when
   ``use_cache`` is on and none was passed — so that every layer that *stores* K/V holds a
   ``CompressedLayer``. With a sharing policy attached (``share_kv``), a source layer and its sharers
   form ONE physical cache: one ``CompressedLayer`` at the source whose ``group`` lists every layer that
   reads it; sharing's hook then gives the sharers ``SharedLayer``s pointing at it. The cache is scored
   by the attention of every layer in the group and compressed once the last of them has attended.
3. **A link from each attention module to this object**, through which the attention function finds the
   cache of the current forward (held only during the forward).

Composition: ``with share_kv(model, policy), compress_kv(model, method): ...`` or, equivalently,
``with compress_kv(model, method, policy=policy): ...`` (which attaches the sharing itself).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator

from torch import nn
from transformers.cache_utils import DynamicCache

from ...cache.hooks import DecoderHooks, prepare_layers, repoint_sharers
from ...cache.policy import SharingPolicy
from .attention import ATTENTION_NAME
from .base import TokenMethod
from .cache import CompressedLayer


def share_map_of(model: nn.Module, cache=None) -> list[int] | None:
    """The sharing map in force: the cache's (if already wired) or the attached policy's."""
    wired = getattr(cache, "_kvsharer_map", None)
    if wired is not None:
        return list(wired)
    sharing = getattr(model, "_kvsharer", None)
    return list(sharing.policy.map) if sharing is not None else None


def wire_compressed(cache: DynamicCache, method: TokenMethod, n_layers: int, share_map: list[int] | None = None) -> DynamicCache:
    """Give every storing layer of ``cache`` a ``CompressedLayer`` for ``method`` (in place)."""
    if getattr(cache, "_kvsharer_intra", None) is method:
        return cache
    if getattr(cache, "_kvsharer_intra", None) is not None:
        raise ValueError("this cache is already compressed by another token-level method")
    prepare_layers(cache, n_layers, "token-level compression",
                   "cannot compress a cache that already holds tokens computed without compression")
    share_map = list(range(n_layers)) if share_map is None else share_map
    groups = SharingPolicy(share_map).groups()  # validates the map
    sources = sorted(groups)
    for rank, src in enumerate(sources):
        old = cache.layers[src]
        cache.layers[src] = CompressedLayer(method, src, groups[src], rank, len(sources), getattr(old, "is_sliding", False))
    repoint_sharers(cache, share_map)
    cache._kvsharer_intra = method
    return cache


class KVCompression(DecoderHooks):
    """Attach/detach a token-level method. Use ``compress_kv(model, method)`` as a context manager."""

    def __init__(self, model: nn.Module, method: TokenMethod):
        if not isinstance(method, TokenMethod):
            raise TypeError(f"method must be a kvsharer.intra method (see kvsharer.intra.METHODS); got {method!r}")
        super().__init__(model)
        self.method = method
        self._config_swaps: list[tuple[nn.Module, object]] = []

    def attach(self) -> "KVCompression":
        if self.attached:
            raise RuntimeError("this KVCompression is already attached")
        if getattr(self.model, "_kvsharer_intra", None) is not None:
            raise RuntimeError("the model already has a token-level method attached; detach it first")
        self._swap_configs()
        for attn in self.parts.attentions:
            attn._kvsharer_intra = self
        self._register()
        self.model._kvsharer_intra = self
        return self

    def detach(self) -> None:
        self._unregister()
        for attn in self.parts.attentions:
            if getattr(attn, "_kvsharer_intra", None) is self:
                del attn._kvsharer_intra
        for module, original in self._config_swaps:
            module.config = original
        self._config_swaps = []
        if getattr(self.model, "_kvsharer_intra", None) is self:
            del self.model._kvsharer_intra

    def _swap_configs(self) -> None:
        """Point every module holding the decoder's config at a copy that selects the scoring attention."""
        targets = {id(self.parts.decoder.config)} | {id(a.config) for a in self.parts.attentions if hasattr(a, "config")}
        copies: dict[int, object] = {}
        for module in self.model.modules():
            config = getattr(module, "config", None)
            if config is None or id(config) not in targets:
                continue
            if id(config) not in copies:
                twin = copy.copy(config)
                twin._attn_implementation_internal = ATTENTION_NAME  # no setter: sub-configs stay untouched
                copies[id(config)] = twin
            self._config_swaps.append((module, config))
            module.config = copies[id(config)]

    def wire(self, cache) -> None:
        wire_compressed(cache, self.method, self.parts.n_layers, share_map_of(self.model, cache))


def stored_tokens(cache) -> list[int | None]:
    """Per layer: tokens its cache really stores (None for a layer that shares another's KV)."""
    out = []
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        out.append(None if keys is None else int(keys.shape[-2]))
    return out


@contextlib.contextmanager
def compress_kv(model: nn.Module, method: TokenMethod, policy: SharingPolicy | None = None) -> Iterator[KVCompression]:
    """``with compress_kv(model, method[, policy]): ...`` — compressed (and shared) inside, untouched after.

    ``method``: a method instance, e.g. ``H2O(0.5)`` or ``make_method("h2o", 0.5)``.
    ``policy``: optional KV-sharing policy, attached for the duration too (same as nesting ``share_kv``).
    """
    from ...cache.sharing import share_kv

    with contextlib.ExitStack() as stack:
        if policy is not None:
            stack.enter_context(share_kv(model, policy))
        compression = KVCompression(model, method).attach()
        stack.callback(compression.detach)
        yield compression


def attach_spec(model: nn.Module, spec) -> contextlib.AbstractContextManager:
    """The registry's attach path for a token-level spec (``spec.name``, ``spec.value``: its budget)."""
    from . import make_method

    return compress_kv(model, make_method(spec.name, spec.value))
