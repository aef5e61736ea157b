"""StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024,
arXiv:2309.17453): keep the first tokens (the *attention sinks*) and a window of the most recent ones.

What this class does, exactly:

* **No scores.** The choice depends on positions only: ``observe`` records nothing.
* **Evict.** Whenever the cache holds more than its budget ``k`` (after the prefill, after each chunk
  of a chunked evaluation, after each decoding step, once all layers of the group have attended), it
  keeps the first ``s = min(sinks, k − 1)`` *real* tokens the cache still holds (default ``sinks = 4``,
  the paper's: the sequence's first tokens, unless a smaller earlier budget already evicted some) plus
  the ``k − s`` most recent stored tokens; padding goes first. So at least one recent token is kept, and
  a budget of one token keeps the last token only.
* Keys are cached after RoPE, so kept tokens keep their original positions (as kvpress's
  ``StreamingLLMPress``); the paper's rolling cache re-assigns positions inside the window instead.
* One keep-set per layer (shared by all heads), the same for every layer of a sharing group.
"""

from __future__ import annotations

from .base import TokenMethod, evict_by_score


class StreamingLLM(TokenMethod):
    name = "streamingllm"

    def __init__(self, budget=0.5, sinks: int = 4):
        super().__init__(budget)
        if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
            raise ValueError(f"sinks (first tokens always kept) must be an int >= 0; got {sinks!r}")
        self.sinks = sinks

    def observe(self, layer, scores, first):
        pass  # positions alone decide

    def compress(self, layer, keep):
        sinks = min(self.sinks, keep - 1)
        rank = layer.valid.long().cumsum(dim=-1)  # [B, S]: 1 + real tokens before each stored token
        is_sink = layer.valid & (rank <= sinks)  # the first `sinks` real tokens of the row
        evict_by_score(layer, is_sink.float(), keep, keep - sinks)  # sinks 1, other old tokens 0

    def describe(self):
        return {**super().describe(), "sinks": self.sinks}
