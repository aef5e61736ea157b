"""KV sharing through the transformers Cache API: shared layers store nothing and compute no K/V.

Two small pieces, no forked modeling file:

* ``SharedLayer`` — a cache layer (transformers' ``DummyLayer`` family: "shared-cache layers that consume
  cache produced by other layers") that holds no tensors. ``update`` returns the *source* layer's
  keys/values, already updated for the current step because the source is an earlier layer; sequence
  length and mask sizes resolve to the source. Any ``DynamicCache`` — the one ``generate`` builds, one the
  caller passes, or one the hooks create — is *wired* by replacing its shared layers with ``SharedLayer``.
* ``SkippedProjection`` — stands in for a shared layer's ``k_proj``/``v_proj``: it returns one row of zeros
  *expanded* to the projection's output shape (no matmul, one row allocated). Those values never reach
  attention, because the cache returns the source's K/V instead.

``KVSharing`` is the cache method (:class:`kvsharer.cache.method.KVMethod`) that builds the first and swaps
in the second; it is attached like every other method (so sharing also happens with ``use_cache=False``,
where the model would otherwise build no cache) and detached exactly.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin, DummyLayer

from ..models.layer_kinds import layer_kinds, policy_problems
from ..models.loading import kv_shape, text_config
from .hooks import attached_methods
from .method import KVMethod, attach_all
from .policy import PolicyError, SharingPolicy


class ReturnedKV:
    """Stands in for a source cache layer's ``update`` (an instance attribute, so the layer's class is
    untouched): calls it and keeps what it *returned* to the source's own attention in this forward.

    That is what a sharer must attend over — not what the layer *stores*: a sliding-window layer returns
    every token of the forward but keeps only its last ``window - 1``; a quantized one returns full precision
    but stores codes; an offloaded one returns the on-device tensors and moves its store to the CPU. For a
    plain layer the returned tensors *are* the stored ones, so nothing extra is held. ``clear()`` (after every
    decoder forward) drops the reference, so nothing lingers between forwards either."""

    def __init__(self, layer):
        self.layer = layer
        self.update = layer.update  # the layer's own (bound) update
        self.kv: tuple[torch.Tensor, torch.Tensor] | None = None
        self.before: tuple[int, int, tuple[int, int]] | None = None  # (seq length, query, mask sizes) before it

    def __call__(self, key_states, value_states, *args, **kwargs):
        query = key_states.shape[-2]
        self.before = (self.layer.get_seq_length(), query, self.layer.get_mask_sizes(query))
        self.kv = self.update(key_states, value_states, *args, **kwargs)
        return self.kv

    def clear(self) -> None:
        self.kv = self.before = None


def returned_kv(layer) -> ReturnedKV:
    """The ``ReturnedKV`` of cache layer ``layer`` (installed on first use)."""
    tap = layer.__dict__.get("update")
    if not isinstance(tap, ReturnedKV):
        tap = layer.update = ReturnedKV(layer)
    return tap


class SharedLayer(DummyLayer, CacheLayerMixin):
    """Cache layer of a layer that reads ``source``'s K/V and stores none of its own.

    A ``DummyLayer`` (stores nothing: offloading and early initialisation skip it) that is also an attention
    cache layer (``CacheLayerMixin``): ``cache.get_seq_length(i)`` / ``get_mask_sizes(..., i)`` answer for it
    (Llama 4 asks its own layer), with its source's numbers."""

    _transform = None  # no map: the source's K/V as they are

    def __init__(self, source, source_idx: int, transform=None):
        super().__init__()
        self.is_initialized = False  # it holds no keys (code that reads a layer's keys when initialized skips it)
        self.source_idx = source_idx
        if transform is not None:  # (keys, values) -> (keys, values): a fitted K/V map (kvsharer.cache.kv_maps)
            self._transform = transform
        self.connect(source)

    def connect(self, source) -> None:
        """Read ``source`` (the source layer's cache layer as finally wired: assembly calls this again after
        every method has built its layers)."""
        self.source = source
        self.is_sliding = getattr(source, "is_sliding", False)
        self._tap = returned_kv(source)

    def lazy_initialization(self, key_states, value_states) -> None:
        """Nothing to allocate: the K/V are the source's."""

    def update(self, key_states, value_states, *args, **kwargs):
        kv = self._tap.kv
        if kv is None:
            raise RuntimeError(
                f"shared cache layer reads layer {self.source_idx}, which has returned no K/V yet in this forward"
            )
        keys, values = kv
        if key_states is not None:  # a model spread over GPUs (device_map="auto") may hold the source on another GPU
            keys, values = keys.to(key_states.device), values.to(key_states.device)
        return (keys, values) if self._transform is None else self._transform(keys, values)

    # A sharer answers as its source did at the same point of the forward: before the source's update. Masks are
    # usually built before any layer runs, but some models ask each layer for its own just before its update
    # (Inkling), when the source has already added this forward's tokens.
    def get_seq_length(self) -> int:
        before = self._tap.before
        return before[0] if before is not None else self.source.get_seq_length()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        before = self._tap.before
        if before is not None and before[1] == query_length:
            return before[2]
        return self.source.get_mask_sizes(query_length)

    def get_max_length(self) -> int:
        return self.source.get_max_length()

    def __repr__(self) -> str:
        return f"SharedLayer(source={self.source_idx})"


