"""KV sharing through the transformers Cache API: shared layers store nothing and compute no K/V.

Two small pieces, no forked modeling file:

* ``SharedLayer`` — a cache layer (transformers' ``DummyLayer`` family: "shared-cache layers that consume
  cache produced by other layers") that holds no tensors. ``update`` returns the *source* layer's
  keys/values, already updated for the current step because the source is an earlier layer; sequence
  length and mask sizes resolve to the source. Any ``DynamicCache`` — the one ``generate`` builds, one the
  caller passes, or one we create — is *wired* by replacing its shared layers with ``SharedLayer``.
* ``SkippedProjection`` — stands in for a shared layer's ``k_proj``/``v_proj``: it returns a zero tensor
  *expanded* to the projection's output shape (no matmul, no allocation). Those values never reach
  attention, because the cache returns the source's K/V instead.

``KVSharing`` attaches both with a forward pre-hook on the decoder (so sharing also happens with
``use_cache=False``, where the model would otherwise build no cache) and detaches them exactly.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from transformers.cache_utils import Cache, DummyLayer, DynamicCache

from ..models.loading import ModelParts, find_parts, kv_shape, text_config
from .policy import PolicyError, SharingPolicy


class SharedLayer(DummyLayer):
    """Cache layer of a layer that reads ``source``'s K/V and stores none of its own."""

    def __init__(self, source, source_idx: int):
        super().__init__()
        self.source = source
        self.source_idx = source_idx
        self.is_sliding = getattr(source, "is_sliding", False)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.source.is_initialized or self.source.keys is None:
            raise RuntimeError(
                f"shared cache layer reads layer {self.source_idx}, which has not stored K/V yet in this forward"
            )
        # A source that does not hold its full K/V as plain tensors (quantized, merged) says what it
        # returned to its own attention in this forward; a plain DynamicLayer just has them.
        shared_kv = getattr(self.source, "shared_kv", None)
        keys, values = shared_kv() if shared_kv is not None else (self.source.keys, self.source.values)
        if key_states is None:
            return keys, values
        # a model spread over GPUs (device_map="auto") may hold the source layer on another GPU
        return keys.to(key_states.device), values.to(key_states.device)

    def get_seq_length(self) -> int:
        return self.source.get_seq_length()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.source.get_mask_sizes(query_length)

    def get_max_length(self) -> int:
        return self.source.get_max_length()

    def __repr__(self) -> str:
        return f"SharedLayer(source={self.source_idx})"


class SkippedProjection(nn.Module):
    """Replaces a shared layer's k/v projection: zeros expanded to the output shape, no compute."""

    def __init__(self, original: nn.Linear):
        super().__init__()
        self.out_features = original.out_features
        self.calls = 0  # how often it stood in for the real projection (tests read it)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return hidden_states.new_zeros(()).expand(*hidden_states.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"out_features={self.out_features} (skipped: this layer reads another layer's KV)"


def wire_cache(cache: Cache, policy: SharingPolicy) -> Cache:
    """Make ``cache`` follow ``policy`` in place (its shared layers become ``SharedLayer``)."""
    if getattr(cache, "_kvsharer_map", None) == policy.map:
        return cache
    if not isinstance(cache, DynamicCache):
        raise TypeError(
            f"KV sharing works with a transformers DynamicCache (or subclass); got {type(cache).__name__}"
        )
    if getattr(cache, "_kvsharer_map", None) is not None:
        raise ValueError("this cache was already wired for a different sharing policy")
    if cache.get_seq_length() > 0:
        raise ValueError("cannot apply a sharing policy to a cache that already holds tokens computed without it")
    n = policy.n_layers
    if cache.layer_class_to_replicate is not None:
        while len(cache.layers) < n:
            cache.layers.append(cache.layer_class_to_replicate())
    if len(cache.layers) != n:
        raise ValueError(f"cache has {len(cache.layers)} layers, the policy {n}")
    for layer in policy.shared_layers:
        src = policy.map[layer]
        if getattr(cache.layers[layer], "is_sliding", False) != getattr(cache.layers[src], "is_sliding", False):
            raise PolicyError(
                f"layer {layer} and its source {src} use different attention windows (sliding vs full); "
                "their caches cannot be shared"
            )
        cache.layers[layer] = SharedLayer(cache.layers[src], src)
    cache._kvsharer_map = list(policy.map)
    return cache


def cache_nbytes(cache: Cache | None) -> int:
    """Bytes of K/V a cache really holds (each storage counted once).

    A layer that stores its K/V in another form (quantized codes and scales, merged directions and
    magnitudes) reports them itself through ``stored_nbytes()``; for the others the ``keys``/``values``
    tensors are counted.
    """
    if cache is None:
        return 0
    seen, total = set(), 0
    for layer in cache.layers:
        stored = getattr(layer, "stored_nbytes", None)
        if stored is not None:
            total += int(stored())
            continue
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor) and tensor.numel() and tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                total += tensor.numel() * tensor.element_size()
    return total


