"""SnapKV (Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024,
arXiv:2404.14469): the last queries (the *observation window*) vote, per head, for the earlier tokens
to keep; votes are pooled so that the neighbours of a chosen token come with it.

What this class does, exactly (the paper's rule, per KV head):

* **Votes.** The cache keeps the attention rows of the last ``window`` queries (default 32), fp32, per
  KV head: summed over the query heads that read that KV head (grouped-query attention) and over the
  layers of a sharing group. During decoding each new query's row enters the window and the oldest
  leaves it (as PyramidInfer's rows), so the window is always the last ``window`` tokens seen.
* **When it selects.** Whenever the cache holds more than its budget ``k`` (after the prefill, after
  each chunk of a chunked evaluation, after each decoding step, once all layers of the group have
  attended). The paper compresses the prompt once, after the prefill; a cache that stays within budget
  (``f = 1``, or an integer budget above the prompt) never selects.
* **Select.** The observation window itself — the ``w = min(window, k)`` most recent stored tokens — is
  kept. For the older tokens (the *prefix*), a token's score is the sum of the window's rows over the
  window, pooled along the prefix's tokens with a window of ``kernel`` tokens (default 7, stride 1,
  centred: max-pooling by default, ``pooling="avg"`` for average pooling as in the paper's code); per
  head the ``k − w`` highest pooled scores are kept (padding first out). Kept tokens stay in position
  order, and their rows in the window carry on.
* One keep-set per **KV head** (``per_head``): the cache's positions and masks are per head.
"""

from __future__ import annotations

import torch

from .base import TokenMethod, evict_by_score, join_recent_rows

POOLINGS = ("max", "avg")


class SnapKV(TokenMethod):
    name = "snapkv"
    per_head = True

    def __init__(self, budget=0.5, window: int = 32, kernel: int = 7, pooling: str = "max"):
        super().__init__(budget)
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window (observation queries) must be an int >= 1; got {window!r}")
        if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"kernel (pooling width in tokens) must be an odd int >= 1; got {kernel!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}; got {pooling!r}")
        self.window, self.kernel, self.pooling = window, kernel, pooling

    @property
    def recent_queries(self) -> int:
        return self.window

    def observe(self, layer, scores, first):
        # scores.recent_heads [B, kvh, n, S]: the last n = min(window, queries) queries, per KV head
        join_recent_rows(layer, "window_rows", scores.recent_heads, first, self.window, dim=2)

    def pool(self, score: torch.Tensor) -> torch.Tensor:
        """``score [B, kvh, P]`` pooled along the tokens (stride 1, centred, same length)."""
        flat = score.reshape(-1, 1, score.shape[-1])  # [B·kvh, 1, P]
        pad = self.kernel // 2
        if self.pooling == "max":
            pooled = torch.nn.functional.max_pool1d(flat, self.kernel, stride=1, padding=pad)
        else:
            pooled = torch.nn.functional.avg_pool1d(flat, self.kernel, stride=1, padding=pad)
        return pooled.reshape(score.shape)

    def compress(self, layer, keep):
        window = min(self.window, keep)
        score = layer.state["window_rows"].sum(dim=2)  # [B, kvh, S]: votes of the window's queries
        prefix = score.shape[-1] - window
        if prefix > 0:  # pool the prefix only: the window's own scores do not spill onto it
            score = torch.cat([self.pool(score[..., :prefix]), score[..., prefix:]], dim=-1)
        evict_by_score(layer, score, keep, window)

    def describe(self):
        return {**super().describe(), "window": self.window, "kernel": self.kernel, "pooling": self.pooling}
