"""What every cache method's attachment shares (token methods, quantization, MiniCache).

Each method gives the layers of a forward's ``DynamicCache`` its own cache-layer class, through a pair of
hooks on the decoder: a pre-hook (``prepend=True``: it runs before KV sharing's, whatever the order of
attachment) that finds the forward's cache — or creates one when ``use_cache`` is on and none was
passed — and wires it, and an always-called post-hook that ends the forward. ``DecoderHooks`` holds that
pair and the stack of the caches of the forwards in progress; ``prepare_layers`` checks a cache before
it is wired and gives it one slot per decoder layer; ``repoint_sharers`` keeps KV sharing's
``SharedLayer``s reading the new layer of their source.
"""

from __future__ import annotations

from torch import nn
from transformers.cache_utils import DynamicCache

from ..models.loading import ModelParts, find_parts, text_config


def prepare_layers(cache, n_layers: int, method: str, not_empty: str) -> None:
    """Refuse what cannot be wired (not a DynamicCache: ``"<method> works with …"``; a cache that already
    holds tokens: ``not_empty``) and give ``cache`` one layer per decoder layer."""
    if not isinstance(cache, DynamicCache):
        raise TypeError(f"{method} works with a transformers DynamicCache; got {type(cache).__name__}")
    if cache.get_seq_length() > 0:
        raise ValueError(not_empty)
    if cache.layer_class_to_replicate is not None:
        while len(cache.layers) < n_layers:
            cache.layers.append(cache.layer_class_to_replicate())
    if len(cache.layers) != n_layers:
        raise ValueError(f"cache has {len(cache.layers)} layers, the model {n_layers}")


def repoint_sharers(cache, share_map: list[int]) -> None:
    """Layers already wired by KV sharing (``SharedLayer``) read their source's new cache layer."""
    for layer, src in enumerate(share_map):
        if layer != src and hasattr(cache.layers[layer], "source"):
            cache.layers[layer].source = cache.layers[src]


class DecoderHooks:
    """The decoder pre/post hook pair of a cache method, and the caches of the forwards in progress.

    Subclasses implement ``wire(cache)`` and may override ``before_wiring()`` (checks at every forward)
    and ``end_forward(cache, output)``; ``self._stack[-1]`` is the current forward's cache.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.parts: ModelParts = find_parts(model)
        self._handles: list = []
        self._stack: list = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    @property
    def current_cache(self):
        return self._stack[-1] if self._stack else None

    def _register(self) -> None:
        if self.attached:
            raise RuntimeError(f"this {type(self).__name__} is already attached")
        decoder = self.parts.decoder
        self._handles = [
            decoder.register_forward_pre_hook(self._before_forward, with_kwargs=True, prepend=True),
            decoder.register_forward_hook(self._after_forward, always_call=True),
        ]

    def _unregister(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._stack = []

    # to implement -------------------------------------------------------------------------------
    def wire(self, cache) -> None:  # pragma: no cover
        raise NotImplementedError

    def before_wiring(self, kwargs) -> None:
        """Checks at every forward, before its cache is wired (e.g. a method attached after this one)."""

    def end_forward(self, cache, output) -> None:
        """After the decoder forward (``output`` is None when it failed)."""

    # hooks ----------------------------------------------------------------------------------------
    def _before_forward(self, module, args, kwargs):
        self._stack.append(None)  # pushed first: the always-called post-hook pops it even if wiring fails
        self.before_wiring(kwargs)
        cache = kwargs.get("past_key_values")
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(text_config(self.model), "use_cache", True)
        if cache is None and use_cache:
            cache = DynamicCache(config=self.model.config)
            kwargs["past_key_values"] = cache
        if cache is not None:
            self.wire(cache)
        self._stack[-1] = cache
        return args, kwargs

    def _after_forward(self, module, args, output):
        cache = self._stack.pop() if self._stack else None
        self.end_forward(cache, output)
        return output
