"""Token-level compression (H2O, PyramidInfer, KVMerger) alone and composed with KV sharing, on tiny models."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import VOCAB, make_tiny
from transformers import AttentionInterface, DynamicCache

from kvsharer import SharingPolicy, cache_nbytes, share_kv
from kvsharer.methods.intra import (
    ATTENTION_NAME, H2O, METHODS, Budget, CompressedLayer, KVMerger, PyramidInfer, TokenMethod, compress_kv, make_method,
)
from kvsharer.methods.intra import attention, blockwise
from kvsharer.methods.intra.attention import scoring_attention_forward
from kvsharer.methods.intra.blockwise import AttentionScores, blockwise_scoring_attention
from kvsharer.models.loading import kv_shape
from kvsharer.cache.hooks import attached_methods
from kvsharer.cache.sharing import SharedLayer
from masked_reference import reference_new_logits
from scoring_reference import reference_forward, reference_scores, reference_scoring_attention

REPO = Path(__file__).resolve().parents[1]
TWO_OF_EIGHT = {3: 1, 6: 2}
POLICIES = {"alone": None, "shared": TWO_OF_EIGHT}
GEN = dict(do_sample=False, pad_token_id=0)


def _policy(name):
    return None if POLICIES[name] is None else SharingPolicy.from_pairs(8, POLICIES[name])


def _check_cache(model, cache, seen, policy):
    """Every storing layer holds exactly its budget (or everything when shorter); sharers hold nothing."""
    n_layers, kv_heads, head_dim = kv_shape(model)
    share_map = policy.map if policy else list(range(n_layers))
    expected_bytes = 0
    assert cache.get_seq_length() == seen
    for idx, layer in enumerate(cache.layers):
        if share_map[idx] != idx:
            assert isinstance(layer, SharedLayer) and layer.keys is None and layer.values is None
            assert layer.source is cache.layers[share_map[idx]]
            continue
        assert isinstance(layer, CompressedLayer) and layer.seen == seen
        budget = layer.method.keep_for(layer.rank, layer.n_stored, seen)
        assert layer.budget() == budget <= seen
        batch = layer.keys.shape[0]
        assert layer.keys.shape == layer.values.shape == (batch, kv_heads, budget, head_dim)
        lead = (batch, kv_heads) if layer.method.per_head else (batch,)  # per-head methods: a keep-set per KV head
        assert layer.positions.shape == layer.valid.shape == (*lead, budget)
        assert (layer.positions.diff(dim=-1) > 0).all() and (layer.positions < seen).all()
        expected_bytes += 2 * batch * kv_heads * budget * head_dim * layer.keys.element_size()
    assert cache_nbytes(cache) == expected_bytes
    return expected_bytes


# ---------------------------------------------------------------------------------------------
# the matrix: method x family x (alone | with sharing)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sharing", sorted(POLICIES))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_cache_really_shrinks_prefill_decode_and_padded_batch(family, method, sharing):
    model = make_tiny(family)
    policy = _policy(sharing)
    tokens = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    plain_bytes = cache_nbytes(model(tokens).past_key_values)
    n_layers, kv_heads, head_dim = kv_shape(model)
    with compress_kv(model, make_method(method, 0.5), policy=policy):
        cache = model(tokens).past_key_values
        got = _check_cache(model, cache, 16, policy)
        # 50 % of the tokens in each storing layer (PyramidInfer: 50 % on average over them)
        stored_layers = n_layers - (policy.num_shared if policy else 0)
        half = plain_bytes * stored_layers * 8 / (n_layers * 16)
        one_token_per_layer = stored_layers * 2 * 2 * kv_heads * head_dim * 4
        assert abs(got - half) <= (one_token_per_layer if method == "pyramidinfer" else 0)  # rounding per layer
        out = model.generate(tokens, max_new_tokens=5, return_dict_in_generate=True, **GEN)
        assert out.sequences.shape == (2, 21)
        _check_cache(model, out.past_key_values, 16 + 4, policy)  # the 5th token is never fed back

        # batched greedy generation with left padding
        mask = torch.ones(3, 12, dtype=torch.long)
        mask[1, :4] = 0
        mask[2, :7] = 0
        padded = torch.randint(3, VOCAB, (3, 12), generator=torch.Generator().manual_seed(5)).masked_fill(mask == 0, 0)
        out = model.generate(padded, attention_mask=mask, max_new_tokens=4, return_dict_in_generate=True, **GEN)
        assert out.sequences.shape == (3, 16)
        cache = out.past_key_values
        _check_cache(model, cache, 12 + 3, policy)
        for layer in cache.layers:
            if isinstance(layer, CompressedLayer):
                # rows with enough real tokens dropped their padding first
                assert layer.valid[0].all() and layer.valid[1].all()
                assert (layer.valid[2].sum(-1) == min(layer.budget(), 5 + 3)).all()  # (per KV head: each)


@pytest.mark.parametrize("sharing", sorted(POLICIES))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_budget_everything_equals_uncompressed(family, method, sharing):
    """Fraction 1.0 keeps every token: same logits (eager fp32 vs SDPA, within 1e-5) and greedy tokens."""
    model = make_tiny(family)
    policy = _policy(sharing)
    tokens = torch.randint(3, VOCAB, (3, 10), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(tokens)
    mask[1, :4] = 0
    tokens = tokens.masked_fill(mask == 0, 0)
    ref_ctx = share_kv(model, policy) if policy else _nothing()
    with ref_ctx:
        ref = model(tokens, attention_mask=mask).logits
        ref_gen = model.generate(tokens, attention_mask=mask, max_new_tokens=4, **GEN)
    with compress_kv(model, make_method(method, 1.0), policy=policy):
        got = model(tokens, attention_mask=mask).logits
        got_gen = model.generate(tokens, attention_mask=mask, max_new_tokens=4, **GEN)
        no_cache = model(tokens, attention_mask=mask, use_cache=False).logits
    valid = mask.bool()
    torch.testing.assert_close(got[valid], ref[valid], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(no_cache[valid], ref[valid], rtol=1e-5, atol=1e-5)
    assert torch.equal(got_gen, ref_gen)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------------------------------------
# positions and masks after eviction
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sharing", sorted(POLICIES))
@pytest.mark.parametrize("method", ["h2o", "pyramidinfer", "streamingllm"])
def test_decoding_after_eviction_matches_masked_reference(family, method, sharing):
    """After eviction new tokens get positions T, T+1, ... (tokens seen) and attend exactly to the kept
    tokens: one decoding step (the model passes no mask) and a 3-token chunk (a materialized mask)."""
    model = make_tiny(family)
    policy = _policy(sharing)
    share_map = policy.map if policy else list(range(8))
    full = torch.randint(3, VOCAB, (2, 15), generator=torch.Generator().manual_seed(7))
    for n_new in (1, 3):
        prompt = 15 - n_new
        with compress_kv(model, make_method(method, 0.4), policy=policy):
            cache = model(full[:, :prompt]).past_key_values
            kept = {i: layer.positions.clone() for i, layer in enumerate(cache.layers) if isinstance(layer, CompressedLayer)}
            assert all(k.shape[-1] < prompt for k in kept.values())
            got = model(full[:, prompt:], past_key_values=cache).logits
            assert cache.get_seq_length() == 15
        with share_kv(model, policy) if policy else _nothing():
            ref = reference_new_logits(model, full, kept, share_map, n_new)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        # and eviction really changed the prediction inputs: the unmasked model differs
        assert not torch.allclose(model(full).logits[:, prompt:], ref, atol=1e-4)


def test_generation_positions_keep_counting_after_eviction():
    model = make_tiny("llama")
    seen_positions = []
    hook = model.model.rotary_emb.register_forward_hook(
        lambda mod, args, kwargs, out: seen_positions.append(kwargs["position_ids"][0].tolist()), with_kwargs=True
    )
    tokens = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with compress_kv(model, H2O(4), policy=SharingPolicy.from_pairs(8, TWO_OF_EIGHT)):
        out = model.generate(tokens, max_new_tokens=6, return_dict_in_generate=True, **GEN)
    hook.remove()
    assert seen_positions[0] == list(range(12))
    assert [p[0] for p in seen_positions[1:]] == [12, 13, 14, 15, 16]  # tokens seen, not the 4 stored
    cache = out.past_key_values
    assert cache.get_seq_length() == 12 + 5
    assert cache.layers[0].keys.shape[-2] == 4 and cache.layers[3].keys is None


def test_reordered_and_selected_rows_decode_as_a_cache_built_in_that_order():
    """generate's batch operations (beam search) on an evicting cache: every per-row tensor (K/V, positions, valid,
    the method's scores) moves with its row, so a reordered cache decodes as one prefilled in that order."""
    model = make_tiny("llama")
    tokens = torch.randint(3, VOCAB, (3, 12), generator=torch.Generator().manual_seed(5))
    perm, step = torch.tensor([2, 0, 2]), torch.randint(3, VOCAB, (3, 1), generator=torch.Generator().manual_seed(6))
    with compress_kv(model, H2O(4), policy=SharingPolicy.from_pairs(8, TWO_OF_EIGHT)), torch.no_grad():
        cache, twin = DynamicCache(config=model.config), DynamicCache(config=model.config)
        model(tokens, past_key_values=cache, use_cache=True)
        model(tokens[perm], past_key_values=twin, use_cache=True)
        cache.reorder_cache(perm)
        moved, built = (model(step, past_key_values=c, use_cache=True).logits for c in (cache, twin))
        assert torch.allclose(moved, built, atol=1e-6)
        cache.batch_select_indices(torch.tensor([1]))
        twin.batch_select_indices(torch.tensor([1]))
        cache.batch_repeat_interleave(2)
        twin.batch_repeat_interleave(2)
        moved, built = (model(step[:2], past_key_values=c, use_cache=True).logits for c in (cache, twin))
    assert torch.allclose(moved, built, atol=1e-6)
    assert torch.equal(cache.layers[0].positions, twin.layers[0].positions)