class SharedAttentionOfHybrid:
    """Mixin over a hybrid cache layer (attention + a Mamba / linear-attention state in one object: Falcon-H1,
    Zamba2's hybrid blocks): the attention part reads the source like a ``SharedLayer`` and stores nothing;
    the recurrent state stays this layer's own (``get_conv_state`` & co. are the original class's)."""

    _linear = None  # the recurrent-state half's class, set by ``shared_hybrid``
    _transform = None  # fitted K/V maps support no hybrid family (kvsharer.cache.kv_maps.FAMILIES)

    def update(self, key_states, value_states, *args, **kwargs):
        return SharedLayer.update(self, key_states, value_states, *args, **kwargs)

    connect = SharedLayer.connect
    get_seq_length = SharedLayer.get_seq_length
    get_mask_sizes = SharedLayer.get_mask_sizes
    get_max_length = SharedLayer.get_max_length

    # the attention half holds nothing: only the recurrent half moves, crops and reorders
    def offload(self):
        self._linear.offload(self)

    def prefetch(self):
        self._linear.prefetch(self)

    def reset(self):
        self._linear.reset(self)

    def crop(self, tokens_to_remove: int):
        self._linear.crop(self, tokens_to_remove)

    def reorder_cache(self, beam_idx):
        self._linear.reorder_cache(self, beam_idx)

    def batch_repeat_interleave(self, repeats: int):
        self._linear.batch_repeat_interleave(self, repeats)

    def batch_select_indices(self, indices):
        self._linear.batch_select_indices(self, indices)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(source={self.source_idx})"


def shared_hybrid(layer, source, source_idx: int):
    """``layer`` (a hybrid cache layer, still empty) turned into one whose attention reads ``source``."""
    from transformers.cache_utils import LinearAttentionLayer

    cls = type(layer)
    shared_cls = type(f"Shared{cls.__name__}", (SharedAttentionOfHybrid, cls), {"_linear": LinearAttentionLayer})
    shared = shared_cls.__new__(shared_cls)
    shared.__dict__.update(layer.__dict__)
    shared.keys = shared.values = None
    shared.is_initialized = False
    shared.source_idx = source_idx
    shared.connect(source)
    return shared


def is_hybrid(layer) -> bool:
    """A cache layer holding both attention K/V and a recurrent (Mamba / linear-attention) state."""
    from transformers.cache_utils import CacheLayerMixin, LinearAttentionCacheLayerMixin

    return isinstance(layer, LinearAttentionCacheLayerMixin) and isinstance(layer, CacheLayerMixin)


