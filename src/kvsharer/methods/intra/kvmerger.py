"""KVMerger (Wang et al., "Model Tells You Where to Merge: Adaptive KV Cache Merging for LLMs on
Long-Context Tasks", 2024, arXiv:2407.08454): merge similar adjacent tokens instead of evicting them.

The paper's two steps — merging-set identification from the observation that *adjacent keys are
highly similar*, and Gaussian-kernel weighted merging around a *pivotal* state — implemented under a
token budget, with these exact choices (ours where the abstract leaves them open):

* **Scores.** Like H2O, every cached token accumulates the attention it receives (sum over heads and
  queries, and over the layers of a sharing group). Scores only choose pivots (and, with a threshold,
  what to evict); a merged token's score is the sum of its members' scores.
* **Recent window.** The last ``r = floor(recent_ratio · k)`` stored tokens are never merged.
* **Merging sets.** Among the older tokens, the similarity of each *adjacent* pair (neighbours in the
  stored cache) is the cosine similarity of their keys, averaged over KV heads (one token set per layer,
  shared by all heads). To bring ``S`` stored tokens to the budget ``k`` the ``m = S − k`` most similar
  adjacent pairs are merged (greedy, most similar first); chains of chosen pairs form a merging set of
  consecutive tokens, so exactly ``m`` tokens disappear in every row. With ``threshold`` set, only
  pairs with similarity ≥ threshold may merge; tokens still over budget are then evicted by lowest
  score (outside the recent window). Pairs touching a padding token always merge first, with the
  padding token weighted 0.
* **Gaussian-kernel merging.** In each set the pivot ``p`` is the member with the highest accumulated
  score. Per KV head, member ``i`` gets weight ``g_i = exp(−‖k_i − k_p‖² / (2σ²))`` with ``σ²`` the mean
  of ``‖k_i − k_p‖²`` over the set's other members (so ``g_p = 1`` and, in a pair, the partner gets
  ``e^{-1/2}``); identical keys (σ = 0) merge with equal weights. The merged key and value are
  ``Σ g_i k_i / Σ g_i`` and ``Σ g_i v_i / Σ g_i``, placed at the pivot's position (its mask column).
* Merging repeats whenever the cache exceeds its budget: after the prefill and after each decoding
  step (one pair per step once the cache is full).
"""

from __future__ import annotations

import torch

from .base import KEEP_ALWAYS, PADDING, UNUSED, TokenMethod, keep_top, recent_size, validate_ratio


