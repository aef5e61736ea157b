"""MiniCache baseline: merge the KV caches of adjacent layer pairs in depth (Liu et al., 2024).

Reference: Akide Liu, Jing Liu, Zizheng Pan, Yefei He, Gholamreza Haffari, Bohan Zhuang, "MiniCache: KV
Cache Compression in Depth Dimension for Large Language Models", NeurIPS 2024, arXiv:2405.14366
(project page github.com/AkideLiu/MiniCache, which ships no code). Usage::

    from kvsharer.methods.minicache import minicache
    with minicache(model, 0.25):            # 2 of 8 layers' worth of KV saved: pairs (6, 7) and (4, 5)
        model.generate(**batch, max_new_tokens=64)
    with minicache(model, None, pairs=[(4, 5)], t=0.6, gamma=0.05): ...

**What one pair stores.** For a pair of adjacent layers ``(a, a + 1)``, every token's key vector of each
KV head is split into a magnitude ``‖x‖`` and a direction ``x / ‖x‖`` (separately for values). The two
layers' directions are merged by SLERP (the paper's merge equation),

    e = sin((1 − t)·Ω) / sin Ω · x_a/‖x_a‖  +  sin(t·Ω) / sin Ω · x_b/‖x_b‖,     Ω = ∠(x_a, x_b),

so ``t`` weighs the deeper layer; ``t = 0.6`` is the paper's default (its ablation over t). The pair
stores ONE merged direction per token ``[B, H, S, D]`` and each layer's magnitude ``[B, H, S]``; a layer's
K/V is restored as ``‖x‖ · e`` (the paper's rescaling), so magnitudes are exact and only directions are
approximated. Keys are cached after RoPE, which rotates both layers' keys at a position by the same
orthogonal matrix: angles, SLERP and norms commute with it, so merging post-RoPE keys is the same as
merging pre-RoPE keys.

**Token retention (the exact rule used here).** The paper measures, per token ``i``, the angular
distance of the two layers' vectors, ``d_i ∝ Ω_i = arccos(cos(x_a,i, x_b,i))`` (we use ``Ω_i / π``; the
rule below only uses ``(d − d_min) / (d_max − d_min)``, so the constant cancels), and keeps *unmergeable*
tokens unmerged, with a threshold ``γ`` (0.05 in the paper) relative to the range ``[d_min, d_max]``.
Its printed retention set is ``I = {i | d_i < d_min + (d_max − d_min)·γ}`` — which, read literally,
keeps the pairs that are *closest*, the opposite of what its text, its Figure 3 and its abstract say
("keep highly distinct state pairs unmerged"). We follow the stated intent with the same band width
anchored at the far end:

    retain token i   ⇔   γ > 0  and  d_i ≥ d_max − γ·(d_max − d_min)
                     ⇔   (d_i − d_min) / (d_max − d_min) ≥ 1 − γ      (taken as 0 when d_max = d_min)

so ``γ = 0`` merges everything, ``γ = 1`` retains every token (MiniCache is then an exact no-op) and a
range of zero (all pairs equally far apart) retains nothing unless ``γ = 1``. Choices the paper leaves
open: the rule is applied per batch row and KV head, separately to keys and to values; ``d_min`` and
``d_max`` are running extremes over the row's real tokens merged so far (the prompt, then every merged
chunk or decoded token) — the paper's range over the prompt, extended so that a single decoded token has
a range to be judged against; padding tokens (0 in the 2-D ``attention_mask``) never enter the range and
are never retained. A retained token stores both layers' original vectors (bit-exact on restore) and
its index; its merged direction and magnitudes are stored too (the dense tensors cover every token).

**Which pairs.** ``rate`` is the fraction of layers' KV saved, comparable to a KVSharer sharing rate:
``n_pairs = round(rate · L)`` (half up, like the sharing search), taken from the deepest layers upward:
``(L−2, L−1), (L−4, L−3), …``. The paper merges from the middle layer down (layers L/2 … L−1, i.e. L/4
pairs, 25 % saved), so rates up to 0.25 stay in the deeper half; at most ``L // 2`` pairs exist (rate
0.5 pairs every layer). ``pairs=[(l, l + 1), …]`` chooses them explicitly.

**When merging happens.** A forward's own attention always uses the exact K/V of its new tokens: a single
forward gives the plain model's logits. At the end of every decoder forward (``MiniCache.end_forward``) the
tokens added in that forward are merged, for every pair; the next forward (a decoding step, or the next
chunk of a chunked evaluation) reads the restored K/V of the merged tokens plus the exact K/V of its own
new tokens.

**Bytes.** The pair's whole state lives on the first layer's cache object (``MiniCachePair``); the second
layer gets a ``MiniCachePartner`` that stores nothing. ``kvsharer.cache.sharing.cache_nbytes`` calls
``stored_nbytes()``: merged directions and per-layer magnitudes (cache dtype), retained vectors of both
layers (cache dtype) and their int64 indices, the running ``d_min``/``d_max`` (fp32, ``[B, H]`` each for K
and V) and any tokens not merged yet. ``expected_minicache_nbytes`` predicts it from the shapes and the
retained count (``retained_count(cache)``). Per pair the KV shrinks from ``4·D`` to ``2·D + 4`` numbers per
token and head (plus retention), i.e. it saves one layer's KV minus ``2/D`` of a layer.

Sliding-window layers keep every token (the model's mask enforces the window; once it is full the layer
returns the last ``window − 1 + q`` tokens, exactly what a plain sliding cache returns), so past the
window a pair holds more tokens than a plain sliding layer would.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from transformers.cache_utils import CacheLayerMixin

from ..cache.method import KVMethod
from ..models.layer_kinds import compatible, pair_problem
from ..models.loading import kv_shape

PAPER_T = 0.6  # interpolation parameter, the paper's default
PAPER_GAMMA = 0.05  # retention threshold, the paper's default
INDEX_BYTES = 8  # retained-token indices are int64


# ---------------------------------------------------------------------------------------------
# the math: SLERP, and one merged state (keys or values of one pair)
# ---------------------------------------------------------------------------------------------


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-6) -> torch.Tensor:
    """Spherical interpolation between unit vectors ``a`` and ``b`` (last axis), ``t`` in [0, 1].

    Returns unit vectors at angle ``t·Ω`` from ``a`` on the great circle towards ``b``. Where ``sin Ω`` is
    below ``eps`` (near-parallel, or exactly opposite) the SLERP weights are 0/0, so the normalised linear
    interpolation is used instead (for parallel vectors it is the same point; for exactly opposite vectors
    at ``t = 0.5`` it vanishes and ``a`` is returned). Computed in fp32, returned in the input dtype.
    """
    dtype = a.dtype
    a32, b32 = a.float(), b.float()
    cos = (a32 * b32).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    degenerate = sin < eps
    safe_sin = torch.where(degenerate, torch.ones_like(sin), sin)
    spherical = (torch.sin((1.0 - t) * omega) * a32 + torch.sin(t * omega) * b32) / safe_sin
    linear = (1.0 - t) * a32 + t * b32
    out = torch.where(degenerate, linear, spherical)
    norm = out.norm(dim=-1, keepdim=True)
    out = torch.where(norm > eps, out / norm.clamp_min(eps), a32)
    return out.to(dtype)


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``arccos(cos(a, b)) / π`` in [0, 1] over the last axis (the paper's angular distance), fp32."""
    a32, b32 = a.float(), b.float()
    cos = (a32 * b32).sum(-1) / (a32.norm(dim=-1) * b32.norm(dim=-1)).clamp_min(1e-30)
    return torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi


