"""KV sharing on transformers' fused-QKV architectures (kvsharer.models.fused_qkv): Phi-3, GPT-NeoX, Persimmon,
Bloom, Falcon (new decoder architecture / multi-query / classic), GPT-2 (Conv1D), GPTBigCode (MQA / MHA), MPT.

Each family: a tiny random 4-layer model built from its config in memory, layers 2 and 3 reading layers 0 and 1.
The reference is independent of the cache and of the Q-only stand-ins: the plain model, no cache, with each
sharing layer's key/value replaced by its source's inside attention — through transformers' attention-function
registry where the family's attention dispatches through it, else at the family's own split of the fused output
(Bloom's ``_reshape``, Falcon's ``_split_heads``, MPT's ``Wqkv(x).chunk(3)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn
from transformers import (AttentionInterface, AttentionMaskInterface, BloomConfig, BloomForCausalLM, DynamicCache,
                          FalconConfig, FalconForCausalLM, GPT2Config, GPT2LMHeadModel, GPTBigCodeConfig,
                          GPTBigCodeForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM, MptConfig, MptForCausalLM,
                          PersimmonConfig, PersimmonForCausalLM, Phi3Config, Phi3ForCausalLM)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask
from transformers.pytorch_utils import Conv1D

from kvsharer import SharingPolicy, attach, detach, share_kv
from kvsharer.cache.hooks import attached_methods, restore_configs, swap_attention
from kvsharer.models.fused_qkv import FUSED_QKV_ADAPTERS, QKVLayout, QOnlyProjection, query_weight
from kvsharer.models.loading import UnsupportedArchitecture, find_parts

VOCAB = 96
POLICY = SharingPolicy.from_pairs(4, {2: 0, 3: 1})  # layers 2 and 3 read layers 0 and 1
ATOL = 1e-5  # shared logits vs the reference: the Q-only matmul may sum in another order than the full one
REFERENCE = "kvsharer_fused_reference"  # attention function of the reference (registered below)


@dataclass(frozen=True)
class Family:
    config_cls: type
    model_cls: type
    config: dict
    layout: tuple[int, int, int]  # (blocks, query rows per block, K/V rows per block), worked out by hand
    attn: str = "sdpa"  # the families without SDPA support run eager
    split: str | None = None  # reference by the family's own split method (None: its attention function)
    hook_chunks: bool = False  # reference at MPT's Wqkv(x).chunk(3)


# hidden 64, 4 heads of 16 everywhere
FAMILIES = {
    "phi3": Family(Phi3Config, Phi3ForCausalLM,
                   dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2),
                   (1, 4 * 16, 2 * 2 * 16)),
    "gpt_neox": Family(GPTNeoXConfig, GPTNeoXForCausalLM,
                       dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, attention_bias=True),
                       (4, 16, 2 * 16)),
    "persimmon": Family(PersimmonConfig, PersimmonForCausalLM,
                        dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, qk_layernorm=True),
                        (4, 16, 2 * 16)),
    "bloom": Family(BloomConfig, BloomForCausalLM, dict(hidden_size=64, n_head=4), (4, 16, 2 * 16),
                    attn="eager", split="_reshape"),
    "falcon_new_arch": Family(FalconConfig, FalconForCausalLM,
                              dict(hidden_size=64, num_attention_heads=4, num_kv_heads=2, new_decoder_architecture=True,
                                   bias=True), (2, 2 * 16, 2 * 16), split="_split_heads"),
    "falcon_multi_query": Family(FalconConfig, FalconForCausalLM,
                                 dict(hidden_size=64, num_attention_heads=4, multi_query=True,
                                      new_decoder_architecture=False), (1, 4 * 16, 2 * 16), split="_split_heads"),
    "falcon_mha": Family(FalconConfig, FalconForCausalLM,
                         dict(hidden_size=64, num_attention_heads=4, multi_query=False,
                              new_decoder_architecture=False, bias=True), (4, 16, 2 * 16), split="_split_heads"),
    "gpt2": Family(GPT2Config, GPT2LMHeadModel, dict(n_embd=64, n_head=4, n_positions=128), (1, 4 * 16, 2 * 4 * 16)),
    "gpt_bigcode_mqa": Family(GPTBigCodeConfig, GPTBigCodeForCausalLM,
                              dict(n_embd=64, n_head=4, n_positions=128, multi_query=True), (1, 4 * 16, 2 * 16)),
    "gpt_bigcode_mha": Family(GPTBigCodeConfig, GPTBigCodeForCausalLM,
                              dict(n_embd=64, n_head=4, n_positions=128, multi_query=False), (4, 16, 2 * 16)),
    "mpt": Family(MptConfig, MptForCausalLM, dict(d_model=64, n_heads=4, max_seq_len=128), (1, 4 * 16, 2 * 4 * 16),
                  attn="eager", hook_chunks=True),
}


def make_model(name: str) -> nn.Module:
    family = FAMILIES[name]
    config = family.config_cls(vocab_size=VOCAB, num_hidden_layers=4, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                               **family.config)
    config._attn_implementation = family.attn
    torch.manual_seed(0)
    model = family.model_cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(2.5)  # random init is near-uniform: make the layers really differ
            else:
                p.add_(torch.randn_like(p) * 0.1)  # non-zero biases, so the bias rows are checked too
    return model


@pytest.fixture(params=sorted(FAMILIES))
def name(request):
    return request.param


@pytest.fixture
def tokens():
    return torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------------------------
# The independent reference
# ------------------------------------------------------------------------------------------------------------


class Substitution:
    """Keeps each source layer's key/value of one forward and hands a sharing layer its source's."""

    def __init__(self, share_map: list[int]):
        self.map = share_map
        self.stash: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, layer: int, key: torch.Tensor, value: torch.Tensor):
        source = self.map[layer]
        if source == layer:
            self.stash[layer] = (key, value)
            return key, value
        return self.stash[source]


_ACTIVE: Substitution | None = None  # the substitution of the reference forward in progress


def _reference_attention(module, query, key, value, attention_mask, **kwargs):
    key, value = _ACTIVE(module.layer_idx, key, value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(REFERENCE, _reference_attention)
AttentionMaskInterface.register(REFERENCE, sdpa_mask)


def _substituting_split(attention, split):
    def substituted(fused):
        query, key, value = split(fused)
        key, value = _ACTIVE(attention.layer_idx, key, value)
        return query, key, value
    return substituted


def _substituting_chunks(attention):
    def hook(module, args, fused):  # MPT: query, key, value = Wqkv(x).chunk(3, dim=2)
        query, key, value = fused.chunk(3, dim=2)
        key, value = _ACTIVE(attention.layer_idx, key, value)
        return torch.cat([query, key, value], dim=2)
    return hook


def reference_logits(model, name: str, tokens, share_map: list[int]) -> torch.Tensor:
    """The plain model (no cache, nothing of kvsharer attached), each sharing layer attending over its
    source's key/value."""
    global _ACTIVE
    family, parts = FAMILIES[name], find_parts(model)
    _ACTIVE = Substitution(share_map)
    undo = []
    if family.split:
        for attention in parts.attentions:
            setattr(attention, family.split, _substituting_split(attention, getattr(attention, family.split)))
            undo.append(lambda a=attention: delattr(a, family.split))  # the class's method again
    elif family.hook_chunks:
        undo = [a.Wqkv.register_forward_hook(_substituting_chunks(a)).remove for a in parts.attentions]
    else:
        swaps = swap_attention(model, parts, REFERENCE)
        undo.append(lambda: restore_configs(swaps))
    try:
        with torch.no_grad():
            return model(tokens, use_cache=False).logits
    finally:
        _ACTIVE = None
        for step in undo:
            step()


