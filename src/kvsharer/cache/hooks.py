"""The one attach path of every cache method: a hook pair on the decoder, shared by the methods of a model.

``CacheHooks`` lives on the model (``model._kvsharer_hooks``) while at least one cache method is attached.
Its pre-hook (``prepend=True``: before any other) finds the forward's cache — or creates one when
``use_cache`` is on and none was passed, or when a method wires even a cache the caller will not get
(KV sharing: ``use_cache=False`` still needs the sources' K/V) — and assembles it from the attached methods
(:func:`kvsharer.cache.assembly.assemble_cache`). Its post-hook (always called, also when the forward
failed) hands each method the end of the forward and drops a cache the caller did not ask for.

``swap_attention`` is the generic helper for a method that runs its own attention function.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from torch import nn
from transformers.cache_utils import DynamicCache

from ..models.loading import ModelParts, text_config
from .assembly import assemble_cache

if TYPE_CHECKING:  # pragma: no cover
    from .method import KVMethod

ATTRIBUTE = "_kvsharer_hooks"  # on the model, while a cache method is attached


class CacheHooks:
    """The decoder hook pair of one model and the cache methods attached to it (KV sharing first)."""

    def __init__(self, model: nn.Module, parts: ModelParts):
        self.model = model
        self.parts = parts
        self.methods: list[KVMethod] = []
        self._handles: list = []
        self._stack: list[tuple[object, bool] | None] = []  # per forward in progress: (cache, temporary)

    @property
    def current_cache(self):
        """The cache of the innermost forward in progress (None outside a forward, or without a cache)."""
        return self._stack[-1][0] if self._stack and self._stack[-1] is not None else None

    def add(self, method: "KVMethod") -> None:
        method.on_attach()
        self.methods = sorted([*self.methods, method], key=lambda m: not m.shares)  # KV sharing wires first
        if len(self.methods) == 1:
            decoder = self.parts.decoder
            self._handles = [
                decoder.register_forward_pre_hook(self._before_forward, with_kwargs=True, prepend=True),
                decoder.register_forward_hook(self._after_forward, with_kwargs=True, always_call=True),
            ]
            setattr(self.model, ATTRIBUTE, self)

    def remove(self, method: "KVMethod") -> None:
        self.methods = [m for m in self.methods if m is not method]
        method.on_detach()
        if not self.methods:
            for handle in self._handles:
                handle.remove()
            self._handles, self._stack = [], []
            if getattr(self.model, ATTRIBUTE, None) is self:
                delattr(self.model, ATTRIBUTE)

    # hooks ----------------------------------------------------------------------------------------
    def _before_forward(self, module, args, kwargs):
        self._stack.append(None)  # pushed first: the always-called post-hook pops it even if wiring fails
        cache = kwargs.get("past_key_values")
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(text_config(self.model), "use_cache", True)
        created = cache is None
        # a cache the caller will not get (use_cache=False, none passed) holds only what must be wired anyway
        methods = self.methods if use_cache or not created else [m for m in self.methods if m.always_wires]
        if created and methods:
            cache = DynamicCache(config=self.model.config)
        if cache is not None:
            kwargs["past_key_values"] = assemble_cache(cache, methods, self.parts.n_layers)
            if not use_cache:  # a decoder that hands its layers no cache without it (Whisper's) must get ours
                kwargs["use_cache"] = True
        self._stack[-1] = (cache, created and not use_cache)
        return args, kwargs

    def _after_forward(self, module, args, kwargs, output):
        cache, temporary = (self._stack.pop() if self._stack else None) or (None, False)
        for method in self.methods:
            method.end_forward(cache, output, kwargs)
        if temporary and output is not None and hasattr(output, "past_key_values"):
            output.past_key_values = None  # the caller asked for no cache: drop ours
        return output


def attached_methods(model: nn.Module) -> list["KVMethod"]:
    """The cache methods attached to ``model`` (KV sharing first); empty when none is."""
    hooks = getattr(model, ATTRIBUTE, None)
    return list(hooks.methods) if hooks is not None else []


def attach_method(method: "KVMethod") -> None:
    (getattr(method.model, ATTRIBUTE, None) or CacheHooks(method.model, method.parts)).add(method)


def detach_method(method: "KVMethod") -> None:
    getattr(method.model, ATTRIBUTE).remove(method)


def current_cache(model: nn.Module):
    """The cache of ``model``'s forward in progress, as the attached methods wired it (None: none)."""
    hooks = getattr(model, ATTRIBUTE, None)
    return hooks.current_cache if hooks is not None else None


def swap_attention(model: nn.Module, parts: ModelParts, name: str) -> list[tuple[nn.Module, object]]:
    """Make ``model`` run the attention function registered as ``name``; returns what ``restore_configs`` undoes.

    Every module holding the decoder's config gets a shallow copy whose ``_attn_implementation`` is
    ``name``. transformers' ``set_attn_implementation`` would mutate the config object, which other models
    built from it (and its sub-configs) share; the original objects are untouched here and put back on
    restore.
    """
    targets = {id(parts.decoder.config)} | {id(a.config) for a in parts.attentions if hasattr(a, "config")}
    copies: dict[int, object] = {}
    swaps = []
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is None or id(config) not in targets:
            continue
        if id(config) not in copies:
            twin = copy.copy(config)
            twin._attn_implementation_internal = name  # no setter: sub-configs stay untouched
            copies[id(config)] = twin
        swaps.append((module, config))
        module.config = copies[id(config)]
    return swaps


def restore_configs(swaps: list[tuple[nn.Module, object]]) -> None:
    for module, original in swaps:
        module.config = original
