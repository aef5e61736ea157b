"""KV-cache quantization (kvsharer.methods.quant) alone and composed with KV sharing, on tiny models."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, make_tiny
from transformers import DynamicCache

from kvsharer import SharingPolicy, cache_nbytes, expected_kv_nbytes, quantize_kv, share_kv
from kvsharer.methods.intra import compress_kv, make_method
from kvsharer.methods.quant import (
    KVQuantization, QuantizedKVLayer, dequantize, expected_quant_nbytes, pack, quantize, unpack,
)
from kvsharer.cache.hooks import attached_methods
from kvsharer.cache.sharing import KVSharing, ReturnedKV, SharedLayer

POLICY = [0, 1, 2, 1, 4, 5, 6, 5]  # layers 3 and 7 read layers 1 and 5
GEN = dict(do_sample=False, pad_token_id=0)


def _tokens(batch, length, seed=2):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


class RecordingCache(DynamicCache):
    """A DynamicCache that remembers, per layer, the K/V it was given and what it returned."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen: dict[int, tuple[torch.Tensor, ...]] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        self.seen[layer_idx] = (key_states, value_states, keys, values)
        return keys, values


# ---------------------------------------------------------------------------------------------
# the quantizer itself
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantizer_packs_codes_and_reconstructs_within_half_a_step(bits, dtype):
    x = (torch.randn(2, 3, 7, 16, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    x[0, 0, 0, :8] = 1.5  # a constant group: scale 0, reconstructed exactly
    q = quantize(x, bits, 8)
    assert q.codes.dtype == torch.uint8 and q.codes.shape == (2, 3, 7, 16 * bits // 8)
    assert q.scale.dtype == q.zero.dtype == dtype and q.scale.shape == q.zero.shape == (2, 3, 7, 2)
    assert q.nbytes() == 2 * 3 * 7 * (16 * bits // 8 + 2 * 2 * x.element_size())
    exact = dequantize(q, bits, 8, torch.float32)
    err = (exact - x.float()).abs().reshape(2, 3, 7, 2, 8)
    half_step = q.scale.float()[..., None] / 2
    assert (err <= half_step * (1 + 1e-5)).all()  # scale/zero rounded outwards: codes cover every group
    assert err[0, 0, 0, 0].max() == 0 and q.scale[0, 0, 0, 0] == 0
    assert dequantize(q, bits, 8, dtype).dtype == dtype
    # packing is lossless and really uses 8/bits codes per byte
    codes = torch.randint(0, 2**bits, (4, 16), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    assert pack(codes, bits).shape == (4, 16 * bits // 8)
    assert torch.equal(unpack(pack(codes, bits), bits), codes)


def test_quantization_is_token_local_so_batch_ops_are_exact():
    """Reordering / selecting / cropping the stored codes equals quantizing the rearranged tokens."""
    g = torch.Generator().manual_seed(4)
    k, v = torch.randn(3, 2, 10, 16, generator=g), torch.randn(3, 2, 10, 16, generator=g)
    layer = QuantizedKVLayer(4, 8, 3, layer_idx=0)
    layer.update(k, v)
    assert layer.quantized_tokens == 7 and layer.keys.shape == (3, 2, 3, 16)
    assert torch.equal(layer.keys, k[:, :, 7:]) and torch.equal(layer.qkeys.codes, quantize(k[:, :, :7], 4, 8).codes)
    perm = torch.tensor([2, 0, 1])
    layer.reorder_cache(perm)
    twin = QuantizedKVLayer(4, 8, 3, layer_idx=0)
    twin.update(k[perm], v[perm])
    new = torch.randn(3, 2, 1, 16, generator=g)
    assert all(torch.equal(a, b) for a, b in zip(layer.update(new, new), twin.update(new, new)))
    layer.batch_select_indices(torch.tensor([0, 2]))
    twin.batch_select_indices(torch.tensor([0, 2]))
    assert layer.stored_nbytes() == twin.stored_nbytes() and layer.get_seq_length() == 11
    # crop 4 tokens (3 from the window, 1 from the store) then re-feed them: the same state again
    before = [t.clone() for t in (*layer.qkeys, *layer.qvalues, layer.keys, layer.values)]
    tail_k = torch.cat([k[perm][[0, 2]], new[[0, 2]]], dim=-2)[:, :, -4:]
    tail_v = torch.cat([v[perm][[0, 2]], new[[0, 2]]], dim=-2)[:, :, -4:]
    layer.crop(-4)
    assert layer.get_seq_length() == 7 and layer.quantized_tokens == 7 and layer.keys.shape[-2] == 0
    layer.update(tail_k, tail_v)
    after = (*layer.qkeys, *layer.qvalues, layer.keys, layer.values)
    assert all(torch.equal(a, b) for a, b in zip(before, after))


# ---------------------------------------------------------------------------------------------
# on models
# ---------------------------------------------------------------------------------------------


def _run(model, prompt, steps):
    """Prefill + teacher-forced decode steps: (prefill logits, decode logits, cache)."""
    out = model(prompt, use_cache=True)
    prefill, cache, logits = out.logits, out.past_key_values, []
    for i in range(steps.shape[1]):
        logits.append(model(steps[:, i : i + 1], past_key_values=cache, use_cache=True).logits)
    return prefill, torch.cat(logits, dim=1), cache


def test_error_grows_as_bits_shrink(family):
    model = make_tiny(family)
    prompt, steps = _tokens(2, 24), _tokens(2, 4, seed=3)
    ref_prefill, ref, _ = _run(model, prompt, steps)
    errors = {}
    for bits in (8, 4, 2):
        with quantize_kv(model, bits, group_size=8, residual=4):
            prefill, decoded, cache = _run(model, prompt, steps)
        assert torch.equal(prefill, ref_prefill)  # this forward's own tokens are attended at full precision
        assert all(isinstance(layer, QuantizedKVLayer) for layer in cache.layers)
        assert cache.layers[0].quantized_tokens == 24 + 4 - 4 and cache.get_seq_length() == 28
        errors[bits] = ((decoded - ref).norm() / ref.norm()).item()
    print(f"{family}: relative decode-logit error", {b: f"{e:.2e}" for b, e in errors.items()})
    assert errors[8] < 5e-3
    assert errors[8] < errors[4] < errors[2]
    assert errors[2] > 4 * errors[8]


def test_window_covering_the_sequence_is_exact(family):
    model = make_tiny(family)
    prompt, steps = _tokens(2, 12), _tokens(2, 4, seed=3)
    ref_prefill, ref, ref_cache = _run(model, prompt, steps)
    with quantize_kv(model, 2, group_size=8, residual=16):
        prefill, decoded, cache = _run(model, prompt, steps)
        assert torch.equal(model(prompt, use_cache=False).logits, ref_prefill)
    assert torch.equal(prefill, ref_prefill) and torch.equal(decoded, ref)
    assert all(layer.quantized_tokens == 0 for layer in cache.layers)
    assert cache_nbytes(cache) == cache_nbytes(ref_cache) == expected_quant_nbytes(model, None, 2, 16, 2, 8, 16, 4)


def test_bytes_are_exact_at_every_step_and_shrink_to_bits_over_16():
    model = make_tiny("llama")
    prompt, steps = _tokens(2, 9), _tokens(2, 6, seed=3)
    for bits in (2, 4, 8):
        with quantize_kv(model, bits, group_size=8, residual=5):
            out = model(prompt)
            cache = out.past_key_values
            for i in range(steps.shape[1] + 1):
                tokens = 9 + i
                assert cache.get_seq_length() == tokens
                assert cache_nbytes(cache) == expected_quant_nbytes(model, None, 2, tokens, bits, 8, 5, 4)
                layer = cache.layers[4]
                assert layer.qkeys.codes.dtype == torch.uint8 and layer.qkeys.codes.shape == (2, 2, tokens - 5, 2 * bits)
                assert layer.keys.shape == (2, 2, 5, 16)
                if i < steps.shape[1]:
                    model(steps[:, i : i + 1], past_key_values=cache)
    # a realistic head (128 channels, group 32) in fp16: the ratio tends to bits/16 + 2/group_size
    big = make_tiny("llama", n_layers=2, hidden_size=256, num_attention_heads=2, num_key_value_heads=1).half()
    prompt = _tokens(1, 544)
    plain = cache_nbytes(big(prompt).past_key_values)
    assert plain == expected_kv_nbytes(big, None, 1, 544, 2)
    ratios = {}
    for bits in (2, 4, 8):
        with quantize_kv(big, bits):  # group_size=32, residual=32
            got = cache_nbytes(big(prompt).past_key_values)
        assert got == expected_quant_nbytes(big, None, 1, 544, bits, 32, 32, 2)
        ratios[bits] = got / plain
        asymptote = bits / 16 + 2 / 32
        assert ratios[bits] == pytest.approx(asymptote + 32 / 544 * (1 - asymptote), rel=1e-12)
    print("fp16 bytes ratio at 544 tokens (window 32, group 32):", {b: round(r, 4) for b, r in ratios.items()})
    assert ratios[2] < ratios[4] < 0.36 and ratios[8] < 0.6


def test_sharing_and_quantization_compose():
    model = make_tiny("llama")
    policy = SharingPolicy(POLICY)
    prompt, step = _tokens(2, 12), _tokens(2, 1, seed=3)
    with quantize_kv(model, 4, group_size=8, residual=4):
        alone = model(prompt).past_key_values
    with quantize_kv(model, 4, group_size=8, residual=4, policy=policy) as quantization:
        cache = RecordingCache(config=model.config)
        model(prompt, past_key_values=cache)
        prefill = {idx: seen[2:] for idx, seen in cache.seen.items()}  # what attention got: exact K/V
        assert cache_nbytes(cache) * 8 == cache_nbytes(alone) * 6  # 2 of 8 layers store nothing
        assert cache_nbytes(cache) == expected_quant_nbytes(model, policy, 2, 12, 4, 8, 4, 4)
        model(step, past_key_values=cache)
        for layer, src in enumerate(POLICY):
            _, _, keys, values = cache.seen[layer]
            if layer != src:
                assert isinstance(cache.layers[layer], SharedLayer) and cache.layers[layer].source is cache.layers[src]
                assert cache.layers[layer].keys is None and cache.layers[layer].values is None
                # the sharer attended over the very tensors its source's attention got
                assert keys is cache.seen[src][2] and values is cache.seen[src][3]
                continue
            assert isinstance(cache.layers[layer], QuantizedKVLayer)
            # independent: quantize the prefill's K/V (tokens 0..7 leave the window), keep 8..11, add the new one
            new_k, new_v = cache.seen[layer][:2]
            for got, full, new in ((keys, prefill[layer][0], new_k), (values, prefill[layer][1], new_v)):
                old = dequantize(quantize(full[:, :, :8], 4, 8), 4, 8, full.dtype)
                assert torch.equal(got, torch.cat([old, full[:, :, 8:], new], dim=-2))
        taps = [layer.__dict__["update"] for layer in cache.layers if isinstance(layer.__dict__.get("update"), ReturnedKV)]
        assert taps and all(tap.kv is None for tap in taps)  # the sources' returned K/V dropped after the forward
        with pytest.raises(RuntimeError, match="returned no K/V yet in this forward"):
            cache.layers[3].update(None, None)
        sharing, attached = attached_methods(model)
        assert quantization.attached and attached is quantization
        assert isinstance(sharing, KVSharing) and sharing.policy == policy
    assert not attached_methods(model) and not hasattr(model, "_kvsharer_hooks")


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_left_padded_batch_generates_under_sharing_and_quantization(family):
    model = make_tiny(family)
    policy = SharingPolicy(POLICY)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :7] = 0
    padded = _tokens(3, 12, seed=5).masked_fill(mask == 0, 0)
    gen = dict(max_new_tokens=6, min_new_tokens=6, **GEN)
    with share_kv(model, policy):
        ref = model.generate(padded, attention_mask=mask, **gen)
    with quantize_kv(model, 4, group_size=8, residual=17, policy=policy):  # window >= the 17 fed tokens: exact
        assert torch.equal(model.generate(padded, attention_mask=mask, **gen), ref)
    with quantize_kv(model, 2, group_size=8, residual=2, policy=policy):
        out = model.generate(padded, attention_mask=mask, return_dict_in_generate=True, **gen)
        alone = [model.generate(padded[i : i + 1, mask[i].bool()], **gen)[0, -6:] for i in range(3)]
    assert out.sequences.shape == (3, 18)
    assert torch.equal(out.sequences[:, 12], ref[:, 12])  # the first token comes from the exact prefill
    # per-token quantization: padding never shares a group with real tokens, rows match their unpadded runs
    for i in range(3):
        assert torch.equal(out.sequences[i, 12:], alone[i])
    cache = out.past_key_values
    assert cache.get_seq_length() == 17  # the last token is never fed back
    assert cache_nbytes(cache) == expected_quant_nbytes(model, policy, 3, 17, 2, 8, 2, 4)
    assert [type(layer).__name__ for layer in cache.layers] == [
        "SharedLayer" if src != layer else "QuantizedKVLayer" for layer, src in enumerate(POLICY)
    ]


def test_detach_restores_bit_equal_outputs():
    model = make_tiny("llama")
    prompt, steps = _tokens(2, 10), _tokens(2, 3, seed=3)
    decoder = model.get_decoder()
    hooks = (len(decoder._forward_pre_hooks), len(decoder._forward_hooks))
    _, before, _ = _run(model, prompt, steps)
    gen_before = model.generate(prompt, max_new_tokens=5, **GEN)
    with quantize_kv(model, 2, group_size=8, residual=0, policy=SharingPolicy(POLICY)):
        _, inside, cache = _run(model, prompt, steps)
        assert cache.layers[0].keys.shape[-2] == 0 and cache.layers[0].quantized_tokens == 13  # residual=0
    assert not torch.equal(inside, before)
    _, after, cache = _run(model, prompt, steps)
    assert torch.equal(after, before) and type(cache.layers[0]) is not QuantizedKVLayer
    assert torch.equal(model.generate(prompt, max_new_tokens=5, **GEN), gen_before)
    assert (len(decoder._forward_pre_hooks), len(decoder._forward_hooks)) == hooks
    assert not attached_methods(model) and not hasattr(model, "_kvsharer_hooks")


def test_refused_inputs_each_say_why():
    model = make_tiny("llama", n_layers=2)  # head_dim 16
    with pytest.raises(ValueError, match=r"bits must be one of \(2, 4, 8\); got 3"):
        KVQuantization(model, 3)
    with pytest.raises(ValueError, match="group_size 12 does not divide the model's head_dim 16"):
        KVQuantization(model, 4, group_size=12)
    with pytest.raises(ValueError, match="group_size must be a positive integer"):
        KVQuantization(model, 4, group_size=0)
    with pytest.raises(ValueError, match=r"residual \(full-precision window, in tokens\) must be an integer >= 0; got -1"):
        KVQuantization(model, 4, group_size=8, residual=-1)
    with quantize_kv(model, 4, group_size=8):
        with pytest.raises(RuntimeError, match="already has KV quantization attached"):
            KVQuantization(model, 8, group_size=8).attach()
    with compress_kv(model, make_method("h2o", 0.5)) as compression:
        with pytest.raises(RuntimeError, match="token-level method \\(compress_kv\\) attached"):
            quantize_kv(model, 4, group_size=8).__enter__()
        assert attached_methods(model) == [compression]
    with quantize_kv(model, 4, group_size=8) as quantization:  # the other order is refused too
        with pytest.raises(RuntimeError, match="has KV quantization attached; a token-level method"):
            compress_kv(model, make_method("h2o", 0.5)).__enter__()
        assert attached_methods(model) == [quantization]
        with pytest.raises(ValueError, match="cannot apply KV quantization to a cache that already holds tokens"):
            cache = DynamicCache(config=model.config)
            cache.update(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16), 0)
            model(_tokens(1, 4), past_key_values=cache)
    assert not attached_methods(model) and not hasattr(model, "_kvsharer_hooks")