def fused(model, layer: int) -> nn.Module:
    parts = find_parts(model)
    return getattr(parts.attentions[layer], parts.fused.projection)


def kv_rows(name: str) -> list[slice]:
    """The key/value output rows of the family's fused projection, from the layout worked out by hand
    (rows of a Linear's weight, columns of a Conv1D's)."""
    blocks, q, kv = FAMILIES[name].layout
    return [slice(block * (q + kv) + q, (block + 1) * (q + kv)) for block in range(blocks)]


def poison(projection: nn.Module, rows: list[slice]) -> None:
    """Set ``rows`` of the fused projection's output to NaN (weight and bias)."""
    with torch.no_grad():
        for r in rows:
            (projection.weight[:, r] if isinstance(projection, Conv1D) else projection.weight[r]).fill_(float("nan"))
            if projection.bias is not None:
                projection.bias[r] = float("nan")


# ------------------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------------------


def test_find_parts_describes_the_layout(name):
    model = make_model(name)
    parts = find_parts(model)
    assert type(parts.fused).__name__ == "FusedQKVAdapter" and type(model).__name__ in FUSED_QKV_ADAPTERS
    layout = parts.fused.layout
    assert (layout.blocks, layout.q_rows, layout.kv_rows) == FAMILIES[name].layout
    assert parts.n_layers == 4 and [a.layer_idx for a in parts.attentions] == [0, 1, 2, 3]
    for attention in parts.attentions:  # the attention module that owns the fused projection
        projection = getattr(attention, parts.fused.projection)
        out = projection.nf if isinstance(projection, Conv1D) else projection.out_features
        assert out == layout.out_features
    assert parts.native_attention


