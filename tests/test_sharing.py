"""KV sharing on tiny Llama / Mistral / Qwen2 / Qwen3 models: exactness, bytes, mechanism, restore."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, make_tiny
from transformers import AttentionInterface, AttentionMaskInterface, DynamicCache, Phi3Config, Phi3ForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from kvsharer import PolicyError, SharingPolicy, attach, cache_nbytes, detach, expected_kv_nbytes, share_kv
from kvsharer.models.loading import UnsupportedArchitecture
from kvsharer.cache.hooks import attached_methods
from kvsharer.cache.sharing import SharedLayer, SkippedProjection

TWO_OF_EIGHT = {3: 1, 6: 2}  # layers 3 and 6 read layers 1 and 2


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_identity_policy_is_bit_equal(family, tokens, attn):
    model = make_tiny(family, attn=attn)
    plain = model(tokens).logits
    plain_gen = model.generate(tokens, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with share_kv(model, SharingPolicy.identity(8)):
        assert torch.equal(model(tokens).logits, plain)
        assert torch.equal(model(tokens, use_cache=False).logits, plain)
        assert torch.equal(model.generate(tokens, max_new_tokens=6, do_sample=False, pad_token_id=0), plain_gen)


def test_two_of_eight_bytes_and_mechanism(family, tokens):
    model = make_tiny(family)
    policy = SharingPolicy.from_pairs(8, TWO_OF_EIGHT)
    plain_bytes = cache_nbytes(model(tokens, use_cache=True).past_key_values)
    with share_kv(model, policy) as sharing:
        out = model(tokens, use_cache=True)
        cache = out.past_key_values
        # exactly 6/8 of the plain model's bytes, and what the model shape predicts
        assert cache_nbytes(cache) * 8 == plain_bytes * 6
        assert cache_nbytes(cache) == expected_kv_nbytes(model, policy, 2, tokens.shape[1], 4)
        for layer, src in TWO_OF_EIGHT.items():
            assert isinstance(cache.layers[layer], SharedLayer)
            assert cache.layers[layer].keys is None and cache.layers[layer].values is None
            assert cache.layers[layer].source is cache.layers[src]
            with pytest.raises(RuntimeError, match="returned no K/V"):  # nothing of the forward kept after it
                cache.layers[layer].update(None, None)
        # the shared layers' k/v projections are stand-ins that were called, never the real Linear
        projections = sharing.skipped_projections()
        assert len(projections) == 4 and all(isinstance(p, SkippedProjection) and p.calls == 1 for p in projections)


def test_shared_attention_receives_the_source_tensor(tokens):
    model = make_tiny("llama")
    seen: dict[int, int] = {}

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen[module.layer_idx] = (key.data_ptr(), value.data_ptr())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("kvsharer_spy", spy)
    AttentionMaskInterface.register("kvsharer_spy", sdpa_mask)
    model.config._attn_implementation = "kvsharer_spy"
    real_k = {layer: model.model.layers[layer].self_attn.k_proj for layer in TWO_OF_EIGHT}
    calls = []
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in real_k.values()]
    with share_kv(model, SharingPolicy.from_pairs(8, TWO_OF_EIGHT)):
        model(tokens, use_cache=False)
    for h in hooks:
        h.remove()
    for layer, src in TWO_OF_EIGHT.items():
        assert seen[layer] == seen[src]
    assert calls == []  # the real projections of the shared layers never ran


def _reference_sharing_logits(model, tokens, share_map, attention_mask=None):
    """Independent slow implementation: plain model, no cache, attention swaps in the source's K/V.

    (Always SDPA math on the substituted K/V; a custom attention function gets SDPA-style masks.)"""
    stash: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    inner = model.config._attn_implementation

    def substitute(module, query, key, value, mask, **kwargs):
        idx = module.layer_idx
        if share_map[idx] == idx:
            stash[idx] = (key, value)
        else:
            key, value = stash[share_map[idx]]
        return sdpa_attention_forward(module, query, key, value, mask, **kwargs)

    AttentionInterface.register("kvsharer_reference", substitute)
    AttentionMaskInterface.register("kvsharer_reference", sdpa_mask)
    model.config._attn_implementation = "kvsharer_reference"
    try:
        return model(tokens, attention_mask=attention_mask, use_cache=False).logits
    finally:
        model.config._attn_implementation = inner


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_matches_independent_slow_implementation(family, tokens, attn):
    model = make_tiny(family, attn=attn)
    policy = SharingPolicy([0, 1, 2, 1, 4, 4, 2, 0])
    reference = _reference_sharing_logits(model, tokens, policy.map)
    with share_kv(model, policy):
        for use_cache in (True, False):
            torch.testing.assert_close(model(tokens, use_cache=use_cache).logits, reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(model(tokens).logits, reference, atol=1e-3)  # sharing really changed something


def test_padded_batch_matches_reference_and_generates(family):
    model = make_tiny(family)
    tokens = torch.randint(3, VOCAB, (3, 10), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(tokens)
    mask[1, :4] = 0  # left padding
    mask[2, :2] = 0
    tokens = tokens.masked_fill(mask == 0, 0)
    policy = SharingPolicy.from_pairs(8, TWO_OF_EIGHT)
    reference = _reference_sharing_logits(model, tokens, policy.map, attention_mask=mask)
    with share_kv(model, policy):
        got = model(tokens, attention_mask=mask).logits
        torch.testing.assert_close(got[mask.bool()], reference[mask.bool()], rtol=1e-5, atol=1e-5)
        batched = model.generate(tokens, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        # the padded row decodes exactly as it does alone
        alone = model.generate(tokens[1:2, 4:], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(batched[1, -5:], alone[0, -5:])


def test_generate_differs_and_detach_restores_bit_equal(family, tokens):
    model = make_tiny(family)
    before = _state(model)
    plain_logits = model(tokens).logits
    plain_gen = model.generate(tokens, max_new_tokens=8, do_sample=False, pad_token_id=0)
    sharing = attach(model, SharingPolicy([0, 0, 2, 2, 4, 4, 6, 6]))
    shared_gen = model.generate(tokens, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert shared_gen.shape == plain_gen.shape and not torch.equal(shared_gen, plain_gen)
    assert any(isinstance(m, SkippedProjection) for m in model.modules())
    detach(model)
    assert not sharing.attached
    assert not any(isinstance(m, SkippedProjection) for m in model.modules())
    assert not attached_methods(model) and not hasattr(model, "_kvsharer_hooks")
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(model(tokens).logits, plain_logits)
    assert torch.equal(model.generate(tokens, max_new_tokens=8, do_sample=False, pad_token_id=0), plain_gen)


def test_decode_step_by_step_with_passed_cache(tokens):
    """A caller-built DynamicCache is wired in place and grows only for source layers."""
    model = make_tiny("llama")
    policy = SharingPolicy.from_pairs(8, TWO_OF_EIGHT)
    with share_kv(model, policy):
        cache = DynamicCache(config=model.config)
        out = model(tokens, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        out2 = model(nxt, past_key_values=out.past_key_values, use_cache=True)
        full = model(torch.cat([tokens, nxt], 1)).logits
    assert out.past_key_values is cache and cache.get_seq_length() == tokens.shape[1] + 1
    torch.testing.assert_close(out2.logits[:, -1], full[:, -1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "share_map, message",
    [
        ([0, 1, 2], "has 3 entries but LlamaForCausalLM has 8 decoder layers"),
        ([0, 1, 2, 5, 4, 5, 6, 7], "layer 3 points forward to layer 5"),
        ([0, 0, 1, 3, 4, 5, 6, 7], "layer 2 -> 1 is a chain: layer 1 itself shares layer 0"),
        ([0, 1, 2, 3, 4, 5, 6, 9], "map[7]=9 is outside 0..7"),
    ],
)
def test_refused_policies(share_map, message):
    model = make_tiny("llama")
    with pytest.raises(PolicyError, match="invalid sharing map") as err:
        with share_kv(model, SharingPolicy(share_map)):
            pass
    assert message in str(err.value)
    assert not any(isinstance(m, SkippedProjection) for m in model.modules())


def test_fused_qkv_model_is_refused_with_what_is_missing(monkeypatch):
    from kvsharer.models.fused_qkv import FUSED_QKV_ADAPTERS

    monkeypatch.delitem(FUSED_QKV_ADAPTERS, "Phi3ForCausalLM")  # a fused-QKV architecture without an adapter
    config = Phi3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
    )
    model = Phi3ForCausalLM(config).eval()
    with pytest.raises(UnsupportedArchitecture, match="fused projection 'qkv_proj'.*no adapter is registered for Phi3ForCausalLM"):
        attach(model, SharingPolicy.identity(4))


def test_sliding_and_full_layers_cannot_share():
    model = make_tiny("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=4,
                      layer_types=["full_attention"] * 4 + ["sliding_attention"] * 4)
    # refused when attached, before any forward, naming both layers and their kinds
    with pytest.raises(PolicyError, match=r"layer 5 \(sliding attention \(window 4\)\) cannot read layer 2 \(full attention\)"):
        share_kv(model, SharingPolicy.from_pairs(8, {5: 2})).attach()
    assert attached_methods(model) == []


def test_policy_json_roundtrip(tmp_path):
    policy = SharingPolicy([0, 1, 1, 3, 0], {"rate": 0.4, "trace": [{"pair": [2, 1]}]})
    path = tmp_path / "p.json"
    policy.to_json(path)
    again = SharingPolicy.from_json(path)
    assert again == policy and again.meta["trace"] == [{"pair": [2, 1]}]
    assert again.shared_layers == [2, 4] and again.rate == 0.4
    assert SharingPolicy.from_json(policy.to_json()) == policy
    with pytest.raises(PolicyError, match="does not exist"):
        SharingPolicy.from_json(tmp_path / "missing.json")
