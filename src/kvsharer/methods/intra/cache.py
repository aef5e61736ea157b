"""A cache layer that really shrinks: it stores at most its budget of tokens after every forward.

``CompressedLayer`` replaces the ``DynamicLayer`` of every layer that *stores* K/V (with KV sharing: every
source layer; its sharers keep their ``SharedLayer``, which reads this one). Besides keys and values
``[B, kv_heads, S, D]`` it keeps, per stored token,

* ``positions [B, S]`` — the token's index in the sequence (its column in the model's attention mask),
* ``valid [B, S]`` — False for padding tokens,
* ``state`` — the method's scores (tensors whose last axis is the token axis).

A method that keeps a different set of tokens per KV head (``method.per_head``, e.g. SnapKV) gets
``positions``/``valid`` of shape ``[B, kv_heads, S]`` instead, and ``select`` takes ``[B, kv_heads, k]``.

Positions and masks after eviction:

* ``get_seq_length()`` returns the number of tokens *seen* (not stored), so the next token's position
  (RoPE) and the model's ``q_offset`` stay right after eviction;
* ``get_mask_sizes(q)`` returns ``(seen + q, 0)``: the model builds ONE mask per forward for all layers
  in *position* coordinates (its padding columns are those of the 2D ``attention_mask``, which also has
  ``seen + q`` columns). Layers keep different tokens (different budgets, different keep-sets per
  row), so a mask in stored coordinates could only be right for one layer; instead the attention
  function (:mod:`kvsharer.methods.intra.attention`) gathers, per layer and row, the mask columns of the
  positions this layer stores. The gathered mask has ``stored + q`` columns — the keys it is applied to.

Every row keeps the same NUMBER of tokens (per-row keep-sets are gathered with index tensors), so
batched generation with left padding works: a row with fewer real tokens than the budget keeps some
padding tokens, which stay masked.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from ...cache.batch_ops import BatchOps
from .base import TokenMethod
from .blockwise import AttentionScores


class CompressedLayer(BatchOps, DynamicLayer):
    """Cache of one storing layer (and the layers that share it), compressed by ``method``."""

    is_croppable = False

    def __init__(self, method: TokenMethod, layer_idx: int, group: list[int], rank: int, n_stored: int,
                 is_sliding: bool = False):
        super().__init__()
        self.method = method
        self.layer_idx = layer_idx  # the layer that stores this cache
        self.group = list(group)  # every layer that reads it: [layer_idx, sharers...], in order
        self.rank, self.n_stored = rank, n_stored  # depth rank among storing layers (PyramidInfer)
        self.is_sliding = is_sliding  # kept for KV sharing's check; the window itself comes from the mask
        self.seen = 0
        self.positions: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None
        self.state: dict[str, torch.Tensor] = {}
        self.evicted = 0  # tokens removed (evicted or merged away) per row so far, for reports

    # cache API ---------------------------------------------------------------------------------
    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        lead = self._lead(key_states)  # (B,) or (B, kv_heads) per head
        self.positions = torch.zeros(*lead, 0, dtype=torch.long, device=self.device)
        self.valid = torch.zeros(*lead, 0, dtype=torch.bool, device=self.device)

    def _lead(self, key_states) -> tuple[int, ...]:
        """Leading shape of ``positions``/``valid``: ``(B,)``, or ``(B, kv_heads)`` for a per-head method."""
        return tuple(key_states.shape[:2]) if self.method.per_head else (key_states.shape[0],)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        new_positions = torch.arange(self.seen, self.seen + q, device=self.device).expand(*self._lead(key_states), q)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.positions = torch.cat([self.positions, new_positions], dim=-1)
        self.seen += q
        return self.keys, self.values

    def get_seq_length(self) -> int:
        """Tokens SEEN (positions keep increasing after eviction)."""
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """The mask is built in position coordinates; the attention function gathers this layer's columns."""
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    @property
    def stored(self) -> int:
        return 0 if self.keys is None or not self.is_initialized else self.keys.shape[-2]

    def budget(self) -> int:
        """Tokens this cache keeps now (depends on tokens seen and, for PyramidInfer, on depth)."""
        return self.method.keep_for(self.rank, self.n_stored, self.seen)

    # scoring and compression (called by the attention function) ------------------------------
    def observe(self, member: int, scores: AttentionScores, query_valid: torch.Tensor) -> None:
        """``member`` attended over this cache; ``scores``: what its keys received (fp32, padding queries
        contributed nothing), ``query_valid [B, q]``: which of the queries were real tokens."""
        first = member == self.layer_idx
        if first:  # new tokens of this forward: they are the queries, so their validity is the query's
            if self.valid.dim() == 3:  # per KV head: [B, q] -> [B, kv_heads, q]
                query_valid = query_valid[:, None, :].expand(*self.valid.shape[:2], query_valid.shape[-1])
            self.valid = torch.cat([self.valid, query_valid], dim=-1)
            stored = self.keys.shape[-2]
            for name, tensor in self.state.items():
                if tensor.shape[-1] < stored:
                    pad = tensor.new_zeros(*tensor.shape[:-1], stored - tensor.shape[-1])
                    self.state[name] = torch.cat([tensor, pad], dim=-1)
        self.method.observe(self, scores, first)
        if member == self.group[-1]:  # every layer of the group has attended: compress now
            keep = self.budget()
            if self.stored > keep:
                before = self.stored
                self.method.compress(self, keep)
                if self.stored != keep:
                    raise RuntimeError(f"{self.method.name} left {self.stored} tokens in layer {self.layer_idx}, budget {keep}")
                self.evicted += before - keep

    def select(self, idx: torch.Tensor) -> None:
        """Keep, per row, the stored tokens at ``idx`` [B, k] (same k for every row), or per row and KV
        head at ``idx [B, kv_heads, k]`` (a per-head method)."""
        b, heads, _, dim = self.keys.shape
        kv_idx = (idx[:, None, :, None] if idx.dim() == 2 else idx[..., None]).expand(b, heads, idx.shape[-1], dim)
        self.keys = self.keys.gather(2, kv_idx)
        self.values = self.values.gather(2, kv_idx)
        self.positions = self.positions.gather(-1, idx)
        self.valid = self.valid.gather(-1, idx)
        lead = idx.shape[:-1]  # (B,) or (B, kv_heads): the state's leading axes that idx indexes
        for name, tensor in self.state.items():
            tidx = idx.view(*lead, *([1] * (tensor.dim() - len(lead) - 1)), -1).expand(*tensor.shape[:-1], idx.shape[-1])
            self.state[name] = tensor.gather(-1, tidx)

    def state_nbytes(self) -> int:
        """Bytes of bookkeeping besides K/V (positions, validity, scores)."""
        tensors = [self.positions, self.valid, *self.state.values()]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    # batch operations used by generate (beam search, num_return_sequences, ...): BatchOps ---------
    def _map_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        self.keys, self.values = fn(self.keys), fn(self.values)
        self.positions, self.valid = fn(self.positions), fn(self.valid)
        self.state = {name: fn(t) for name, t in self.state.items()}

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0:
            return
        raise NotImplementedError(
            "a compressed KV cache cannot be cropped (evicted or merged tokens cannot be restored); "
            "assisted/speculative decoding is not supported with token-level compression"
        )

    def reset(self) -> None:
        super().reset()
        self.seen, self.positions, self.valid, self.state, self.evicted = 0, None, None, {}, 0

    def __repr__(self) -> str:
        return (f"CompressedLayer({self.method.name}, layer={self.layer_idx}, group={self.group}, "
                f"stored={self.stored}, seen={self.seen})")