def test_identity_policy_is_bit_equal(name, tokens):
    model = make_model(name)
    # sharing always runs with a cache (also for use_cache=False): compare with the plain model's cached path
    # (MPT's default is use_cache=False, and its cached path differs from its uncached one in float rounding)
    plain = model(tokens, use_cache=True).logits
    with share_kv(model, SharingPolicy.identity(4)) as sharing:
        assert sharing.skipped_projections() == []
        assert torch.equal(model(tokens).logits, plain)
        assert torch.equal(model(tokens, use_cache=False).logits, plain)


def test_matches_independent_reference(name, tokens):
    model = make_model(name)
    reference = reference_logits(model, name, tokens, POLICY.map)
    plain = model(tokens).logits
    with share_kv(model, POLICY):
        for use_cache in (True, False):
            torch.testing.assert_close(model(tokens, use_cache=use_cache).logits, reference, rtol=ATOL, atol=ATOL)
    assert not torch.allclose(plain, reference, atol=1e-3)  # sharing really changed something
    # the reference is no identity either: without substitution it is the plain model
    torch.testing.assert_close(reference_logits(model, name, tokens, list(range(4))), plain, rtol=ATOL, atol=ATOL)


def test_cached_decoding_equals_uncached(name, tokens):
    model = make_model(name)
    with share_kv(model, POLICY), torch.no_grad():
        cache = DynamicCache(config=model.config)
        steps = [model(tokens, past_key_values=cache, use_cache=True).logits[:, -1]]  # prefill
        sequence = tokens
        for _ in range(3):  # greedy decode steps, one token each
            token = steps[-1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, token], dim=1)
            steps.append(model(token, past_key_values=cache, use_cache=True).logits[:, -1])
        full = model(sequence, use_cache=False).logits  # [2, 13, vocab]
    assert cache.get_seq_length() == sequence.shape[1]
    assert cache.layers[2].keys is None and cache.layers[3].keys is None  # the shared layers store nothing
    for i, step in enumerate(steps):
        torch.testing.assert_close(step, full[:, tokens.shape[1] - 1 + i], rtol=1e-4, atol=1e-4)


