"""PyramidInfer (Yang et al., "PyramidInfer: Pyramid KV Cache Compression for High-throughput LLM
Inference", Findings of ACL 2024, arXiv:2405.12532).

Two ideas of the paper, as implemented here:

* **Layer-wise budgets that shrink with depth** (deeper layers need fewer "pivotal contexts"). The
  ``n`` layers that store K/V (with KV sharing: the source layers, in depth order) get budget
  multipliers decreasing *linearly* from ``1 + spread`` (first storing layer) to ``1 − spread`` (last);
  their mean is 1, so the average budget is the global one. With a fractional budget ``f`` the spread is
  reduced to at most ``(1 − f) / f`` so no layer is asked to keep more than everything (hence ``f = 1``
  keeps every token in every layer). Per-layer budgets are rounded to whole tokens.
* **Recent attention consistency.** Tokens are chosen by the attention that the most recent queries
  pay them: the cache keeps the attention rows of the last ``window`` queries (fp32, summed over heads,
  and over the layers of a sharing group), a token's score is the sum over those rows, and every time
  the cache exceeds its budget it keeps the ``r = min(window, floor(k / 2))`` most recent tokens plus
  the ``k − r`` highest-scoring others (padding first out). During decoding each new query's row
  enters the window and the oldest leaves it, so the choice follows what recent queries attend to.
"""

from __future__ import annotations

from .base import TokenMethod, evict_by_score, join_recent_rows, validate_ratio


class PyramidInfer(TokenMethod):
    name = "pyramidinfer"

    def __init__(self, budget=0.5, spread: float = 0.5, window: int = 8):
        super().__init__(budget)
        self.spread = validate_ratio("spread", spread)
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window (recent queries that score tokens) must be an int >= 1; got {window!r}")
        self.window = window

    def effective_spread(self) -> float:
        f = self.budget.fraction
        return self.spread if f is None else min(self.spread, (1.0 - f) / f)

    def layer_scale(self, rank, n_stored):
        if n_stored <= 1:
            return 1.0
        return 1.0 + self.effective_spread() * (1.0 - 2.0 * rank / (n_stored - 1))

    @property
    def recent_queries(self) -> int:
        return self.window

    def observe(self, layer, scores, first):
        # scores.recent [B, n, S]: per recent query (n = min(window, queries)), summed over heads
        join_recent_rows(layer, "recent_rows", scores.recent, first, self.window, dim=1)

    def compress(self, layer, keep):
        score = layer.state["recent_rows"].sum(dim=1)
        evict_by_score(layer, score, keep, min(self.window, keep // 2))

    def describe(self):
        return {**super().describe(), "spread": self.spread, "window": self.window}
