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

from ..models import ModelParts, find_parts, text_config
from ..policy import SharingPolicy
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
    if not isinstance(cache, DynamicCache):
        raise TypeError(f"token-level compression works with a transformers DynamicCache; got {type(cache).__name__}")
    if cache.get_seq_length() > 0:
        raise ValueError("cannot compress a cache that already holds tokens computed without compression")
    if cache.layer_class_to_replicate is not None:
        while len(cache.layers) < n_layers:
            cache.layers.append(cache.layer_class_to_replicate())
    if len(cache.layers) != n_layers:
        raise ValueError(f"cache has {len(cache.layers)} layers, the model {n_layers}")
    share_map = list(range(n_layers)) if share_map is None else share_map
    groups = SharingPolicy(share_map).groups()  # validates the map
    sources = sorted(groups)
    for rank, src in enumerate(sources):
        old = cache.layers[src]
        cache.layers[src] = CompressedLayer(method, src, groups[src], rank, len(sources), getattr(old, "is_sliding", False))
    for layer, src in enumerate(share_map):
        if layer != src and hasattr(cache.layers[layer], "source"):  # already a SharedLayer: re-point it
            cache.layers[layer].source = cache.layers[src]
    cache._kvsharer_intra = method
    return cache


class KVCompression:
    """Attach/detach a token-level method. Use ``compress_kv(model, method)`` as a context manager."""

    def __init__(self, model: nn.Module, method: TokenMethod):
        if not isinstance(method, TokenMethod):
            raise TypeError(f"method must be a kvsharer.intra method (see kvsharer.intra.METHODS); got {method!r}")
        self.model = model
        self.method = method
        self.parts: ModelParts = find_parts(model)
        self._handles: list = []
        self._config_swaps: list[tuple[nn.Module, object]] = []
        self._stack: list = []  # caches of the forwards in progress

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    @property
    def current_cache(self):
        return self._stack[-1] if self._stack else None

    def attach(self) -> "KVCompression":
        if self.attached:
            raise RuntimeError("this KVCompression is already attached")
        if getattr(self.model, "_kvsharer_intra", None) is not None:
            raise RuntimeError("the model already has a token-level method attached; detach it first")
        self._swap_configs()
        for attn in self.parts.attentions:
            attn._kvsharer_intra = self
        decoder = self.parts.decoder
        self._handles = [
            decoder.register_forward_pre_hook(self._before_forward, with_kwargs=True, prepend=True),
            decoder.register_forward_hook(self._after_forward, always_call=True),
        ]
        self.model._kvsharer_intra = self
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for attn in self.parts.attentions:
            if getattr(attn, "_kvsharer_intra", None) is self:
                del attn._kvsharer_intra
        for module, original in self._config_swaps:
            module.config = original
        self._config_swaps = []
        self._stack = []
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

    # hooks ------------------------------------------------------------------------------------
    def _before_forward(self, module, args, kwargs):
        self._stack.append(None)  # pushed first: the always-called post-hook pops it even if wiring fails
        cache = kwargs.get("past_key_values")
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(text_config(self.model), "use_cache", True)
        if cache is None and use_cache:
            cache = DynamicCache(config=self.model.config)
            kwargs["past_key_values"] = cache
        if cache is not None:
            wire_compressed(cache, self.method, self.parts.n_layers, share_map_of(self.model, cache))
        self._stack[-1] = cache
        return args, kwargs

    def _after_forward(self, module, args, output):
        if self._stack:
            self._stack.pop()
        return output


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
    from ..sharing import share_kv

    with contextlib.ExitStack() as stack:
        if policy is not None:
            stack.enter_context(share_kv(model, policy))
        compression = KVCompression(model, method).attach()
        stack.callback(compression.detach)
        yield compression