class SkippedProjection(nn.Module):
    """Replaces a shared layer's k/v projection: a zero row expanded to the output shape, no compute."""

    def __init__(self, original: nn.Linear):
        super().__init__()
        self.out_features = original.out_features
        self.calls = 0  # how often it stood in for the real projection (tests read it)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        # one row of zeros, expanded (no matmul; out_features numbers allocated): its last dimension has stride 1,
        # which code viewing it as complex numbers for RoPE needs (Llama 4)
        return hidden_states.new_zeros(self.out_features).expand(*hidden_states.shape[:-1], self.out_features)

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
    """K/V bytes from the model shape alone: 2 × batch × kv_heads × head_dim × bytes × the tokens every storing
    layer holds after ``tokens`` tokens — all of them, but a sliding-window (or chunked) layer keeps its last
    ``window − 1`` (transformers' ``DynamicSlidingWindowLayer``) and a layer with no K/V (Mamba / linear
    attention) none; a layer that shares holds nothing."""
    n_layers, kv_heads, head_dim = kv_shape(model)
    share_map = policy.map if policy else list(range(n_layers))
    kinds = layer_kinds(text_config(model))
    held = sum(min(tokens, kind.window - 1) if kind.window else tokens
               for layer, kind in enumerate(kinds) if kind.has_kv and share_map[layer] == layer)
    return 2 * held * batch * kv_heads * head_dim * dtype_bytes


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

    def __init__(self, model: nn.Module, policy: SharingPolicy, maps=None):
        super().__init__(model)
        if policy.n_layers != self.parts.n_layers:
            raise PolicyError(
                f"invalid sharing map: it has {policy.n_layers} entries but {type(model).__name__} has "
                f"{self.parts.n_layers} decoder layers"
            )
        problems = policy_problems(policy.map, self.parts.kinds)
        if problems:
            raise PolicyError(f"{type(model).__name__} cannot follow this sharing map: " + "; ".join(problems))
        self.policy = policy
        self.maps, self._rope = self._fitted_maps(policy, maps), None
        if self.maps is not None:
            from .kv_maps import Rope

            self.maps.check(policy.map)
            self._rope = Rope(model)
        self._originals: dict[tuple[int, str], nn.Module] = {}

    @staticmethod
    def _fitted_maps(policy: SharingPolicy, maps):
        """``maps`` (:class:`kvsharer.cache.kv_maps.KVMaps`), or those the policy file names (``kv_maps``: a file
        beside it, checked against its sha256), or None."""
        name = policy.meta.get("kv_maps")
        if maps is not None or not name:
            return maps
        from .kv_maps import KVMaps, MapError

        if policy.path is None:
            raise MapError(f"the policy names K/V maps {name!r} but was not read from a file, so they cannot be found")
        path = policy.path.parent / name
        from ..provenance import sha256_file

        if path.is_file() and sha256_file(path) != policy.meta.get("kv_maps_sha256"):
            raise MapError(f"K/V maps {path} are not the ones {policy.path} was written with (sha256 differs): "
                           "rerun the search that wrote both")
        return KVMaps.load(path)

    @property
    def wiring(self) -> tuple[int, ...]:
        return tuple(self.policy.map)  # a cache wired for the same map is wired for this policy

    def build_layer(self, i: int, layers):
        src = self.policy.map[i]
        if src == i:
            return layers[i]
        if is_hybrid(layers[i]):  # attention + recurrent state in one layer: only the attention part shares
            return shared_hybrid(layers[i], layers[src], src)
        transform = None if self.maps is None else functools.partial(self.maps[i], rope=self._rope)
        return SharedLayer(layers[src], src, transform)

    def end_forward(self, cache, output, kwargs) -> None:
        """Drop what the sources returned in this forward (a sliding window's full K/V, a dequantized copy)."""
        if cache is None:
            return
        for layer in cache.layers:
            tap = layer.__dict__.get("update")
            if isinstance(tap, ReturnedKV):
                tap.clear()

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


def share_kv(model: nn.Module, policy: SharingPolicy, maps=None) -> KVSharing:
    """``with share_kv(model, policy): ...`` — the model follows ``policy`` inside, is untouched after. ``maps``:
    fitted K/V maps for its sharing layers (:mod:`kvsharer.cache.kv_maps`; default: those the policy file names)."""
    return KVSharing(model, policy, maps)


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
