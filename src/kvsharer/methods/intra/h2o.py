"""H2O — Heavy-Hitter Oracle (Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of
Large Language Models", NeurIPS 2023, arXiv:2306.14048).

What this class does, exactly:

* **Score.** Every cached token accumulates the attention probability it receives: after each attention
  call, ``score[b, t] += sum over heads and queries of softmax weights[b, h, i, t]`` (fp32). Scores keep
  accumulating over the prefill and every decoding step ("accumulated attention"). With KV sharing, the
  cache of a source layer is scored by the attention of the source AND of every layer sharing it (their
  weights are summed into the same score), and one set of tokens is kept for the whole group.
* **Evict.** Whenever the cache holds more than its budget ``k`` (after the prefill and after every
  decoding step, once all layers of the group have attended), it keeps the ``r = floor(recent_ratio · k)``
  most recent tokens (default: half the budget, as in the paper's equal heavy/recent split) plus the
  ``k − r`` other tokens with the highest accumulated score; padding tokens go first. Kept tokens stay in
  position order; their scores carry on.
* One keep-set per layer (shared by all heads) and the same number of tokens per batch row.
"""

from __future__ import annotations

from .base import TokenMethod, evict_by_score, recent_size, validate_ratio


class H2O(TokenMethod):
    name = "h2o"

    def __init__(self, budget=0.5, recent_ratio: float = 0.5):
        super().__init__(budget)
        self.recent_ratio = validate_ratio("recent_ratio", recent_ratio)

    def observe(self, layer, scores, first):
        received = scores.received  # [B, S]: over heads and queries
        score = layer.state.get("score")
        layer.state["score"] = received if score is None else score + received

    def compress(self, layer, keep):
        evict_by_score(layer, layer.state["score"], keep, recent_size(keep, self.recent_ratio))

    def describe(self):
        return {**super().describe(), "recent_ratio": self.recent_ratio}
