"""KV-cache quantization that really stores fewer bytes, composable with KV sharing.

::

    from kvsharer import quantize_kv
    with quantize_kv(model, 4):                         # 4-bit K/V, last 32 tokens kept in full precision
        model.generate(**batch, max_new_tokens=64)
    with quantize_kv(model, 4, policy=policy): ...      # and KV sharing (same as nesting ``share_kv``)

``KVQuantization`` is a :class:`~kvsharer.cache.method.KVMethod`: every layer that *stores* K/V holds a
``QuantizedKVLayer`` in whatever ``DynamicCache`` the forward gets (or the one the hooks create). With a
sharing policy, sharers keep their ``SharedLayer``, which reads what the source's ``update`` returned to its
own attention in this forward (full precision); they store nothing. KV sharing drops those returned tensors at
the end of every decoder forward, so no full-precision copy of the cache lingers between decoding steps.

The scheme (our own, ~40 lines of torch — see "Why not HQQ" below)
-------------------------------------------------------------------
* **Groups.** Keys AND values are quantized *per token*, in groups of ``group_size`` consecutive
  channels along ``head_dim``; asymmetric min/max: ``x ≈ zero + code × scale`` with
  ``code ∈ [0, 2^bits − 1]``. KIVI quantizes keys *per channel* (statistics over a block of tokens)
  because real LLM keys have outlier channels. We chose per-token groups for keys too, because then a
  token's codes depend on that token alone: the result does not depend on how tokens arrived (prefill
  vs decode, where a flush falls), padding tokens of a left-padded row never share a group with real
  tokens, ``residual=0`` is not degenerate, beam reorders / batch selects / crops are exact index
  operations on the codes (transformers' ``QuantizedLayer`` has to defer reorders instead), and the
  bytes depend on the token count only (``expected_quant_nbytes``). The price: an outlier channel
  widens the range of its group only, so small groups (default 32) bound the damage, but at 2 bits
  keys lose more than with KIVI's per-channel grouping.
* **Storage.** Codes are packed into ``uint8`` (8 bits: one per byte, 4 bits: two, 2 bits: four) —
  ``[B, kv_heads, S, head_dim·bits/8]``; one scale and one zero per group, ``[B, kv_heads, S,
  head_dim/group_size]``, in the cache dtype (fp16/bf16/fp32). The zero is rounded *down* and the
  scale *up* to that dtype before the codes are computed, so codes ``0..2^bits−1`` still cover the
  group's range and every value is reconstructed within half a step (``scale/2``) of itself.
* **Residual window.** The most recent ``residual`` tokens stay in full precision (``keys``/``values``,
  as in transformers' ``QuantizedLayer``). It is a *sliding* window: once it is full, every new token
  pushes the oldest one(s) into the quantized store. transformers flushes (and re-quantizes) the whole
  cache when its window fills; ours always holds exactly ``min(S, residual)`` full-precision tokens,
  and no value is ever quantized twice.
* **What attention gets.** ``update`` returns dequantized(store) + window + the new tokens at full
  precision: tokens quantized in this forward are attended at full precision once (prefill attention is
  exact, as in KIVI and transformers), and as dequantized values from the next forward on. So a single
  forward — e.g. ``use_cache=False`` — is never affected; the error enters with decoding. The store is
  dequantized at every step (O(S) work per layer and step, like transformers' quantized caches).

Bytes per stored layer and token (``stored_nbytes``): ``2·kv_heads·(head_dim·bits/8 + 2·head_dim/
group_size·dtype_bytes)`` when quantized, ``2·kv_heads·head_dim·dtype_bytes`` inside the window; for
long sequences that is ``bits/16 + 2/group_size`` of an fp16 cache (4 bits, group 32: 0.3125).

Sliding-window attention layers (Mistral, some Qwen configs) keep every token here, like
``CompressedLayer``: the model's mask still applies the window by position, so results are right, but
tokens outside the window are not dropped.

Why not HQQ (transformers' ``HQQQuantizedLayer``)
-------------------------------------------------
Tried offline in a throwaway venv (torch 2.13.0+cpu, hqq 0.2.8.post1, transformers 5.23): hqq is an
sdist whose build runs ``setup_cuda.py`` through ``os.system`` (it fails, and the failure is ignored,
without a CUDA torch; ``DISABLE_CUDA=1`` skips it) and pulls accelerate, einops, termcolor,
huggingface_hub. Its pure-torch path does work on CPU (2/4/8 bits, fp32/fp16/bf16, codes packed in
uint8, scale/zero in the cache dtype: countable). But the ``QuantizedLayer`` around it (a) quantizes
the whole prompt at prefill whatever ``residual_length`` is, so "window ≥ sequence ⇒ exact" cannot
hold; (b) at every window flush dequantizes the whole cache and quantizes it again (errors compound,
bytes depend on the history); (c) its grouping is not token-local, hence the deferred beam reorders.
Fixing that means rewriting ``update``; HQQ would then only contribute a min/max quantizer (plus its
iterative zero-point optimiser), which is not worth a dependency with a build hook. No dependency
was added.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer

from ..cache.assembly import source_of
from ..cache.batch_ops import BatchOps
from ..cache.method import KVMethod
from ..cache.policy import SharingPolicy
from ..cache.sharing import with_policy
from ..models.loading import kv_shape

BITS = (2, 4, 8)


# ----------------------------------------------------------------------------------------------
# The quantizer: per token, groups along head_dim, asymmetric min/max, codes packed into uint8
# ----------------------------------------------------------------------------------------------


class Quantized(NamedTuple):
    """Quantized tokens: every field is ``[B, heads, S, *]``, so cache operations are the same on all."""

    codes: torch.Tensor  # uint8 [B, H, S, head_dim·bits/8]
    scale: torch.Tensor  # cache dtype [B, H, S, head_dim/group_size]
    zero: torch.Tensor  # cache dtype [B, H, S, head_dim/group_size]

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Quantized":
        return Quantized(*(fn(t) for t in self))

    def cat(self, other: "Quantized") -> "Quantized":
        return Quantized(*(torch.cat([a, b], dim=-2) for a, b in zip(self, other)))

    @property
    def tokens(self) -> int:
        return self.codes.shape[-2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self)


def _round_to(x: torch.Tensor, dtype: torch.dtype, direction: float) -> torch.Tensor:
    """``x`` (fp32) in ``dtype``, rounded towards ``direction`` (+inf: up, -inf: down)."""
    y = x.to(dtype)
    off = (y.float() < x) if direction > 0 else (y.float() > x)
    return torch.where(off, torch.nextafter(y, torch.full_like(y, direction)), y)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes < 2**bits along the last axis → 8/bits codes per byte (first code in the low bits)."""
    per = 8 // bits
    if per == 1:
        return codes
    shifts = torch.arange(0, 8, bits, device=codes.device, dtype=torch.uint8)
    grouped = codes.reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
    return (grouped << shifts).sum(-1, dtype=torch.uint8)  # the shifted codes never overlap: sum == or


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    per = 8 // bits
    if per == 1:
        return packed
    shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
    codes = (packed.unsqueeze(-1) >> shifts) & (2**bits - 1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per)