def test_padded_row_decodes_as_it_does_alone_with_token_budgets(family):
    """Integer budgets: padding is evicted (or merged with weight 0) first, so a padded row equals itself alone."""
    model = make_tiny(family)
    tokens = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(9))
    mask = torch.ones_like(tokens)
    mask[1, :4] = 0
    tokens = tokens.masked_fill(mask == 0, 0)
    for method in sorted(METHODS):
        with compress_kv(model, make_method(method, 5), policy=SharingPolicy.from_pairs(8, TWO_OF_EIGHT)):
            both = model.generate(tokens, attention_mask=mask, max_new_tokens=5, output_logits=True,
                                  return_dict_in_generate=True, **GEN)
            alone = model.generate(tokens[1:, 4:], max_new_tokens=5, output_logits=True,
                                   return_dict_in_generate=True, **GEN)
        for step_both, step_alone in zip(both.logits, alone.logits):
            torch.testing.assert_close(step_both[1], step_alone[0], rtol=1e-4, atol=1e-4)
        assert torch.equal(both.sequences[1, -5:], alone.sequences[0, -5:])


# ---------------------------------------------------------------------------------------------
# group scoring, method mechanics
# ---------------------------------------------------------------------------------------------


def test_group_is_scored_by_every_layer_that_reads_it(tokens):
    """With sharing, a source's scores are the sum of its own and its sharers' attention (eager's weights)."""
    model = make_tiny("llama")
    policy = SharingPolicy.from_pairs(8, TWO_OF_EIGHT)
    with compress_kv(model, H2O(1.0), policy=policy):
        cache = model(tokens).past_key_values
    with share_kv(model, policy):
        model.config._attn_implementation = "eager"  # returns its [B, H, q, S] weights
        try:
            weights = model(tokens, output_attentions=True)
        finally:
            model.config._attn_implementation = "sdpa"
    received = [w.float().sum(dim=(1, 2)) for w in weights.attentions]  # [B, T] per layer
    for src, members in policy.groups().items():
        expected = sum(received[m] for m in members)
        torch.testing.assert_close(cache.layers[src].state["score"], expected, rtol=1e-5, atol=1e-5)
        assert cache.layers[src].group == members
    # each query row sums to 1 over tokens: a group of g layers hands out g * T * heads of attention
    heads = model.config.num_attention_heads
    assert torch.allclose(cache.layers[1].state["score"].sum(-1), torch.full((2,), 2.0 * 12 * heads), rtol=1e-5)


