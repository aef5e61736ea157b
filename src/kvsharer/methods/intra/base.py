"""What every token-level method shares: a validated budget, and keep-`k`-tokens helpers.

A method compresses one *physical* cache (a source layer and the layers that share it) to a number of
tokens, its *budget*. A budget is either

* a **fraction kept** ``0 < f <= 1`` (a float): after seeing ``n`` tokens the cache keeps
  ``max(1, floor(f * n + 0.5))`` of them, so the budget grows with the sequence during decoding and
  ``f = 1.0`` keeps everything (the method is then an exact no-op), or
* an **integer number of tokens** ``k >= 1``: the cache never holds more than ``k`` tokens.

Methods are small classes (one file each, kvpress style) with two hooks that the cache layer
(:mod:`kvsharer.intra.cache`) calls:

* ``observe(layer, scores, first)`` after every attention call that read the cache — ``scores`` (an
  :class:`~kvsharer.intra.blockwise.AttentionScores`) holds reductions of the fp32 attention
  probabilities of *one* layer of the group (padding queries contribute nothing): ``received [batch,
  stored tokens]``, summed over heads and queries, and ``recent [batch, r, stored tokens]``, the rows of
  the last ``r = min(recent_queries, queries)`` queries summed over heads (the full ``[queries, stored]``
  matrix is never materialised) — or, for a ``per_head`` method, ``recent_heads [batch, kv_heads, r,
  stored tokens]``, those rows summed over the query heads of each KV head; ``first`` is True for the
  source layer, which runs first;
* ``compress(layer, keep)`` once the last layer of the group has attended, when the cache holds more
  than ``keep`` tokens: it must leave exactly ``keep`` tokens in every batch row.

Per-token method state lives in ``layer.state`` (tensors whose *last* axis is the token axis), so the
layer can pad, gather and batch-reorder it together with keys and values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .blockwise import AttentionScores
    from .cache import CompressedLayer

# Priorities used to choose what to keep (real scores are attention sums, always >= 0).
KEEP_ALWAYS = math.inf  # the recent window
PADDING = -1.0  # padding tokens: dropped before any real token
UNUSED = -math.inf  # empty slots (KVMerger): dropped first


@dataclass(frozen=True)
class Budget:
    """A per-layer token budget: ``fraction`` of the tokens seen, or a fixed number of ``tokens``."""

    fraction: float | None = None
    tokens: int | None = None

    @classmethod
    def parse(cls, value) -> "Budget":
        if isinstance(value, Budget):
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(
                f"budget must be a fraction kept (0 < f <= 1, a float) or a number of tokens (an int >= 1); got {value!r}"
            )
        if isinstance(value, int):
            if value < 1:
                raise ValueError(f"budget of {value} tokens: a cache must keep at least 1 token")
            return cls(tokens=int(value))
        if not math.isfinite(value) or not 0.0 < value <= 1.0:
            raise ValueError(
                f"budget fraction {value!r} is outside (0, 1]; pass a float in (0, 1] for a fraction kept "
                "or an int for a number of tokens"
            )
        return cls(fraction=float(value))

    def keep(self, seen: int, scale: float = 1.0) -> int:
        """Tokens to keep after ``seen`` tokens (``scale``: per-layer multiplier, e.g. PyramidInfer's)."""
        if self.fraction is not None:
            want = math.floor(self.fraction * scale * seen + 0.5)
        else:
            want = math.floor(self.tokens * scale + 0.5)
        return max(1, min(seen, want)) if seen > 0 else 0

    def __str__(self) -> str:
        return f"{self.fraction:g}" if self.fraction is not None else f"{self.tokens} tokens"


class TokenMethod:
    """Base of the token-level methods: a budget, a name, and the two hooks (see the module docstring)."""

    name = "base"
    recent_queries = 0  # rows of the last queries that observe() needs in ``scores.recent``
    per_head = False  # True: one keep-set per KV head (``scores.recent_heads``, select([B, kv_heads, k]))

    def __init__(self, budget=0.5):
        self.budget = Budget.parse(budget)

    # budgets ------------------------------------------------------------------------------
    def layer_scale(self, rank: int, n_stored: int) -> float:
        """Multiplier of the budget for the ``rank``-th storing layer (in depth order) of ``n_stored``."""
        return 1.0

    def keep_for(self, rank: int, n_stored: int, seen: int) -> int:
        """Tokens the ``rank``-th storing layer keeps after seeing ``seen`` tokens."""
        return self.budget.keep(seen, self.layer_scale(rank, n_stored))

    # hooks --------------------------------------------------------------------------------
    def observe(self, layer: "CompressedLayer", scores: "AttentionScores", first: bool) -> None:  # pragma: no cover
        raise NotImplementedError

    def compress(self, layer: "CompressedLayer", keep: int) -> None:  # pragma: no cover
        raise NotImplementedError

    def describe(self) -> dict:
        return {"method": self.name, "budget": str(self.budget)}

    def __repr__(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.describe().items() if k not in ("method", "budget"))
        return f"{type(self).__name__}(budget={self.budget}{', ' + extra if extra else ''})"


# helpers shared by the methods -------------------------------------------------------------


def recent_size(keep: int, ratio: float) -> int:
    """Size of the always-kept recent window: ``floor(ratio * keep)``, at most ``keep - 1`` when keep > 1."""
    return min(int(ratio * keep), max(keep - 1, 0))


def keep_top(priority: torch.Tensor, keep: int) -> torch.Tensor:
    """Per row, the indices of the ``keep`` highest priorities, in increasing (= position) order. [B, keep]"""
    idx = torch.topk(priority, keep, dim=-1, sorted=False).indices
    return idx.sort(dim=-1).values


def evict_by_score(layer: "CompressedLayer", score: torch.Tensor, keep: int, recent: int) -> None:
    """Keep the last ``recent`` stored tokens plus the ``keep - recent`` others with the highest ``score``
    (``score [B, S]``, or ``[B, kv_heads, S]`` for a per-head method: one keep-set per head)."""
    priority = score.float().masked_fill(~layer.valid, PADDING)
    if recent > 0:
        priority[..., -recent:] = KEEP_ALWAYS
    layer.select(keep_top(priority, keep))


def join_recent_rows(layer: "CompressedLayer", key: str, rows: torch.Tensor, first: bool, window: int, dim: int) -> None:
    """Attention rows of this call's last queries (``rows``, queries along ``dim``) into ``layer.state[key]``:
    the source layer (``first``) appends them and keeps the last ``window``; a layer sharing the cache adds
    its attention to the same (most recent) rows."""
    kept = layer.state.get(key)
    if first or kept is None:
        if kept is None:
            kept = rows.narrow(dim, 0, 0)
        joined = torch.cat([kept, rows], dim=dim)
        layer.state[key] = joined.narrow(dim, max(0, joined.shape[dim] - window), min(window, joined.shape[dim]))
    else:
        n = rows.shape[dim]
        kept.narrow(dim, kept.shape[dim] - n, n).add_(rows)


def validate_ratio(name: str, value: float, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        (0.0 < value if low_open else 0.0 <= value) and value <= 1.0
    ):
        raise ValueError(f"{name} must be a number in {'(0' if low_open else '[0'}, 1]; got {value!r}")
    return float(value)