def quantize(x: torch.Tensor, bits: int, group_size: int) -> Quantized:
    """``x`` [..., head_dim] → codes, scale, zero (scale/zero in ``x.dtype``), per group of channels."""
    *lead, dim = x.shape
    levels = 2**bits - 1
    groups = x.float().reshape(*lead, dim // group_size, group_size)
    lo, hi = groups.amin(-1), groups.amax(-1)
    zero = _round_to(lo, x.dtype, float("-inf"))
    scale = _round_to((hi - zero.float()) / levels, x.dtype, float("inf"))
    scale32 = scale.float()
    inv = torch.where(scale32 > 0, 1.0 / scale32, torch.zeros_like(scale32))  # constant group: code 0
    codes = ((groups - zero.float()[..., None]) * inv[..., None]).round_().clamp_(0, levels)
    return Quantized(pack(codes.to(torch.uint8).reshape(*lead, dim), bits), scale, zero)


def dequantize(q: Quantized, bits: int, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    codes = unpack(q.codes, bits)
    *lead, dim = codes.shape
    groups = codes.float().reshape(*lead, dim // group_size, group_size)
    x = groups * q.scale.float()[..., None] + q.zero.float()[..., None]
    return x.reshape(*lead, dim).to(dtype)


def check_settings(bits: int, group_size: int, residual: int, head_dim: int | None = None) -> None:
    """Raise ``ValueError`` (one message per problem) for settings the quantizer cannot honour."""
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}; got {bits!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer; got {group_size!r}")
    if isinstance(residual, bool) or not isinstance(residual, int) or residual < 0:
        raise ValueError(f"residual (full-precision window, in tokens) must be an integer >= 0; got {residual!r}")
    if head_dim is not None:
        if head_dim % group_size:
            raise ValueError(f"group_size {group_size} does not divide the model's head_dim {head_dim}")
        if (head_dim * bits) % 8:
            raise ValueError(f"head_dim {head_dim} × {bits} bits is not a whole number of bytes")


# ----------------------------------------------------------------------------------------------
# The cache layer
# ----------------------------------------------------------------------------------------------


class QuantizedKVLayer(BatchOps, DynamicLayer):
    """Cache of one storing layer: a quantized store + a full-precision window of the last tokens.

    ``keys``/``values`` are the window ``[B, H, min(S, residual), D]``; ``qkeys``/``qvalues`` the
    quantized older tokens.
    """

    is_croppable = False  # crop works, but tokens flushed into the store stay quantized: not traceless

    def __init__(self, bits: int, group_size: int, residual: int, layer_idx: int, is_sliding: bool = False):
        super().__init__()
        check_settings(bits, group_size, residual)
        self.bits, self.group_size, self.residual = bits, group_size, residual
        self.layer_idx = layer_idx
        self.is_sliding = is_sliding  # kept for KV sharing's check; the window itself comes from the mask
        self.qkeys: Quantized | None = None
        self.qvalues: Quantized | None = None

    # cache API ---------------------------------------------------------------------------------
    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys, self.values = key_states[..., :0, :].clone(), value_states[..., :0, :].clone()
        self.qkeys = quantize(self.keys, self.bits, self.group_size)  # empty, with the right shapes
        self.qvalues = quantize(self.values, self.bits, self.group_size)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys = torch.cat([self._dequantize(self.qkeys), self.keys, key_states], dim=-2)
        values = torch.cat([self._dequantize(self.qvalues), self.values, value_states], dim=-2)
        window_k = torch.cat([self.keys, key_states], dim=-2)
        window_v = torch.cat([self.values, value_states], dim=-2)
        overflow = window_k.shape[-2] - self.residual
        if overflow > 0:  # the oldest tokens leave the window for the quantized store
            self.qkeys = self.qkeys.cat(quantize(window_k[..., :overflow, :], self.bits, self.group_size))
            self.qvalues = self.qvalues.cat(quantize(window_v[..., :overflow, :], self.bits, self.group_size))
            window_k = window_k[..., overflow:, :].clone()  # clone: a view would keep all of window_k alive
            window_v = window_v[..., overflow:, :].clone()
        self.keys, self.values = window_k, window_v
        return keys, values

    def _dequantize(self, q: Quantized) -> torch.Tensor:
        return dequantize(q, self.bits, self.group_size, self.dtype)

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.qkeys.tokens + self.keys.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    @property
    def quantized_tokens(self) -> int:
        return self.qkeys.tokens if self.is_initialized else 0

    def stored_nbytes(self) -> int:
        """Exact bytes held: packed codes + scales + zeros + the full-precision window (read by cache_nbytes)."""
        if not self.is_initialized:
            return 0
        window = sum(t.numel() * t.element_size() for t in (self.keys, self.values))
        return self.qkeys.nbytes() + self.qvalues.nbytes() + window

    # batch and device operations: token-local quantization makes them exact index operations ---
    def _map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:  # BatchOps' batch operations
        if not self.is_initialized:
            return
        self.keys, self.values = fn(self.keys), fn(self.values)
        self.qkeys, self.qvalues = self.qkeys.map(fn), self.qvalues.map(fn)

    def offload(self) -> None:
        self._map_batch(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.is_initialized and self.keys.device != self.device:
            self._map_batch(lambda t: t.to(self.device, non_blocking=True))

    def crop(self, tokens_to_remove: int) -> None:
        """Remove ``-tokens_to_remove`` tokens from the end (DynamicLayer's convention): window first."""
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove (as DynamicLayer.crop)")
        remove = min(-tokens_to_remove, self.get_seq_length())
        if remove == 0:
            return
        from_window = min(remove, self.keys.shape[-2])
        keep_q = self.qkeys.tokens - (remove - from_window)
        self.keys = self.keys[..., : self.keys.shape[-2] - from_window, :].clone()
        self.values = self.values[..., : self.values.shape[-2] - from_window, :].clone()
        self.qkeys = self.qkeys.map(lambda t: t[..., :keep_q, :].clone())
        self.qvalues = self.qvalues.map(lambda t: t[..., :keep_q, :].clone())

    def reset(self) -> None:
        super().reset()
        self.qkeys = self.qvalues = None

    def __repr__(self) -> str:
        return (f"QuantizedKVLayer(layer={self.layer_idx}, bits={self.bits}, group_size={self.group_size}, "
                f"residual={self.residual}, quantized={self.quantized_tokens}, seq={self.get_seq_length()})")


# ----------------------------------------------------------------------------------------------
# The cache method, and the bytes it holds
# ----------------------------------------------------------------------------------------------


class KVQuantization(KVMethod):
    """KV quantization attached to a model. Use ``quantize_kv(model, bits, ...)`` as a context manager."""

    title = "KV quantization"
    with_sharing = True  # sources quantized once; sharers read what their source dequantized
    replaces_layers = True

    def __init__(self, model: nn.Module, bits: int, *, group_size: int = 32, residual: int = 32):
        super().__init__(model)
        check_settings(bits, group_size, residual, head_dim=kv_shape(model)[2])
        self.bits, self.group_size, self.residual = bits, group_size, residual

    @classmethod
    def from_spec(cls, model: nn.Module, spec) -> "KVQuantization":
        """``int<bits>`` (``spec.value``: bits), in groups of :func:`quant_group_size` channels."""
        return cls(model, int(spec.value), group_size=quant_group_size(model))

    def build_layer(self, i: int, layers):
        if not self.own_layer(i, layers):
            return layers[i]  # a sharer reads what its source's update returned; a layer without K/V keeps its own
        return QuantizedKVLayer(self.bits, self.group_size, self.residual, i, getattr(layers[i], "is_sliding", False))


def quantize_kv(model: nn.Module, bits: int, *, group_size: int = 32, residual: int = 32,
                policy: SharingPolicy | None = None):
    """``with quantize_kv(model, bits[, policy=...]) as quantization: ...`` — quantized (and shared) inside,
    untouched after.

    ``bits``: 2, 4 or 8. ``group_size``: channels per scale/zero (must divide head_dim). ``residual``:
    most recent tokens kept in full precision. ``policy``: optional KV-sharing policy, attached for the
    duration too (same as nesting ``share_kv``).
    """
    return with_policy(KVQuantization(model, bits, group_size=group_size, residual=residual), policy)


def quant_group_size(model) -> int:
    """Channels per quantization group: 32, or the whole head when its size is not a multiple of 32."""
    head_dim = kv_shape(model)[2]
    return 32 if head_dim % 32 == 0 else head_dim


def expected_quant_nbytes(model, policy: SharingPolicy | None, batch: int, tokens: int, bits: int,
                          group_size: int = 32, residual: int = 32, dtype_bytes: int = 2) -> int:
    """Bytes of a quantized (and shared) cache holding ``tokens`` tokens, from the shapes alone.

    ``group_size``/``residual`` default to ``quantize_kv``'s; ``dtype_bytes``: the cache dtype's size."""
    n_layers, kv_heads, head_dim = kv_shape(model)
    stored = n_layers - (policy.num_shared if policy else 0)
    window = min(tokens, residual)
    per_quantized = head_dim * bits // 8 + 2 * (head_dim // group_size) * dtype_bytes
    per_window = head_dim * dtype_bytes
    return 2 * stored * batch * kv_heads * ((tokens - window) * per_quantized + window * per_window)