def _layer(keys, values=None, score=None, valid=None, method=None):
    batch, heads, length, dim = keys.shape
    layer = CompressedLayer(method or H2O(1.0), 0, [0], 0, 1)
    layer.update(keys, keys.clone() if values is None else values)
    layer.valid = torch.ones(batch, length, dtype=torch.bool) if valid is None else valid
    layer.state["score"] = torch.zeros(batch, length) if score is None else score
    return layer


def test_h2o_keeps_heavy_hitters_and_recent_window():
    keys = torch.randn(1, 2, 10, 4)
    score = torch.tensor([[9.0, 0.1, 7.0, 0.2, 0.3, 8.0, 0.0, 0.0, 0.0, 0.0]])
    layer = _layer(keys, score=score)
    H2O(6).compress(layer, 6)  # 3 recent (7, 8, 9) + 3 heavy (0, 5, 2)
    assert layer.positions.tolist() == [[0, 2, 5, 7, 8, 9]]
    assert torch.equal(layer.keys, keys[:, :, [0, 2, 5, 7, 8, 9]])
    assert layer.state["score"].tolist() == [[9.0, 7.0, 8.0, 0.0, 0.0, 0.0]]


def test_kvmerger_merges_most_similar_adjacent_keys_with_gaussian_weights():
    base = torch.randn(1, 1, 6, 8, generator=torch.Generator().manual_seed(3))
    keys = base.clone()
    keys[:, :, 2] = base[:, :, 1] + 0.01 * base[:, :, 4]  # 1 and 2 nearly identical: the most similar pair
    values = torch.randn(1, 1, 6, 8)
    score = torch.tensor([[0.0, 1.0, 5.0, 0.0, 0.0, 0.0]])  # pivot of {1, 2} is 2
    layer = _layer(keys, values, score, method=KVMerger(5, recent_ratio=0.0))
    layer.method.compress(layer, 5)
    assert layer.keys.shape[-2] == 5
    assert layer.positions.tolist() == [[0, 2, 3, 4, 5]]  # the merged token sits at the pivot's position
    w_other = math.exp(-0.5)  # sigma^2 = the partner's squared distance -> weight e^(-1/2)
    expected_k = (keys[:, :, 2] + w_other * keys[:, :, 1]) / (1 + w_other)
    expected_v = (values[:, :, 2] + w_other * values[:, :, 1]) / (1 + w_other)
    torch.testing.assert_close(layer.keys[:, :, 1], expected_k)
    torch.testing.assert_close(layer.values[:, :, 1], expected_v)
    assert torch.equal(layer.keys[:, :, [0, 2, 3, 4]], keys[:, :, [0, 3, 4, 5]])
    assert layer.state["score"].tolist() == [[0.0, 6.0, 0.0, 0.0, 0.0]]  # merged score = sum of members


