"""KV sharing through the transformers Cache API: shared layers store nothing and compute no K/V.

Two small pieces, no forked modeling file:

* ``SharedLayer`` — a cache layer (transformers' ``DummyLayer`` family: "shared-cache layers that consume
  cache produced by other layers") that holds no tensors. ``update`` returns the *source* layer's
  keys/values, already updated for the current step because the source is an earlier layer; sequence
  length and mask sizes resolve to the source. Any ``DynamicCache`` — the one ``generate`` builds, one the
  caller passes, or one the hooks create — is *wired* by replacing its shared layers with ``SharedLayer``.
* ``SkippedProjection`` — stands in for a shared layer's ``k_proj``/``v_proj``: it returns a zero tensor
  *expanded* to the projection's output shape (no matmul, no allocation). Those values never reach
  attention, because the cache returns the source's K/V instead.

``KVSharing`` is the cache method (:class:`kvsharer.cache.method.KVMethod`) that builds the first and swaps
in the second; it is attached like every other method (so sharing also happens with ``use_cache=False``,
where the model would otherwise build no cache) and detached exactly.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from transformers.cache_utils import Cache, DummyLayer

from ..models.loading import kv_shape
from .hooks import attached_methods
from .method import KVMethod, attach_all
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


class KVSharing(KVMethod):
    """A sharing policy attached to a model. Use ``share_kv(model, policy)`` (or the object itself) as a
    context manager.

    Its cache layers: a shared layer's is a ``SharedLayer`` reading its source's. Its model change: a shared
    layer's ``k_proj``/``v_proj`` become ``SkippedProjection``s; in a fused-QKV architecture its fused
    projection becomes its adapter's Q-only stand-in (``kvsharer.models.FUSED_QKV_ADAPTERS``)."""

    title = "a KV-sharing policy"
    shares = True
    # also with use_cache=False: without a cache the shared layers would use their own (skipped)
    # projections, and sharing would silently do nothing
    always_wires = True

    def __init__(self, model: nn.Module, policy: SharingPolicy):
        super().__init__(model)
        if policy.n_layers != self.parts.n_layers:
            raise PolicyError(
                f"invalid sharing map: it has {policy.n_layers} entries but {type(model).__name__} has "
                f"{self.parts.n_layers} decoder layers"
            )
        self.policy = policy
        self._originals: dict[tuple[int, str], nn.Module] = {}

    @property
    def wiring(self) -> tuple[int, ...]:
        return tuple(self.policy.map)  # a cache wired for the same map is wired for this policy

    def build_layer(self, i: int, layers):
        src = self.policy.map[i]
        if src == i:
            return layers[i]
        if getattr(layers[i], "is_sliding", False) != getattr(layers[src], "is_sliding", False):
            raise PolicyError(
                f"layer {i} and its source {src} use different attention windows (sliding vs full); "
                "their caches cannot be shared"
            )
        return SharedLayer(layers[src], src)

    def on_attach(self) -> None:
        for layer in self.policy.shared_layers:
            attn = self.parts.attentions[layer]
            for name, stand_in in self._stand_ins(attn).items():
                self._originals[(layer, name)] = getattr(attn, name)
                setattr(attn, name, stand_in)

    def on_detach(self) -> None:
        for (layer, name), original in self._originals.items():
            setattr(self.parts.attentions[layer], name, original)
        self._originals = {}

    def _stand_ins(self, attn: nn.Module) -> dict[str, nn.Module]:
        """What replaces a shared layer's projections: its k/v ones, or (fused QKV) the adapter's Q-only one."""
        fused = self.parts.fused
        if fused is not None:
            return {fused.projection: fused.skip_kv(attn)}
        return {name: SkippedProjection(getattr(attn, name)) for name in (self.parts.k_name, self.parts.v_name)}

    def skipped_projections(self) -> list[nn.Module]:
        """The stand-ins in place while attached (``SkippedProjection``s, or a fused-QKV adapter's modules)."""
        return [getattr(self.parts.attentions[layer], name) for layer, name in self._originals]


def share_kv(model: nn.Module, policy: SharingPolicy) -> KVSharing:
    """``with share_kv(model, policy): ...`` — the model follows ``policy`` inside, is untouched after."""
    return KVSharing(model, policy)


@contextlib.contextmanager
def with_policy(method: KVMethod, policy: SharingPolicy | None) -> Iterator[KVMethod]:
    """``with with_policy(method, policy): ...`` — ``method`` attached after ``policy``'s sharing (None: none)."""
    with attach_all(None if policy is None else KVSharing(method.model, policy), method):
        yield method


def attach(model: nn.Module, policy: SharingPolicy) -> KVSharing:
    return KVSharing(model, policy).attach()


def detach(model: nn.Module) -> None:
    """Detach the sharing policy attached to ``model``, if any."""
    for method in attached_methods(model):
        if isinstance(method, KVSharing):
            method.detach()