class KVMerger(TokenMethod):
    name = "kvmerger"

    def __init__(self, budget=0.5, recent_ratio: float = 0.25, threshold: float | None = None):
        super().__init__(budget)
        self.recent_ratio = validate_ratio("recent_ratio", recent_ratio)
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                      or not -1.0 <= threshold <= 1.0):
            raise ValueError(f"threshold (cosine similarity) must be None or a number in [-1, 1]; got {threshold!r}")
        self.threshold = None if threshold is None else float(threshold)

    def observe(self, layer, scores, first):
        received = scores.received  # [B, S]: over heads and queries
        score = layer.state.get("score")
        layer.state["score"] = received if score is None else score + received

    def compress(self, layer, keep):
        stored = layer.stored
        recent = recent_size(keep, self.recent_ratio)
        cand = stored - recent  # tokens that may merge
        need = stored - keep  # tokens to remove per row (<= cand - 1 since recent < keep)
        keys, values, valid = layer.keys, layer.values, layer.valid
        score = layer.state["score"].float()
        batch, heads, _, dim = keys.shape
        dev = keys.device

        # 1. similarity of adjacent candidate keys, mean over KV heads: [B, cand - 1]
        k32 = keys[:, :, :cand].float()
        sim = torch.nn.functional.cosine_similarity(k32[:, :, :-1], k32[:, :, 1:], dim=-1).mean(dim=1)
        pad_edge = ~(valid[:, :cand - 1] & valid[:, 1:cand])
        sim = sim.masked_fill(pad_edge, 2.0)  # above any cosine: padding merges away first
        if self.threshold is not None:
            sim = sim.masked_fill((sim < self.threshold) & ~pad_edge, float("-inf"))
        top = torch.topk(sim, need, dim=-1)
        chosen = torch.zeros_like(sim, dtype=torch.bool).scatter_(-1, top.indices, top.values > float("-inf"))

        # 2. merging sets: token j starts a new set unless the pair (j-1, j) was chosen
        starts = torch.ones(batch, cand, dtype=torch.long, device=dev)
        starts[:, 1:] = (~chosen).long()
        set_id = starts.cumsum(-1) - 1  # [B, cand], sets numbered 0.. per row
        n_sets = set_id[:, -1] + 1  # [B]

        # 3. pivot = highest score in its set (ties: first), padding never a pivot unless the set is all padding
        pscore = score[:, :cand].masked_fill(~valid[:, :cand], PADDING)
        set_max = torch.full((batch, cand), UNUSED, device=dev).scatter_reduce(-1, set_id, pscore, "amax")
        arange = torch.arange(cand, device=dev).expand(batch, cand)
        is_max = pscore == set_max.gather(-1, set_id)
        pivot = torch.full((batch, cand), cand - 1, dtype=torch.long, device=dev).scatter_reduce(
            -1, set_id, torch.where(is_max, arange, cand - 1), "amin"
        )  # [B, sets]
        pivot_of = pivot.gather(-1, set_id)  # [B, cand]: each token's pivot index
        is_pivot = pivot_of == arange

        # 4. Gaussian-kernel weights per KV head: [B, kvh, cand]
        hidx = pivot_of[:, None, :, None].expand(batch, heads, cand, dim)
        dist2 = (k32 - k32.gather(2, hidx)).pow(2).sum(-1)
        others = (valid[:, :cand] & ~is_pivot)[:, None, :].expand_as(dist2).float()
        sid = set_id[:, None, :].expand_as(dist2)
        var_sum = torch.zeros(batch, heads, cand, device=dev).scatter_add(-1, sid, dist2 * others)
        var_cnt = torch.zeros(batch, heads, cand, device=dev).scatter_add(-1, sid, others)
        sigma2 = (var_sum / var_cnt.clamp(min=1.0)).gather(-1, sid)
        g = torch.where(sigma2 > 0, torch.exp(-dist2 / (2 * sigma2.clamp(min=1e-30))), torch.ones_like(dist2))
        g = g * valid[:, None, :cand]
        g_tot = torch.zeros(batch, heads, cand, device=dev).scatter_add(-1, sid, g)
        g = g + (g_tot.gather(-1, sid) == 0) * is_pivot[:, None, :]  # all-padding set: the pivot as is
        g_tot = torch.zeros(batch, heads, cand, device=dev).scatter_add(-1, sid, g)

        def merge(x):  # [B, kvh, cand, D] -> [B, kvh, cand(slots), D]
            sidx = set_id[:, None, :, None].expand(batch, heads, cand, dim)
            summed = torch.zeros(batch, heads, cand, dim, device=dev).scatter_add(2, sidx, x[:, :, :cand].float() * g[..., None])
            return (summed / g_tot.clamp(min=1e-30)[..., None]).to(x.dtype)

        new_keys, new_values = merge(keys), merge(values)
        slot_used = torch.arange(cand, device=dev)[None, :] < n_sets[:, None]  # [B, cand]
        pivot_slots = pivot.clamp(max=cand - 1)
        new_pos = layer.positions[:, :cand].gather(-1, pivot_slots)
        new_valid = valid[:, :cand].gather(-1, pivot_slots) & slot_used
        new_score = torch.zeros(batch, cand, device=dev).scatter_add(-1, set_id, score[:, :cand] * valid[:, :cand])

        # 5. write back [merged slots | recent window], then keep exactly `keep` slots per row
        layer.keys = torch.cat([new_keys, keys[:, :, cand:]], dim=2)
        layer.values = torch.cat([new_values, values[:, :, cand:]], dim=2)
        layer.positions = torch.cat([new_pos, layer.positions[:, cand:]], dim=-1)
        layer.valid = torch.cat([new_valid, valid[:, cand:]], dim=-1)
        layer.state["score"] = torch.cat([new_score.to(layer.state["score"].dtype), layer.state["score"][:, cand:]], dim=-1)
        priority = torch.cat([new_score.masked_fill(~new_valid, PADDING).masked_fill(~slot_used, UNUSED),
                              torch.full((batch, recent), KEEP_ALWAYS, device=dev)], dim=-1)
        layer.select(keep_top(priority, keep))

    def describe(self):
        return {**super().describe(), "recent_ratio": self.recent_ratio, "threshold": self.threshold}