def test_kvmerger_threshold_falls_back_to_eviction_and_padding_merges_away():
    keys = torch.randn(2, 2, 8, 4, generator=torch.Generator().manual_seed(4))
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[1, :3] = False  # row 1: three padding tokens
    layer = _layer(keys, score=torch.rand(2, 8), valid=valid, method=KVMerger(4, recent_ratio=0.25, threshold=1.0))
    layer.method.compress(layer, 4)  # no real pair reaches cosine 1.0: row 0 evicts, row 1 drops padding first
    assert layer.keys.shape == (2, 2, 4, 4) and layer.valid.all()
    assert layer.positions[:, -1].tolist() == [7, 7]  # recent window kept
    # row 0 merged nothing: its kept keys are original keys; row 1's padding merged into token 3 with weight 0
    assert torch.equal(layer.keys[0], keys[0][:, layer.positions[0]])
    assert torch.equal(layer.keys[1], keys[1][:, layer.positions[1]])


def test_pyramidinfer_budgets_decrease_with_depth_and_average_to_the_budget():
    method = PyramidInfer(0.5, spread=0.5)
    budgets = [method.keep_for(rank, 8, 400) for rank in range(8)]
    assert budgets == sorted(budgets, reverse=True) and budgets[0] == 300 and budgets[-1] == 100
    assert sum(budgets) / 8 == pytest.approx(200, abs=1)
    assert [PyramidInfer(1.0).keep_for(r, 8, 50) for r in range(8)] == [50] * 8  # f = 1 keeps everything
    assert [PyramidInfer(0.8, spread=0.5).keep_for(r, 2, 100) for r in range(2)] == [100, 60]  # spread capped


