"""SnapKV (per-head votes of an observation window, pooled) against a slow reference of its rule,
alone and composed with KV sharing, and decoding after its per-head selection."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import VOCAB, make_tiny
from masked_reference import reference_new_logits

from kvsharer import SharingPolicy, cache_nbytes, share_kv
from kvsharer.methods.intra import CompressedLayer, SnapKV, compress_kv
from kvsharer.models.loading import kv_shape
from kvsharer.cache.sharing import SharedLayer

SHARING_MAP = [0, 1, 2, 1, 4, 4, 2, 0]  # groups {0, 7}, {1, 3}, {2, 6}, {4, 5}
N, WINDOW, KEEP = 24, 5, 11  # a 24-token prefill, 5 observing queries, 11 tokens kept (6 chosen + the window)


def reference_pooled(votes, kernel, pooling):
    """``votes`` (a list of floats over the prefix) pooled plainly: centred window, stride 1, zero-padded
    for the average (PyTorch's count_include_pad), the window's own tokens only for the max."""
    half, out = kernel // 2, []
    for j in range(len(votes)):
        around = votes[max(0, j - half):j + half + 1]
        out.append(max(around) if pooling == "max" else sum(around) / kernel)
    return out


def eager_attentions(model, tokens, policy):
    """Per layer, the fp32 attention probabilities ``[B, H, q, S]`` of the plain (shared) model."""
    with share_kv(model, policy) if policy else contextlib.nullcontext():
        model.config._attn_implementation = "eager"
        try:
            return [a.detach().float() for a in model(tokens, output_attentions=True).attentions]
        finally:
            model.config._attn_implementation = "sdpa"


@pytest.mark.parametrize("pooling", ["max", "avg"])
@pytest.mark.parametrize("sharing", [False, True])
def test_prefill_selection_follows_the_papers_rule(sharing, pooling):
    """Per (row, KV head): the window is kept, and the other kept tokens are the top pooled votes of the
    window's queries (summed over the query heads of the KV head and the layers of the group)."""
    model = make_tiny("llama")
    policy = SharingPolicy(SHARING_MAP) if sharing else None
    share_map = SHARING_MAP if sharing else list(range(8))
    n_layers, kv_heads, _ = kv_shape(model)
    heads = model.config.num_attention_heads
    tokens = torch.randint(3, VOCAB, (2, N), generator=torch.Generator().manual_seed(11))
    with compress_kv(model, SnapKV(KEEP, window=WINDOW, kernel=3, pooling=pooling), policy=policy):
        cache = model(tokens).past_key_values
    attentions = eager_attentions(model, tokens, policy)
    prefix, chosen = N - WINDOW, KEEP - WINDOW
    for src in sorted(set(share_map)):
        layer = cache.layers[src]
        assert isinstance(layer, CompressedLayer) and layer.positions.shape == (2, kv_heads, KEEP)
        members = [m for m in range(n_layers) if share_map[m] == src]
        for b in range(2):
            for h in range(kv_heads):
                kept = layer.positions[b, h].tolist()
                assert kept[-WINDOW:] == list(range(prefix, N))  # the observation window itself
                votes = [0.0] * prefix
                for m in members:
                    for head in range(h * heads // kv_heads, (h + 1) * heads // kv_heads):
                        for query in range(N - WINDOW, N):
                            for j in range(prefix):
                                votes[j] += float(attentions[m][b, head, query, j])
                pooled = reference_pooled(votes, 3, pooling)
                picked = kept[:-WINDOW]
                assert len(picked) == chosen == len(set(picked))
                # ties (max-pooling plateaus) may go either way: nothing left out scores above what was kept
                worst_kept = min(pooled[j] for j in picked)
                best_left = max(pooled[j] for j in range(prefix) if j not in picked)
                assert worst_kept >= best_left - 1e-5


def test_heads_choose_different_tokens_and_decode_against_per_head_masks():
    """New tokens attend, per KV head, exactly to what that head kept (plain model with per-head masks)."""
    model = make_tiny("qwen2")
    policy = SharingPolicy(SHARING_MAP)
    full = torch.randint(3, VOCAB, (2, 27), generator=torch.Generator().manual_seed(3))
    for n_new in (1, 3):
        with compress_kv(model, SnapKV(KEEP, window=WINDOW, kernel=3), policy=policy):
            cache = model(full[:, :27 - n_new]).past_key_values
            kept = {i: layer.positions.clone() for i, layer in enumerate(cache.layers) if isinstance(layer, CompressedLayer)}
            got = model(full[:, 27 - n_new:], past_key_values=cache).logits
        assert any(not torch.equal(k[:, 0], k[:, 1]) for k in kept.values())  # per-head choices differ somewhere
        with share_kv(model, policy):
            ref = reference_new_logits(model, full, kept, SHARING_MAP, n_new)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_composed_with_sharing_one_physical_cache_per_group_and_its_bytes():
    model = make_tiny("llama")
    policy = SharingPolicy(SHARING_MAP)
    _, kv_heads, head_dim = kv_shape(model)
    tokens = torch.randint(3, VOCAB, (2, 30), generator=torch.Generator().manual_seed(1))
    with compress_kv(model, SnapKV(12, window=4), policy=policy):
        cache = model(tokens).past_key_values
        cache = model(tokens[:, :3], past_key_values=cache).past_key_values  # a chunk beyond the budget
    groups = policy.groups()
    for idx, layer in enumerate(cache.layers):
        if idx in groups:
            assert isinstance(layer, CompressedLayer) and layer.group == groups[idx] and layer.stored == 12
            assert layer.seen == 33 and layer.state["window_rows"].shape == (2, kv_heads, 4, 12)
        else:
            assert isinstance(layer, SharedLayer) and layer.source is cache.layers[SHARING_MAP[idx]]
    assert cache_nbytes(cache) == 2 * len(groups) * 2 * kv_heads * 12 * head_dim * 4  # fp32, 4 physical caches


def test_bad_options_are_refused():
    for kwargs, words in [({"window": 0}, "window"), ({"kernel": 4}, "odd"), ({"pooling": "min"}, "pooling")]:
        with pytest.raises(ValueError, match=words):
            SnapKV(0.5, **kwargs)