class MergedState:
    """Keys (or values) of one layer pair: merged directions, both magnitudes, retained tokens.

    ``direction [B, H, S, D]`` and ``magnitude [2, B, H, S]`` (layer a, layer b) in the cache dtype;
    ``retained [2, N, D]`` the original vectors of both layers at the ``N`` retained (row, head, token)
    slots, whose ``index [N]`` (int64) is ``s·B·H + b·H + h`` — token-major, so indices stay valid when
    tokens are appended; ``d_lo``/``d_hi [B, H]`` (fp32) the running range of angular distances.
    """

    def __init__(self):
        self.direction: torch.Tensor | None = None
        self.magnitude: torch.Tensor | None = None
        self.retained: torch.Tensor | None = None
        self.index: torch.Tensor | None = None
        self.d_lo: torch.Tensor | None = None
        self.d_hi: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.direction is None else self.direction.shape[-2]

    @property
    def n_retained(self) -> int:
        return 0 if self.index is None else self.index.numel()

    def append(self, xa: torch.Tensor, xb: torch.Tensor, valid: torch.Tensor | None, t: float, gamma: float) -> None:
        """Merge the two layers' new vectors ``[B, H, P, D]`` and append them; ``valid [B, P]`` marks real tokens."""
        batch, heads, new, dim = xa.shape
        if self.direction is None:
            self.direction = xa.new_zeros(batch, heads, 0, dim)
            self.magnitude = xa.new_zeros(2, batch, heads, 0)
            self.retained = xa.new_zeros(2, 0, dim)
            self.index = torch.zeros(0, dtype=torch.long, device=xa.device)
            self.d_lo = torch.full((batch, heads), math.inf, device=xa.device)
            self.d_hi = torch.full((batch, heads), -math.inf, device=xa.device)
        a32, b32 = xa.float(), xb.float()
        norm_a, norm_b = a32.norm(dim=-1), b32.norm(dim=-1)  # [B, H, P]
        unit_a = a32 / norm_a.clamp_min(1e-30)[..., None]
        unit_b = b32 / norm_b.clamp_min(1e-30)[..., None]
        merged = slerp(unit_a, unit_b, t)
        dist = angular_distance(a32, b32)  # [B, H, P]

        real = torch.ones(batch, new, dtype=torch.bool, device=xa.device) if valid is None else valid.to(xa.device)
        real = real[:, None, :].expand(batch, heads, new)
        self.d_lo = torch.minimum(self.d_lo, dist.masked_fill(~real, math.inf).amin(-1))
        self.d_hi = torch.maximum(self.d_hi, dist.masked_fill(~real, -math.inf).amax(-1))
        if gamma > 0:
            span = (self.d_hi - self.d_lo)[..., None]
            position = (dist - self.d_lo[..., None]) / span.clamp_min(1e-30)  # where in the range, 0..1
            position = torch.where(span > 0, position, torch.zeros_like(dist))
            keep = real & (position >= 1.0 - gamma)
        else:
            keep = torch.zeros_like(real)

        b_idx, h_idx, p_idx = keep.nonzero(as_tuple=True)
        flat = (self.length + p_idx) * (batch * heads) + b_idx * heads + h_idx
        originals = torch.stack([xa[b_idx, h_idx, p_idx], xb[b_idx, h_idx, p_idx]])  # [2, n, D]
        self.direction = torch.cat([self.direction, merged.to(xa.dtype)], dim=-2)
        self.magnitude = torch.cat([self.magnitude, torch.stack([norm_a, norm_b]).to(xa.dtype)], dim=-1)
        self.retained = torch.cat([self.retained, originals], dim=1)
        self.index = torch.cat([self.index, flat])

    def restore(self, which: int) -> torch.Tensor:
        """Layer ``which`` (0: a, 1: b) as ``[B, H, S, D]``: magnitude × merged direction, retained tokens exact."""
        out = (self.magnitude[which].float()[..., None] * self.direction.float()).to(self.direction.dtype)
        if self.n_retained:
            batch, heads = self.direction.shape[:2]
            s_idx, bh = self.index // (batch * heads), self.index % (batch * heads)
            out[bh // heads, bh % heads, s_idx] = self.retained[which]
        return out

    def nbytes(self) -> int:
        tensors = (self.direction, self.magnitude, self.retained, self.index, self.d_lo, self.d_hi)
        return sum(x.numel() * x.element_size() for x in tensors if x is not None)

    def map_batch(self, rows: torch.Tensor) -> None:
        """New batch row ``j`` becomes old row ``rows[j]`` (reorder, select, repeat)."""
        if self.direction is None:
            return
        batch, heads = self.direction.shape[:2]
        rows = rows.to(self.direction.device)
        s_idx, bh = self.index // (batch * heads), self.index % (batch * heads)
        new_row, entry = (bh[None, :] // heads == rows[:, None]).nonzero(as_tuple=True)
        self.index = s_idx[entry] * (rows.numel() * heads) + new_row * heads + bh[entry] % heads
        self.retained = self.retained[:, entry]
        self.direction = self.direction.index_select(0, rows)
        self.magnitude = self.magnitude.index_select(1, rows)
        self.d_lo, self.d_hi = self.d_lo.index_select(0, rows), self.d_hi.index_select(0, rows)


# ---------------------------------------------------------------------------------------------
# the cache layers of a pair
# ---------------------------------------------------------------------------------------------


class MiniCachePair(CacheLayerMixin):
    """Cache of layer ``a`` that holds the whole state of the pair ``(a, a + 1)``.

    Tokens added by a forward wait, exact, in ``pending`` (one entry per layer) until ``merge()`` (called
    by ``MiniCache.end_forward``) folds them into the merged keys and values.
    """

    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, layers: tuple[int, int], t: float, gamma: float, is_sliding: bool = False,
                 sliding_window: int | None = None):
        super().__init__()
        self.layers = tuple(layers)
        self.t, self.gamma = float(t), float(gamma)
        self.is_sliding = bool(is_sliding)
        self.sliding_window = sliding_window
        self.k, self.v = MergedState(), MergedState()
        self.pending: list[tuple[torch.Tensor, torch.Tensor] | None] = [None, None]

    # the two layers' views ---------------------------------------------------------------------
    def seq_length(self, which: int) -> int:
        pending = self.pending[which]
        return self.k.length + (0 if pending is None else pending[0].shape[-2])

    def mask_sizes(self, which: int, query_length: int) -> tuple[int, int]:
        seen = self.seq_length(which)
        if self.is_sliding and seen >= self.sliding_window:  # what DynamicSlidingWindowLayer reports
            return self.sliding_window - 1 + query_length, seen - self.sliding_window + 1
        return seen + query_length, 0

    def update_layer(self, which: int, key_states: torch.Tensor, value_states: torch.Tensor):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        seen, new = self.seq_length(which), key_states.shape[-2]
        pending = self.pending[which]
        if pending is not None:  # several forwards without a merge in between: keep them all, exact
            key_states = torch.cat([pending[0], key_states], dim=-2)
            value_states = torch.cat([pending[1], value_states], dim=-2)
        self.pending[which] = (key_states, value_states)
        keys, values = key_states, value_states
        if self.k.length:
            keys = torch.cat([self.k.restore(which), keys], dim=-2)
            values = torch.cat([self.v.restore(which), values], dim=-2)
        if self.is_sliding and seen >= self.sliding_window:  # the keys the model's sliding mask covers
            visible = self.sliding_window - 1 + new
            keys, values = keys[:, :, -visible:], values[:, :, -visible:]
        return keys, values

    def merge(self, valid: torch.Tensor | None = None) -> None:
        """Fold the pending tokens of both layers into the merged state (``valid [B, P]``: real tokens)."""
        first, second = self.pending
        if first is None and second is None:
            return
        if first is None or second is None or first[0].shape[-2] != second[0].shape[-2]:
            raise RuntimeError(
                f"MiniCache pair {self.layers}: the two layers received different numbers of new tokens; "
                "a forward must run through both layers of the pair before merging"
            )
        if valid is not None and valid.shape != (first[0].shape[0], first[0].shape[-2]):
            valid = None
        self.k.append(first[0], second[0], valid, self.t, self.gamma)
        self.v.append(first[1], second[1], valid, self.t, self.gamma)
        self.pending = [None, None]

    def discard_pending(self) -> None:
        """Forget the tokens of a forward that failed (the cache is as it was before that forward)."""
        self.pending = [None, None]

    @property
    def retained(self) -> tuple[int, int]:
        """Retained (row, head, token) slots for keys and for values."""
        return self.k.n_retained, self.v.n_retained

    def stored_nbytes(self) -> int:
        pending = sum(x.numel() * x.element_size() for p in self.pending if p is not None for x in p)
        return self.k.nbytes() + self.v.nbytes() + pending

    # cache API (layer a) -----------------------------------------------------------------------
    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        return self.update_layer(0, key_states, value_states)

    def get_seq_length(self) -> int:
        return self.seq_length(0)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.mask_sizes(0, query_length)

    def get_max_length(self) -> int:
        return -1

    def offload(self): ...
    def prefetch(self): ...

    def reset(self) -> None:
        self.k, self.v = MergedState(), MergedState()
        self.pending = [None, None]
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise NotImplementedError(
                "a MiniCache cache cannot be cropped (merged tokens cannot be un-merged); "
                "assisted/speculative decoding is not supported with MiniCache"
            )

    def _map_batch(self, rows: torch.Tensor) -> None:
        self.k.map_batch(rows)
        self.v.map_batch(rows)
        self.pending = [None if p is None else tuple(x.index_select(0, rows.to(x.device)) for x in p)
                        for p in self.pending]

    def _batch(self) -> int | None:
        if self.k.direction is not None:
            return self.k.direction.shape[0]
        pending = next((p for p in self.pending if p is not None), None)
        return None if pending is None else pending[0].shape[0]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self._batch() is not None:
            self._map_batch(beam_idx.long())

    def batch_repeat_interleave(self, repeats: int) -> None:
        batch = self._batch()
        if batch is not None:
            self._map_batch(torch.arange(batch).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        batch = self._batch()
        if batch is not None:
            self._map_batch(torch.arange(batch)[indices.cpu()])

    def __repr__(self) -> str:
        return (f"MiniCachePair(layers={self.layers}, merged={self.k.length}, retained={self.retained}, "
                f"t={self.t:g}, gamma={self.gamma:g})")


class MiniCachePartner(CacheLayerMixin):
    """Cache of layer ``a + 1``: stores nothing itself; everything lives in the pair's first layer."""

    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, pair: MiniCachePair):
        super().__init__()
        self.pair = pair
        self.is_sliding = pair.is_sliding
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None: ...

    def update(self, key_states, value_states, *args, **kwargs):
        return self.pair.update_layer(1, key_states, value_states)

    def get_seq_length(self) -> int:
        return self.pair.seq_length(1)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.pair.mask_sizes(1, query_length)

    def get_max_length(self) -> int:
        return -1

    def stored_nbytes(self) -> int:
        return 0  # counted once, by the pair

    # batch operations act on the pair (called once for it, through its own layer)
    def offload(self): ...
    def prefetch(self): ...
    def reset(self): ...
    def crop(self, tokens_to_remove: int): ...
    def reorder_cache(self, beam_idx): ...
    def batch_repeat_interleave(self, repeats: int): ...
    def batch_select_indices(self, indices): ...

    def __repr__(self) -> str:
        return f"MiniCachePartner(pair={self.pair.layers})"


# ---------------------------------------------------------------------------------------------
# choosing pairs, accounting
# ---------------------------------------------------------------------------------------------


def pairs_for_rate(rate: float, n_layers: int, kinds=None) -> list[tuple[int, int]]:
    """``round(rate · L)`` adjacent pairs from the deepest layers up: ``(L−2, L−1), (L−4, L−3), …``; with
    ``kinds`` (each layer's attention kind, :mod:`kvsharer.models.layer_kinds`) only pairs of one kind, the
    deepest first (a pair across kinds is skipped: the walk moves up one layer)."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate):
        raise ValueError(f"MiniCache rate must be a number (fraction of layers' KV saved); got {rate!r}")
    n_pairs = math.floor(rate * n_layers + 0.5)
    if n_pairs < 1:
        raise ValueError(
            f"MiniCache rate {rate:g} gives round({rate:g} x {n_layers}) = {n_pairs} layer pairs for a "
            f"{n_layers}-layer model; use a rate of at least {0.5 / n_layers:.4g} (or the plain model)"
        )
    if n_pairs > n_layers // 2:
        raise ValueError(
            f"MiniCache rate {rate:g} needs {n_pairs} adjacent layer pairs, but a {n_layers}-layer model has at "
            f"most {n_layers // 2} disjoint pairs (rate <= {(n_layers // 2) / n_layers:.4g}); the paper merges "
            f"from the middle layer down, i.e. rate 0.25, and rates up to 0.25 stay in the deeper half"
        )
    if kinds is None:
        return sorted((n_layers - 2 * k - 2, n_layers - 2 * k - 1) for k in range(n_pairs))
    pairs, low = [], n_layers - 2
    while low >= 0 and len(pairs) < n_pairs:
        if compatible(kinds, low + 1, low):
            pairs.append((low, low + 1))
            low -= 2
        else:
            low -= 1
    if len(pairs) < n_pairs:
        raise ValueError(f"MiniCache rate {rate:g} needs {n_pairs} adjacent layer pairs of one attention kind; "
                         f"this model has {len(pairs)}")
    return sorted(pairs)


def validate_pairs(pairs: Sequence[Sequence[int]], n_layers: int) -> list[tuple[int, int]]:
    """Adjacent ``(l, l + 1)``, inside ``[0, L)``, no layer in two pairs; returned sorted."""
    out, used = [], set()
    for pair in pairs:
        if (isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in pair)):
            raise ValueError(f"MiniCache pairs must be (l, l + 1) pairs of layer indices; got {pair!r}")
        first, second = pair
        if second != first + 1:
            raise ValueError(f"MiniCache merges adjacent layers: pair {tuple(pair)} is not (l, l + 1)")
        if first < 0 or second >= n_layers:
            raise ValueError(f"MiniCache pair {tuple(pair)} is outside the model's layers 0..{n_layers - 1}")
        if first in used or second in used:
            raise ValueError(f"MiniCache pairs must be disjoint: layer {first if first in used else second} is in two pairs")
        used.update(pair)
        out.append((first, second))
    if not out:
        raise ValueError("MiniCache needs at least one layer pair")
    return sorted(out)


def pair_layers(cache) -> list[MiniCachePair]:
    return [] if cache is None else [layer for layer in cache.layers if isinstance(layer, MiniCachePair)]


def retained_count(cache) -> int:
    """Retained (row, head, token) slots over every pair, keys and values together."""
    return sum(sum(pair.retained) for pair in pair_layers(cache))


def expected_minicache_nbytes(model, pairs, batch: int, tokens: int, dtype_bytes: int, retained: int = 0) -> int:
    """Bytes ``cache_nbytes`` reports after all ``tokens`` are merged, from the shapes alone.

    ``pairs``: the number of pairs or the list; ``retained``: ``retained_count(cache)``. Unpaired layers
    hold ``2·B·H·S·D`` numbers; a pair holds, for K and for V, directions ``B·H·S·D`` and two magnitudes
    ``2·B·H·S`` (cache dtype) and the fp32 range ``2·B·H``; each retained slot adds both layers' vectors
    (``2·D`` numbers) and an int64 index.
    """
    n_layers, heads, dim = kv_shape(model)
    n_pairs = pairs if isinstance(pairs, int) else len(pairs)
    bhs = batch * heads * tokens
    plain_layers = 2 * (n_layers - 2 * n_pairs) * bhs * dim * dtype_bytes
    per_pair = 2 * ((bhs * dim + 2 * bhs) * dtype_bytes + 2 * batch * heads * 4)
    return plain_layers + n_pairs * per_pair + retained * (2 * dim * dtype_bytes + INDEX_BYTES)


# ---------------------------------------------------------------------------------------------
# the cache method
# ---------------------------------------------------------------------------------------------


def _window(layer) -> tuple[bool, int | None]:
    """A cache layer's attention window: (sliding, its size)."""
    return getattr(layer, "is_sliding", False), getattr(layer, "sliding_window", None)


def _check_number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:  # NaN fails too
        raise ValueError(f"MiniCache {name} must be a number in [0, 1]; got {value!r}")
    return float(value)


class MiniCache(KVMethod):
    """MiniCache attached to a model. Use ``minicache(model, rate)`` (or the object itself) as a context manager."""

    title = "MiniCache"
    with_sharing = False  # a rival of KV sharing, compared with it at equal KV bytes
    replaces_layers = True

    def __init__(self, model: nn.Module, rate: float | None = None, *, pairs=None, t: float = PAPER_T,
                 gamma: float = PAPER_GAMMA):
        super().__init__(model)
        self.t = _check_number("interpolation t", t)
        self.gamma = _check_number("retention threshold gamma", gamma)
        if (rate is None) == (pairs is None):
            raise ValueError("MiniCache takes either a rate or explicit pairs=[(l, l + 1), ...], not both or neither")
        n_layers = self.parts.n_layers
        kinds = self.parts.kinds
        self.pairs = pairs_for_rate(rate, n_layers, kinds) if pairs is None else validate_pairs(pairs, n_layers)
        problems = [p for a, b in self.pairs for p in [pair_problem(kinds, b, a)] if p]
        if problems:
            raise ValueError("MiniCache cannot merge these pairs: " + "; ".join(problems))
        self.rate = len(self.pairs) / n_layers if rate is None else float(rate)

    @classmethod
    def from_spec(cls, model: nn.Module, spec) -> "MiniCache":
        """``minicache:<rate>``."""
        return cls(model, float(spec.value))

    @property
    def n_pairs(self) -> int:
        return len(self.pairs)

    def build_layer(self, i: int, layers):
        for a, b in self.pairs:
            if i == a:  # the pair's whole state lives in its first layer's cache
                sliding, window = _window(layers[a])
                if _window(layers[b]) != (sliding, window):
                    raise ValueError(f"MiniCache pair {(a, b)}: the two layers use different attention windows")
                return MiniCachePair((a, b), self.t, self.gamma, sliding, window)
            if i == b:
                return MiniCachePartner(layers[a])  # layers[a] is the pair built just before
        return layers[i]

    def end_forward(self, cache, output, kwargs) -> None:
        """Merge the tokens every pair received in this forward (forget them if the forward failed); padding
        (0 in the forward's 2-D ``attention_mask``) is never retained."""
        mask = kwargs.get("attention_mask")
        mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        for pair in pair_layers(cache):
            if output is None:
                pair.discard_pending()
                continue
            pending = pair.pending[0]
            valid = None
            if pending is not None and mask is not None and mask.shape[-1] >= pending[0].shape[-2]:
                valid = mask[:, mask.shape[-1] - pending[0].shape[-2]:].bool()
            pair.merge(valid)


def minicache(model: nn.Module, rate: float | None = None, *, pairs=None, t: float = PAPER_T,
              gamma: float = PAPER_GAMMA) -> MiniCache:
    """``with minicache(model, rate): ...`` — adjacent deep layer pairs merged inside, model untouched after."""
    return MiniCache(model, rate, pairs=pairs, t=t, gamma=gamma)