# ---------------------------------------------------------------------------------------------
# attach / detach, config isolation, errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sharing", sorted(POLICIES))
def test_detach_restores_bit_equal_and_config_is_not_shared(family, tokens, sharing):
    model = make_tiny(family)
    twin = type(model)(model.config).eval()  # another model built from the SAME config object
    config = model.config
    plain = model(tokens).logits
    plain_gen = model.generate(tokens, max_new_tokens=6, **GEN)
    twin_logits = twin(tokens).logits
    with compress_kv(model, make_method("kvmerger", 0.5), policy=_policy(sharing)):
        assert model.config is not config and model.config._attn_implementation == ATTENTION_NAME
        assert config._attn_implementation == "sdpa" and twin.config._attn_implementation == "sdpa"
        assert torch.equal(twin(tokens).logits, twin_logits)
        compressed_gen = model.generate(tokens, max_new_tokens=6, **GEN)
    assert compressed_gen.shape == plain_gen.shape
    assert model.config is config and all(m.config is config for m in model.modules() if hasattr(m, "config"))
    assert not attached_methods(model) and not hasattr(model, "_kvsharer_hooks")
    assert not any(hasattr(m, "_kvsharer_intra") for m in model.modules())
    assert not model.model._forward_pre_hooks and not model.model._forward_hooks
    assert torch.equal(model(tokens).logits, plain)
    assert torch.equal(model.generate(tokens, max_new_tokens=6, **GEN), plain_gen)


def test_nesting_with_share_kv_in_either_order_is_the_same(tokens):
    model = make_tiny("qwen2")
    policy = SharingPolicy.from_pairs(8, TWO_OF_EIGHT)
    with share_kv(model, policy), compress_kv(model, H2O(0.5)):
        a = model.generate(tokens, max_new_tokens=5, **GEN)
    with compress_kv(model, H2O(0.5)), share_kv(model, policy):
        b = model.generate(tokens, max_new_tokens=5, **GEN)
    with compress_kv(model, H2O(0.5), policy=policy):
        c = model.generate(tokens, max_new_tokens=5, **GEN)
    assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize(
    "budget, message",
    [(0.0, "outside \\(0, 1\\]"), (1.5, "outside \\(0, 1\\]"), (float("nan"), "outside"), (0, "at least 1 token"),
     (-3, "at least 1 token"), (True, "fraction kept"), ("half", "fraction kept")],
)
def test_bad_budgets_are_refused(budget, message):
    with pytest.raises(ValueError, match=message):
        make_method("h2o", budget)