def test_shared_layers_compute_only_q(name, tokens):
    model = make_model(name)
    originals = [fused(model, layer) for layer in range(4)]
    blocks, q, kv = FAMILIES[name].layout  # worked out by hand from the modeling file, not the adapter's
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(2))
    ran = []
    hooks = [originals[layer].register_forward_hook(lambda *a, layer=layer: ran.append(layer)) for layer in (2, 3)]
    with share_kv(model, POLICY) as sharing:
        stand_ins = sharing.skipped_projections()
        assert [fused(model, 2), fused(model, 3)] == stand_ins  # find_parts still works while attached
        assert all(isinstance(s, QOnlyProjection) for s in stand_ins)
        assert [fused(model, 0), fused(model, 1)] == originals[:2]
        shared = model(tokens).logits
        assert ran == []  # the real fused projections of the shared layers never ran
        for layer, stand_in in zip((2, 3), stand_ins):
            assert stand_in.calls == 1 and stand_in.rows == blocks * q  # it computed the query rows alone
            # ... from a view of the original weight (the same storage: nothing copied)
            view = query_weight(stand_in.weight, stand_in.layout, stand_in.conv1d)  # [blocks, q, in]
            assert stand_in.weight is originals[layer].weight and view.shape == (blocks, q, 64)
            assert view.untyped_storage().data_ptr() == originals[layer].weight.untyped_storage().data_ptr()
            got = stand_in(x).unflatten(-1, (blocks, q + kv))  # [2, 5, blocks, q + kv]
            full = originals[layer](x).unflatten(-1, (blocks, q + kv))
            torch.testing.assert_close(got[..., :q], full[..., :q], rtol=1e-6, atol=1e-6)
            assert not got[..., q:].any()  # key/value rows: zeros
        # NaN in the K/V rows of the shared layers' weights: the shared forward never reads them
        for layer in (2, 3):
            poison(originals[layer], kv_rows(name))
        assert torch.equal(model(tokens).logits, shared)
    for h in hooks:
        h.remove()
    # ... while they are K/V rows the plain model does read (so the layout is right, and the check can fail)
    assert torch.isnan(model(tokens).logits).all()


def test_state_dict_unchanged_while_attached_and_detach_restores(name, tokens):
    model = make_model(name)
    before = {k: (v.clone(), v.data_ptr()) for k, v in model.state_dict().items()}
    originals = [fused(model, layer) for layer in range(4)]
    plain = model(tokens).logits
    sharing = attach(model, POLICY)
    during = model.state_dict()
    assert during.keys() == before.keys()
    assert all(torch.equal(during[k], v) and during[k].data_ptr() == ptr for k, (v, ptr) in before.items())
    assert not torch.equal(model(tokens).logits, plain)
    detach(model)
    assert not sharing.attached and not attached_methods(model)
    assert [fused(model, layer) for layer in range(4)] == originals
    assert not any(isinstance(m, QOnlyProjection) for m in model.modules())
    assert torch.equal(model(tokens).logits, plain)


@pytest.mark.parametrize("layout, blocks, q, kv, out", [
    (QKVLayout.concatenated(32, 8, 128), 1, 32 * 128, 2 * 8 * 128, (32 + 2 * 8) * 128),  # Llama-3-8B-like GQA
    (QKVLayout.interleaved(32, 128), 32, 128, 2 * 128, 3 * 32 * 128),
    (QKVLayout.grouped(8, 4, 128), 8, 4 * 128, 2 * 128, (32 + 2 * 8) * 128),
])
def test_layouts_count_rows(layout, blocks, q, kv, out):
    assert (layout.blocks, layout.q_rows, layout.kv_rows, layout.out_features) == (blocks, q, kv, out)
    assert layout.query_features == 32 * 128  # every layout: all query heads


def test_a_projection_of_another_size_is_refused():
    model = make_model("phi3")
    model.model.layers[1].self_attn.qkv_proj = nn.Linear(64, 64, bias=False)
    with pytest.raises(UnsupportedArchitecture,
                       match=r"layer 1: Phi3Attention.qkv_proj is not a Linear with 128 outputs .*Phi-3 adapter"):
        attach(model, SharingPolicy.identity(4))


def test_zaya_is_refused_with_the_reason():
    from transformers import ZayaConfig, ZayaForCausalLM

    config = ZayaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with pytest.raises(UnsupportedArchitecture, match=r"fused projection 'qkv_proj'.*no adapter is registered for "
                                                      r"ZayaForCausalLM.*compressed convolutional attention"):
        attach(ZayaForCausalLM(config), SharingPolicy.identity(4))