def expected_kv_nbytes(model, policy: SharingPolicy | None, batch: int, tokens: int, dtype_bytes: int) -> int:
    """K/V bytes from the model shape alone: 2 × stored layers × batch × kv_heads × tokens × head_dim × bytes."""
    n_layers, kv_heads, head_dim = kv_shape(model)
    stored = n_layers - (policy.num_shared if policy else 0)
    return 2 * stored * batch * kv_heads * tokens * head_dim * dtype_bytes


class KVSharing:
    """Attach/detach a sharing policy to a model. Use ``share_kv(model, policy)`` as a context manager.

    A shared layer's ``k_proj``/``v_proj`` become ``SkippedProjection``s; in a fused-QKV architecture its
    fused projection becomes its adapter's Q-only stand-in (``kvsharer.models.FUSED_QKV_ADAPTERS``)."""

    def __init__(self, model: nn.Module, policy: SharingPolicy):
        self.model = model
        self.parts: ModelParts = find_parts(model)
        if policy.n_layers != self.parts.n_layers:
            raise PolicyError(
                f"invalid sharing map: it has {policy.n_layers} entries but {type(model).__name__} has "
                f"{self.parts.n_layers} decoder layers"
            )
        self.policy = policy
        self._originals: dict[tuple[int, str], nn.Module] = {}
        self._handles: list = []
        self._temporary: list[bool] = []  # per nested forward: did we create the cache?

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> "KVSharing":
        if self.attached:
            raise RuntimeError("this KVSharing is already attached")
        if getattr(self.model, "_kvsharer", None) is not None:
            raise RuntimeError("the model already has a sharing policy attached; detach it first")
        for layer in self.policy.shared_layers:
            attn = self.parts.attentions[layer]
            for name, stand_in in self._stand_ins(attn).items():
                self._originals[(layer, name)] = getattr(attn, name)
                setattr(attn, name, stand_in)
        decoder = self.parts.decoder
        self._handles = [
            decoder.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            decoder.register_forward_hook(self._after_forward, with_kwargs=True, always_call=True),
        ]
        self.model._kvsharer = self
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for (layer, name), original in self._originals.items():
            setattr(self.parts.attentions[layer], name, original)
        self._originals = {}
        if getattr(self.model, "_kvsharer", None) is self:
            del self.model._kvsharer

    def _stand_ins(self, attn: nn.Module) -> dict[str, nn.Module]:
        """What replaces a shared layer's projections: its k/v ones, or (fused QKV) the adapter's Q-only one."""
        fused = self.parts.fused
        if fused is not None:
            return {fused.projection: fused.skip_kv(attn)}
        return {name: SkippedProjection(getattr(attn, name)) for name in (self.parts.k_name, self.parts.v_name)}

    def skipped_projections(self) -> list[nn.Module]:
        """The stand-ins in place while attached (``SkippedProjection``s, or a fused-QKV adapter's modules)."""
        return [getattr(self.parts.attentions[layer], name) for layer, name in self._originals]

    # hooks ------------------------------------------------------------------------------------
    def _before_forward(self, module, args, kwargs):
        cache = kwargs.get("past_key_values")
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(text_config(self.model), "use_cache", True)
        created = cache is None
        if created:
            # Also with use_cache=False: without a cache the shared layers would use their own
            # (skipped) projections, and sharing would silently do nothing.
            cache = DynamicCache(config=self.model.config)
        kwargs["past_key_values"] = wire_cache(cache, self.policy)
        self._temporary.append(created and not use_cache)
        return args, kwargs

    def _after_forward(self, module, args, kwargs, output):
        temporary = self._temporary.pop() if self._temporary else False
        if temporary and output is not None and hasattr(output, "past_key_values"):
            output.past_key_values = None  # the caller asked for no cache: drop ours
        return output


@contextlib.contextmanager
def share_kv(model: nn.Module, policy: SharingPolicy) -> Iterator[KVSharing]:
    """``with share_kv(model, policy): ...`` — the model follows ``policy`` inside, is untouched after."""
    sharing = KVSharing(model, policy).attach()
    try:
        yield sharing
    finally:
        sharing.detach()


def attach(model: nn.Module, policy: SharingPolicy) -> KVSharing:
    return KVSharing(model, policy).attach()


def detach(model: nn.Module) -> None:
    sharing = getattr(model, "_kvsharer", None)
    if sharing is not None:
        sharing.detach()