def test_bad_methods_and_options_are_refused(tokens):
    with pytest.raises(ValueError, match="unknown token-level method 'tova'; known: h2o, pyramidinfer, kvmerger, "
                                         "streamingllm, snapkv"):
        make_method("tova", 0.5)
    with pytest.raises(ValueError, match="recent_ratio"):
        H2O(0.5, recent_ratio=1.5)
    with pytest.raises(ValueError, match="window"):
        PyramidInfer(0.5, window=0)
    with pytest.raises(ValueError, match="threshold"):
        KVMerger(0.5, threshold=2.0)
    assert Budget.parse(3).keep(10) == 3 and Budget.parse(0.25).keep(10) == 3 and Budget.parse(0.01).keep(10) == 1
    model = make_tiny("llama")
    with pytest.raises(TypeError, match="kvsharer.intra method"):
        with compress_kv(model, "h2o"):
            pass
    with compress_kv(model, H2O(0.5)):
        with pytest.raises(RuntimeError, match="already has a token-level method"):
            with compress_kv(model, H2O(0.5)):
                pass
        used = DynamicCache(config=model.config)
        used.update(torch.zeros(2, 2, 3, 16), torch.zeros(2, 2, 3, 16), 0)
        with pytest.raises(ValueError, match="already holds tokens"):
            model(tokens, past_key_values=used)
        with pytest.raises(NotImplementedError, match="cannot be cropped"):
            model(tokens).past_key_values.crop(-1)
    assert model.config._attn_implementation == "sdpa"


# ---------------------------------------------------------------------------------------------
# benchmark smoke test
# ---------------------------------------------------------------------------------------------


def test_compose_benchmark_smoke(tiny_model_dir, tmp_path):
    """Toy size, on the 8-layer tiny Llama folder saved with ``save_tiny_model`` (no timing asserted)."""
    out = tmp_path / "compose.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "compose.py"), "--model", str(tiny_model_dir), "--batch", "2",
         "--prompt-tokens", "24", "--new-tokens", "4", "--repeats", "1", "--out", str(out)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    arms = result["arms"]
    assert list(arms) == ["plain", "sharing", "h2o", "both"]
    seen = 24 + 4 - 1
    assert arms["plain"]["kv_bytes"] == 2 * 8 * 2 * 2 * seen * 16 * 4
    assert arms["sharing"]["kv_bytes_ratio"] == pytest.approx(0.75)  # round(0.25 * 8) = 2 of 8 layers share
    kept = math.floor(0.5 * seen + 0.5)
    assert arms["h2o"]["kv_bytes_ratio"] == pytest.approx(kept / seen)
    assert arms["both"]["kv_bytes_ratio"] == pytest.approx(0.75 * kept / seen)
    assert all(arm["decode_tokens_per_s"] > 0 for arm in arms.values())
    assert "both" in proc.stdout and "ratio" in proc.stdout


# ---------------------------------------------------------------------------------------------
# blockwise scoring attention == the full-matrix reference (tests/scoring_reference.py)
# ---------------------------------------------------------------------------------------------


class _Recorder(TokenMethod):
    """Keeps everything (budget 1.0) and records what each attention call handed to ``observe``."""

    name = "recorder"

    def __init__(self, recent_queries: int):
        super().__init__(1.0)
        self.recent_queries = recent_queries
        self.seen: list[AttentionScores] = []

    def observe(self, layer, scores, first):
        self.seen.append(scores)


class _Attention(torch.nn.Module):
    """What the attention function reads of an attention module: its index, causality, the compression."""

    def __init__(self, layer=None, is_causal=True):
        super().__init__()
        self.layer_idx, self.is_causal = 0, is_causal
        if layer is not None:
            self._kvsharer_intra = SimpleNamespace(current_cache=SimpleNamespace(layers=[layer]))


