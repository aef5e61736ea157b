"""Layer kinds (kvsharer.models.layer_kinds): read from config.json dicts and config objects, in agreement with
the cache transformers builds from the same config; every consumer (attach, calibration, the searches,
MiniCache) follows them; sliding-window sharing attends over what the source attended over."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import VOCAB, make_tiny
from transformers import AutoConfig
from transformers.cache_utils import (DummyLayer, DynamicCache, DynamicSlidingWindowLayer,
                                      LinearAttentionAndFullAttentionLayer, LinearAttentionCacheLayerMixin)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from kvsharer import PolicyError, SharingPolicy, share_kv
from kvsharer.methods.minicache import MiniCache, pairs_for_rate
from kvsharer.models.layer_kinds import (CHUNKED, FULL, LATENT, LINEAR, NONE, SLIDING, UNKNOWN, layer_kinds, policy_problems,
                                         shareable_layers, unsupported)
from kvsharer.models.loading import UnsupportedArchitecture, find_parts
from kvsharer.search.calibrate import collect
from kvsharer.search.distance import layer_distances, rank_pairs
from kvsharer.search.measured import candidate_pairs

MIXED = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention",
         "full_attention", "sliding_attention", "sliding_attention", "full_attention"]


def kind_list(config) -> list[tuple[str, int | None]]:
    return [(k.kind, k.window) for k in layer_kinds(config)]


# ------------------------------------------------------------------------------------------------
# reading configs
# ------------------------------------------------------------------------------------------------


def test_config_json_dicts_of_each_form():
    # Mistral-7B-v0.1: one window, no layer_types
    assert kind_list({"num_hidden_layers": 3, "sliding_window": 4096}) == [(SLIDING, 4096)] * 3
    # Qwen2 with the window switched off, and on from max_window_layers
    assert kind_list({"num_hidden_layers": 2, "sliding_window": 4096, "use_sliding_window": False}) == [(FULL, None)] * 2
    assert kind_list({"num_hidden_layers": 4, "sliding_window": 64, "use_sliding_window": True,
                      "max_window_layers": 2}) == [(FULL, None)] * 2 + [(SLIDING, 64)] * 2
    # Gemma 3: explicit layer types (sliding 5 : 1 global), inside a multimodal config's text_config
    gemma = {"text_config": {"num_hidden_layers": 6, "sliding_window": 1024,
                             "layer_types": ["sliding_attention"] * 5 + ["full_attention"]}}
    assert kind_list(gemma) == [(SLIDING, 1024)] * 5 + [(FULL, None)]
    # Llama 4: chunked + full; a hybrid: linear attention layers hold no K/V
    assert kind_list({"num_hidden_layers": 2, "attention_chunk_size": 8192,
                      "layer_types": ["chunked_attention", "full_attention"]}) == [(CHUNKED, 8192), (FULL, None)]
    hybrid = layer_kinds({"num_hidden_layers": 4, "layer_types": ["linear_attention", "full_attention"] * 2})
    assert [k.has_kv for k in hybrid] == [False, True, False, True] and shareable_layers(hybrid) == [3]
    # Falcon-H1: attention and a Mamba state in one layer; the attention part shares
    falcon = layer_kinds({"num_hidden_layers": 2, "layer_types": ["hybrid", "hybrid"]})
    assert all(k.kind == FULL and k.recurrent for k in falcon) and not policy_problems([0, 0], falcon)
    # Gemma 3n: its last layers already reuse K/V by design: neither sharers nor sources
    gemma3n = layer_kinds({"num_hidden_layers": 4, "num_kv_shared_layers": 2, "layer_types": ["full_attention"] * 4})
    assert [k.kind for k in gemma3n] == [FULL, FULL, NONE, NONE]


def test_latent_attention_and_unknown_types_are_refused_with_the_reason():
    mla = layer_kinds({"num_hidden_layers": 4, "kv_lora_rank": 512, "qk_rope_head_dim": 64})
    assert all(k.kind == LATENT for k in mla) and "multi-head latent attention" in unsupported(mla)
    odd = layer_kinds({"num_hidden_layers": 2, "layer_types": ["full_attention", "teleport_attention"]})
    assert "'teleport_attention'" in unsupported(odd)
    assert unsupported(layer_kinds({"num_hidden_layers": 2, "layer_types": ["linear_attention"] * 2})).startswith("no two")


def _default_configs():
    for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        if model_type not in CONFIG_MAPPING_NAMES:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                config = AutoConfig.for_model(model_type)
            text = config.get_text_config(decoder=True)
            cache = DynamicCache(config=config)
        except Exception:  # a config that needs arguments, or no per-layer cache: the sweep covers the model
            continue
        if len(cache.layers) == getattr(text, "num_hidden_layers", -1):
            yield model_type, text, cache


DEFAULTS = list(_default_configs())


@pytest.mark.parametrize("model_type, config, cache", DEFAULTS, ids=[d[0] for d in DEFAULTS])
def test_kinds_agree_with_the_cache_transformers_builds(model_type, config, cache):
    """Independent of our reading: the cache layer classes transformers picks for the default config of every
    causal LM. Which layers store per-token K/V, and which keep only a window of which size."""
    kinds = layer_kinds(config)
    if {k.kind for k in kinds} & {LATENT, UNKNOWN}:  # refused whole, with the reason
        # MLA (its cache layers hold the latent under the names keys/values); sparse indexed attention
        assert "latent" in unsupported(kinds) or "indexed_attention" in unsupported(kinds)
        return
    for i, (kind, layer) in enumerate(zip(kinds, cache.layers)):
        stores_kv = not isinstance(layer, DummyLayer) and (
            not isinstance(layer, LinearAttentionCacheLayerMixin) or isinstance(layer, (LinearAttentionAndFullAttentionLayer,
                                                                                     DynamicSlidingWindowLayer)))
        assert kind.has_kv == stores_kv, f"layer {i}: {kind} vs {type(layer).__name__}"
        if isinstance(layer, DynamicSlidingWindowLayer):
            assert kind.kind in (SLIDING, CHUNKED) and kind.window == layer.sliding_window, f"layer {i}"
        elif kind.has_kv:
            assert kind.kind == FULL, f"layer {i}: {kind} vs {type(layer).__name__}"
        else:
            assert kind.kind in (LINEAR, NONE)


# ------------------------------------------------------------------------------------------------
# every consumer follows the kinds
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed():
    """8 layers of Qwen2, sliding (window 4) and full mixed, prompts of 12 tokens: longer than the window."""
    return make_tiny("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=0, layer_types=MIXED)


def test_attach_refuses_a_cross_kind_pair_and_names_both(mixed):
    with pytest.raises(PolicyError, match=r"layer 4 \(full attention\) cannot read layer 3 \(sliding attention \(window 4\)\)"):
        share_kv(mixed, SharingPolicy.from_pairs(8, {4: 3}))


def test_calibration_keeps_every_token_of_sliding_layers_and_the_searches_pair_within_kinds(mixed):
    ids = torch.randint(3, VOCAB, (3, 12), generator=torch.Generator().manual_seed(0))
    stats = collect(mixed, ids)
    assert stats["keys"].shape == (8, 2, 12, 16)  # all 12 tokens for every layer, sliding ones included
    # the sliding layer's statistics are its K of the whole prompt: the same as a full-attention cache's
    plain = mixed.model(input_ids=ids, past_key_values=DynamicCache(), use_cache=True).past_key_values
    assert torch.allclose(stats["keys"][0], plain.layers[0].keys.float().mean(0), atol=1e-6)
    kinds = find_parts(mixed).kinds
    dist = layer_distances(stats["keys"], stats["values"])
    for order in ("dissimilar", "similar", "random"):
        ranked = rank_pairs(dist, order, 0, kinds)
        assert {(i, j) for i, j, _ in ranked} == {(i, j) for i in range(8) for j in range(i) if MIXED[i] == MIXED[j]}
    pairs = candidate_pairs(list(range(8)), dist, None, kinds)
    assert pairs and all(MIXED[i] == MIXED[j] for i, j in pairs)
    # MiniCache's deepest adjacent pairs of one kind: (5, 6), (2, 3) — not (6, 7) nor (4, 5)
    assert pairs_for_rate(0.25, 8, kinds) == [(2, 3), (5, 6)]
    with pytest.raises(ValueError, match="cannot merge"):
        MiniCache(mixed, pairs=[(6, 7)])


def test_sliding_sharers_attend_over_what_their_source_attended_over(mixed):
    """Prompt (12) longer than the window (4): uncached, cached and token-by-token decoding equal a run where
    attention itself is handed the source's K/V (tests/arch_sweep.py's independent substitution)."""
    import arch_sweep

    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    share_map = SharingPolicy.from_pairs(8, {3: 2, 5: 0, 7: 4}).map  # sliding, sliding, full
    want = arch_sweep.reference_logits(mixed, ids, share_map)[0]
    with torch.no_grad(), share_kv(mixed, SharingPolicy(share_map)):
        uncached = mixed(ids, use_cache=False).logits
        out = mixed(ids[:, :8], use_cache=True)
        steps = [out.logits]
        for t in range(8, 12):
            out = mixed(ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    assert (uncached - want).abs().max() < 1e-4
    assert (torch.cat(steps, dim=1) - want).abs().max() < 1e-4
    with torch.no_grad():
        plain = mixed(ids).logits
    assert (uncached - plain).abs().max() > 1e-2  # the sharing changed something: the comparison can fail


def test_a_model_with_latent_attention_is_refused_when_parts_are_found():
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16,
                              q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                              n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=2)
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(config)
    with pytest.raises(UnsupportedArchitecture, match="multi-head latent attention"):
        find_parts(model)


def test_a_static_cache_shares_as_the_dynamic_one(mixed):
    """transformers' StaticCache (fixed buffers, sliding ones of the window's size, what torch.compile needs): the
    sharers' cache layers hold nothing, and decoding through it gives the substitution reference's logits."""
    import arch_sweep
    from transformers import StaticCache

    from kvsharer import cache_nbytes

    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(4))
    share_map = SharingPolicy.from_pairs(8, {3: 2, 7: 4}).map
    want = arch_sweep.reference_logits(mixed, ids, share_map)[0]
    with torch.no_grad(), share_kv(mixed, SharingPolicy(share_map)):
        cache = StaticCache(config=mixed.config, max_cache_len=16)
        out = mixed(ids[:, :8], past_key_values=cache, use_cache=True)
        steps = [out.logits]
        for t in range(8, 12):
            out = mixed(ids[:, t : t + 1], past_key_values=cache, use_cache=True,
                        cache_position=torch.tensor([t]))
            steps.append(out.logits)
    assert (torch.cat(steps, dim=1) - want).abs().max() < 1e-4
    assert cache.layers[3].keys is None and cache.layers[7].keys is None
    plain = StaticCache(config=mixed.config, max_cache_len=16)
    with torch.no_grad():
        mixed(ids[:, :8], past_key_values=plain, use_cache=True)
    # the two sharers' buffers are gone: one sliding (window 4) and one full (16) of the 8 layers
    per_token = plain.layers[0].keys[:, :, :1].numel() * 4 * 2
    assert cache_nbytes(plain) - cache_nbytes(cache) == per_token * (plain.layers[3].keys.shape[-2] + 16)


def test_the_spread_policy_of_the_profile_pairs_within_kinds():
    """The profile's and the benchmarks' spread policy: the same odd-reads-even map as ever on a uniform model,
    and on Gemma 3's 5 sliding : 1 full only pairs of one kind (the local rehearsal's profile job hit this)."""
    from kvsharer.models.layer_kinds import layer_kinds

    uniform = SharingPolicy.spread(8, 0.25, layer_kinds({"num_hidden_layers": 8}))
    assert uniform.map == SharingPolicy.spread(8, 0.25).map == [0, 0, 2, 3, 4, 4, 6, 7]
    kinds = layer_kinds({"num_hidden_layers": 12, "sliding_window": 8,
                         "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 2})
    for rate in (0.125, 0.25, 0.375):
        policy = SharingPolicy.spread(12, rate, kinds)
        assert policy.num_shared == int(rate * 12 + 0.5) and not policy_problems(policy.map, kinds)
    with pytest.raises(PolicyError, match="at most 6 of 12"):  # 5 pairs among the 10 sliding layers, 1 full pair
        SharingPolicy.spread(12, 0.75, kinds)