def _padded_causal(batch_pad: list[int], q_len: int, seen: int) -> torch.Tensor:
    """Position-coordinate bool mask [B, 1, q, seen]: causal (queries are the last q positions), row b's
    first ``batch_pad[b]`` positions are padding (a padding query sees nothing, as in sdpa_mask)."""
    q_pos = torch.arange(seen - q_len, seen)
    causal = torch.arange(seen)[None, :] <= q_pos[:, None]  # [q, seen]
    real = torch.stack([torch.arange(seen) >= p for p in batch_pad])  # [B, seen]
    return (causal[None] & real[:, None, :] & real[:, q_pos][:, :, None])[:, None]


def _attention_case(case: str, heads: int, kv_heads: int, recent: int):
    """(module, query, key, value, mask) for one situation the attention function meets."""
    g = torch.Generator().manual_seed(11)
    batch, dim = 2, 8

    def qkv(q_len, stored):
        return (torch.randn(batch, heads, q_len, dim, generator=g), torch.randn(batch, kv_heads, stored, dim, generator=g),
                torch.randn(batch, kv_heads, stored, dim, generator=g))

    if case in ("prefill", "decode", "noncausal"):  # no compressed cache: keys as given, mask None
        q, k, v = qkv(13 if case != "decode" else 1, 13)
        return _Attention(is_causal=case != "noncausal"), q, k, v, None
    if case in ("padded_bool_mask", "padded_float_mask"):  # no compressed cache, the model's padded mask
        q, k, v = qkv(13, 13)
        mask = _padded_causal([0, 5], 13, 13)
        if case == "padded_float_mask":
            mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
        return _Attention(), q, k, v, mask
    # a compressed cache: prefill from empty, or new queries after an eviction kept 6 of 11 positions
    layer = CompressedLayer(_Recorder(recent), 0, [0], 0, 1)
    if case in ("compressed_prefill", "compressed_prefill_padded"):
        q, k, v = qkv(13, 13)
        layer.update(k, v)
        mask = _padded_causal([0, 5], 13, 13) if case == "compressed_prefill_padded" else None
        return _Attention(layer), q, layer.keys, layer.values, mask
    old_k, old_v = torch.randn(batch, kv_heads, 11, dim, generator=g), torch.randn(batch, kv_heads, 11, dim, generator=g)
    layer.update(old_k, old_v)
    layer.valid = torch.ones(batch, 11, dtype=torch.bool)
    layer.select(torch.tensor([[0, 2, 3, 7, 8, 10], [1, 4, 5, 6, 9, 10]]))  # per-row keep-sets
    q_len = 1 if case == "evicted_decode" else 4
    q, k, v = qkv(q_len, q_len)
    layer.update(k, v)  # stored 6 + q of seen 11 + q
    mask = None if case == "evicted_decode" else _padded_causal([0, 3], q_len, 11 + q_len)
    return _Attention(layer), q, layer.keys, layer.values, mask


PADDED_QUERIES = ["padded_bool_mask", "padded_float_mask", "compressed_prefill_padded"]
CASES = ["prefill", "decode", "noncausal", *PADDED_QUERIES, "compressed_prefill", "evicted_decode", "evicted_chunk_padded"]


@pytest.mark.parametrize("block", [1, 2, 3, 5, 64])
@pytest.mark.parametrize("case", CASES)
def test_blockwise_attention_equals_the_full_matrix_reference(case, block, monkeypatch):
    """Output, attention received per key and the recent rows equal the full-matrix version's (GQA, causal,
    padding, float masks, a compressed cache after eviction; blocks that do and do not divide q)."""
    heads, kv_heads, recent = 6, 2, 3
    module, q, k, v, mask = _attention_case(case, heads, kv_heads, recent)
    ref_out, weights, ref_valid = reference_scoring_attention(module, q, k, v, mask)
    batch, stored = k.shape[0], k.shape[2]
    monkeypatch.setattr(blockwise, "BLOCK_BYTES", 4 * batch * heads * stored * block)  # -> `block` queries
    assert blockwise.query_block(batch, heads, stored) == block
    out, returned = scoring_attention_forward(module, q, k, v, mask)
    assert returned is None and out.shape == (batch, q.shape[2], heads, q.shape[3])
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    ref = reference_scores(weights, recent)
    if not hasattr(module, "_kvsharer_intra"):  # the kernel itself, with the same block and mask
        visible = attention._plain_mask(module, mask, q.shape[2], stored, q.device)
        out, got = blockwise_scoring_attention(q, k, v, visible, q.shape[3] ** -0.5, None, recent, block=block)
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    else:
        layer = module._kvsharer_intra.current_cache.layers[0]
        (got,) = layer.method.seen
        assert torch.equal(layer.valid[:, -q.shape[2]:], ref_valid)  # padding queries recorded as such
    assert got.recent.shape == ref.recent.shape == (batch, min(recent, q.shape[2]), stored)
    torch.testing.assert_close(got.received, ref.received, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.recent, ref.recent, rtol=1e-5, atol=1e-6)
    if case in PADDED_QUERIES:  # row 1's 5 padding queries hand out nothing: each real query hands out 1 per head
        torch.testing.assert_close(got.received.sum(-1), torch.tensor([13.0 * heads, 8.0 * heads]))


@pytest.mark.parametrize("block_bytes", [1, 2000])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_compressed_generation_equals_the_full_matrix_reference(method, block_bytes, monkeypatch):
    """A padded batch generated with sharing and each method: same logits, kept positions and scores
    whether the model runs the full-matrix reference or the blockwise attention (1 or a few queries a block)."""
    model = make_tiny("qwen2")
    policy = SharingPolicy.from_pairs(8, TWO_OF_EIGHT)
    tokens = torch.randint(3, VOCAB, (3, 14), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(tokens)
    mask[1, :5] = 0
    tokens = tokens.masked_fill(mask == 0, 0)

    def run():
        with compress_kv(model, make_method(method, 0.5), policy=policy):
            out = model.generate(tokens, attention_mask=mask, max_new_tokens=4, output_logits=True,
                                 return_dict_in_generate=True, **GEN)
        layers = [layer for layer in out.past_key_values.layers if isinstance(layer, CompressedLayer)]
        return out, layers

    AttentionInterface.register(ATTENTION_NAME, reference_forward)
    try:
        ref, ref_layers = run()
    finally:
        AttentionInterface.register(ATTENTION_NAME, scoring_attention_forward)
    monkeypatch.setattr(blockwise, "BLOCK_BYTES", block_bytes)
    got, got_layers = run()
    assert torch.equal(got.sequences, ref.sequences)
    for step_got, step_ref in zip(got.logits, ref.logits):
        torch.testing.assert_close(step_got, step_ref, rtol=1e-5, atol=1e-5)
    assert len(got_layers) == len(ref_layers) == 6
    for a, b in zip(got_layers, ref_layers):
        assert torch.equal(a.positions, b.positions) and torch.equal(a.valid, b.valid)
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-5, atol=1e-6)
        assert a.state.keys() == b.state.keys()
        for name in a.state:
            torch.testing.assert_close(a.state[name], b.state[name], rtol=1e-5, atol=1e-5)


def test_scoring_attention_benchmark_smoke(tmp_path):
    """Toy size (no timing asserted): the JSON holds both arms per length, their ratios and their agreement."""
    out = tmp_path / "scoring_attention.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "scoring_attention.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["shape"]["heads"] > result["shape"]["kv_heads"] >= 1
    assert [p["tokens"] for p in result["points"]] == result["shape"]["tokens"]
    for point in result["points"]:
        assert set(point) >= {"tokens", "reference", "blockwise", "time_ratio", "peak_ratio", "max_abs_diff"}
        for arm in ("reference", "blockwise"):
            assert point[arm]["seconds"] > 0 and point[arm]["peak_bytes"] >= 0
            assert point[arm]["peak_method"] in ("cuda_allocator", "rss_hwm", "rss_sampled")
        assert point["time_ratio"] == pytest.approx(point["blockwise"]["seconds"] / point["reference"]["seconds"])
        assert point["max_abs_diff"] < 1e-4
    assert "ratio" in proc.stdout
