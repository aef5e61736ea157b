"""KV sharing for InternLM2's fused `wqkv` (kvsharer.models.loading.InternLM2Adapter), without remote code.

The model below is a small stand-in for `modeling_internlm2.py` (InternLM's remote code), faithful where
sharing touches it: one Linear `attention.wqkv` whose output is laid out `[kv_heads, groups + 2, head_dim]`
(the query heads of each KV head's group, then its key, then its value: `"b q (h gs d) -> b q h gs d"`),
`attention.wo`, `layer_idx`, RoPE, K/V stored with `past_key_value.update(k, v, self.layer_idx, kwargs)`,
decoder layers called with `past_key_value=` that return tuples, class name `InternLM2ForCausalLM`.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from kvsharer import SharingPolicy, attach, cache_nbytes, detach, expected_kv_nbytes, share_kv
from kvsharer.models.loading import GroupedQOnlyProjection, InternLM2Adapter, UnsupportedArchitecture, find_parts
from kvsharer.cache.hooks import attached_methods
from kvsharer.cache.sharing import SharedLayer

VOCAB = 96
POLICY = [0, 1, 2, 1, 4, 4, 2, 0]  # layers 3, 5, 6, 7 read layers 1, 4, 2, 0

# (layer map, {layer: (K, V)}) while the reference implementation runs; None otherwise
_SWAP: tuple[list[int], dict] | None = None


class InternLM2Config(PretrainedConfig):
    model_type = "internlm2_standin"

    def __init__(self, vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=2, bias=True, rope_theta=10000.0, rms_norm_eps=1e-6,
                 max_position_embeddings=256, use_cache=True, **kwargs):
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_key_value_heads, self.bias, self.rope_theta = num_key_value_heads, bias, rope_theta
        self.rms_norm_eps, self.max_position_embeddings = rms_norm_eps, max_position_embeddings
        self.use_cache = use_cache
        super().__init__(**kwargs)


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class InternLM2Attention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.num_heads, self.num_key_value_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.wqkv = nn.Linear(config.hidden_size, (self.num_heads + 2 * self.num_key_value_heads) * self.head_dim,
                              bias=config.bias)
        self.wo = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.bias)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None, **kwargs):
        b, q, _ = hidden_states.shape
        groups, d = self.num_key_value_groups, self.head_dim
        # rearrange(qkv, "b q (h gs d) -> b q h gs d", gs=2 + groups, d=head_dim)
        qkv = self.wqkv(hidden_states).view(b, q, self.num_key_value_heads, groups + 2, d)
        query = qkv[..., :groups, :].reshape(b, q, self.num_heads, d).transpose(1, 2)
        key = qkv[..., -2, :].transpose(1, 2)
        value = qkv[..., -1, :].transpose(1, 2)
        inv = 1.0 / self.config.rope_theta ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim)
        freqs = position_ids[:, None, :, None].float() * inv
        cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()
        query, key = query * cos + _rotate_half(query) * sin, key * cos + _rotate_half(key) * sin
        if _SWAP is not None:  # the reference: no cache, the source's K/V swapped in here
            share_map, stash = _SWAP
            if share_map[self.layer_idx] == self.layer_idx:
                stash[self.layer_idx] = (key, value)
            else:
                key, value = stash[share_map[self.layer_idx]]
        if past_key_value is not None:
            key, value = past_key_value.update(key, value, self.layer_idx, {"sin": sin, "cos": cos})
        key = key.repeat_interleave(self.num_key_value_groups, dim=1)
        value = value.repeat_interleave(self.num_key_value_groups, dim=1)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        return self.wo(out.transpose(1, 2).reshape(b, q, -1)), None, past_key_value


class InternLM2DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.attention = InternLM2Attention(config, layer_idx)
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.attention_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.ffn_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None, **kwargs):
        attn, _, _ = self.attention(self.attention_norm(hidden_states), attention_mask, position_ids, past_key_value)
        hidden_states = hidden_states + attn
        return (hidden_states + self.w2(F.silu(self.w1(self.ffn_norm(hidden_states)))),)


class InternLM2PreTrainedModel(PreTrainedModel):
    config_class = InternLM2Config
    base_model_prefix = "model"

    def _init_weights(self, module):
        pass  # torch's defaults, scaled in make_model


class InternLM2Model(InternLM2PreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(InternLM2DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, input_ids, past_key_values=None, use_cache=None, **kwargs):
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:  # (the real code: DynamicCache.from_legacy_cache(...))
            past_key_values = DynamicCache(config=self.config)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        q = input_ids.shape[1]
        position_ids = torch.arange(past, past + q)[None]
        mask = torch.ones(q, past + q, dtype=torch.bool).tril(past)
        hidden = self.tok_embeddings(input_ids)
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=mask, position_ids=position_ids, past_key_value=past_key_values,
                           use_cache=use_cache)[0]
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden),
                                       past_key_values=past_key_values if use_cache else None)


class InternLM2ForCausalLM(InternLM2PreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.model = InternLM2Model(config)
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def get_decoder(self):
        return self.model

    def forward(self, input_ids, past_key_values=None, use_cache=None, **kwargs):
        out = self.model(input_ids=input_ids, past_key_values=past_key_values, use_cache=use_cache)
        return CausalLMOutputWithPast(logits=self.output(out.last_hidden_state), past_key_values=out.past_key_values)


AutoConfig.register(InternLM2Config.model_type, InternLM2Config, exist_ok=True)
AutoModelForCausalLM.register(InternLM2Config, InternLM2ForCausalLM, exist_ok=True)


def make_model(kv_heads: int = 2, bias: bool = True) -> InternLM2ForCausalLM:
    torch.manual_seed(0)
    model = InternLM2ForCausalLM(InternLM2Config(num_key_value_heads=kv_heads, bias=bias)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(2.5)  # random init is near-uniform: make the layers really differ
            else:
                p.add_(torch.randn_like(p) * 0.1)  # non-zero biases, so the bias rows are checked too
    return model


@pytest.fixture(params=[(2, True), (8, False)], ids=["gqa-bias", "mha"])
def model(request):
    return make_model(*request.param)


@pytest.fixture
def tokens():
    return torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def reference_logits(model, tokens, share_map):
    """Independent slow implementation: the plain model, no cache, attention swaps in the source's K/V."""
    global _SWAP
    _SWAP = (share_map, {})
    try:
        return model(tokens, use_cache=False).logits
    finally:
        _SWAP = None


def _split(qkv: torch.Tensor, attention) -> torch.Tensor:
    return qkv.unflatten(-1, (attention.num_key_value_heads, attention.num_key_value_groups + 2, attention.head_dim))


def test_find_parts_finds_internlm2(model):
    parts = find_parts(model)
    assert isinstance(parts.fused, InternLM2Adapter) and parts.fused.projection == "wqkv"
    assert parts.n_layers == 8 and parts.decoder is model.model
    assert parts.attentions == [layer.attention for layer in model.model.layers]
    assert parts.k_name is None and parts.v_name is None
    assert not parts.native_attention  # not transformers' code: the token-level methods do not apply


def test_identity_policy_is_bit_equal(model, tokens):
    plain = model(tokens).logits
    with share_kv(model, SharingPolicy.identity(8)) as sharing:
        assert sharing.skipped_projections() == []
        assert torch.equal(model(tokens).logits, plain)
        assert torch.equal(model(tokens, use_cache=False).logits, plain)


def test_shared_layers_compute_only_q(model, tokens):
    policy = SharingPolicy(POLICY)
    originals = {layer: model.model.layers[layer].attention.wqkv for layer in range(8)}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(2))
    with share_kv(model, policy) as sharing:
        stand_ins = sharing.skipped_projections()
        assert len(stand_ins) == len(policy.shared_layers) == 4
        for layer, stand_in in zip(policy.shared_layers, stand_ins):
            attention = model.model.layers[layer].attention
            assert attention.wqkv is stand_in and isinstance(stand_in, GroupedQOnlyProjection)
            got, full = _split(stand_in(x), attention), _split(originals[layer](x), attention)
            groups = attention.num_key_value_groups
            # Q: the original's Q rows (a matmul over the Q rows alone may sum in another order than the full one:
            # equal to float rounding, not always bit-equal, depending on the CPU's GEMM kernel for each shape)
            torch.testing.assert_close(got[..., :groups, :], full[..., :groups, :], rtol=1e-6, atol=1e-6)
            assert not got[..., groups:, :].any()  # K and V slots: zeros, never used
        for layer in set(range(8)) - set(policy.shared_layers):
            assert model.model.layers[layer].attention.wqkv is originals[layer]
        # the model's parameters are the same tensors under the same names while attached
        after = model.state_dict()
        assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
        calls = []
        hooks = [originals[layer].register_forward_hook(lambda *a, layer=layer: calls.append(layer))
                 for layer in policy.shared_layers]
        model(tokens)
        for h in hooks:
            h.remove()
        assert all(p.calls == 2 for p in stand_ins)  # the direct call above, then the forward
    assert calls == []  # in the forward, the real fused projections of the shared layers never ran


def test_matches_independent_slow_implementation(model, tokens):
    reference = reference_logits(model, tokens, POLICY)
    with share_kv(model, SharingPolicy(POLICY)):
        for use_cache in (True, False):
            torch.testing.assert_close(model(tokens, use_cache=use_cache).logits, reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(model(tokens).logits, reference, atol=1e-3)  # sharing really changed something


def test_cache_stores_nothing_for_shared_layers_and_decodes(model, tokens):
    policy = SharingPolicy(POLICY)
    plain_bytes = cache_nbytes(model(tokens, use_cache=True).past_key_values)
    with share_kv(model, policy):
        cache = DynamicCache(config=model.config)
        out = model(tokens, past_key_values=cache, use_cache=True)
        assert out.past_key_values is cache
        for layer in policy.shared_layers:
            assert isinstance(cache.layers[layer], SharedLayer)
            assert cache.layers[layer].keys is None and cache.layers[layer].values is None
            assert cache.layers[layer].source is cache.layers[POLICY[layer]]
            with pytest.raises(RuntimeError, match="returned no K/V"):  # nothing of the forward kept after it
                cache.layers[layer].update(None, None)
        assert cache_nbytes(cache) * 8 == plain_bytes * 4  # 4 of 8 layers store K/V
        assert cache_nbytes(cache) == expected_kv_nbytes(model, policy, 2, tokens.shape[1], 4)
        nxt = out.logits[:, -1:].argmax(-1)
        step = model(nxt, past_key_values=cache, use_cache=True)
        full = model(torch.cat([tokens, nxt], 1)).logits
    assert cache.get_seq_length() == tokens.shape[1] + 1
    torch.testing.assert_close(step.logits[:, -1], full[:, -1], rtol=1e-4, atol=1e-4)


def test_detach_restores_bit_equal(model, tokens):
    originals = [layer.attention.wqkv for layer in model.model.layers]
    plain = model(tokens).logits
    sharing = attach(model, SharingPolicy(POLICY))
    assert not torch.equal(model(tokens).logits, plain)
    detach(model)
    assert not sharing.attached and not attached_methods(model) and not hasattr(model, "_kvsharer_hooks")
    assert [layer.attention.wqkv for layer in model.model.layers] == originals
    assert not any(isinstance(m, GroupedQOnlyProjection) for m in model.modules())
    assert torch.equal(model(tokens).logits, plain)


def test_a_layout_the_adapter_does_not_know_is_refused():
    model = make_model()
    model.model.layers[2].attention.wqkv = nn.Linear(64, 64)  # not (8 + 2 x 2) x 8 outputs
    message = "layer 2: InternLM2Attention.wqkv is not a Linear with 96 outputs"
    with pytest.raises(UnsupportedArchitecture, match=message):
        attach(model, SharingPolicy.identity(8))


def test_preflight_builds_it_and_refuses_token_methods_for_it(tmp_path):
    from kvsharer.preflight import check_model

    InternLM2Config().save_pretrained(tmp_path)  # built on the meta device through the Auto classes
    assert check_model("internlm2", {"source": str(tmp_path)}, [0.25], [128], ["none", "int8"]) == []
    problems = check_model("internlm2", {"source": str(tmp_path)}, [0.25], [], ["none", "h2o:0.5", "kvmerger:0.5"])
    assert len(problems) == 1
    assert "token-level methods (h2o:0.5, kvmerger:0.5) need transformers' attention-function registry" in problems[0]
    assert "models.internlm2.token_methods: false" in problems[0]


def test_preflight_runs_token_methods_only_where_the_config_allows(tmp_path):
    """``token_methods: false`` on the remote-code model: the config passes, the other models keep them."""
    from kvsharer.preflight import preflight

    InternLM2Config().save_pretrained(tmp_path / "internlm2")
    config = {"models": {"internlm2": {"source": str(tmp_path / "internlm2")}},
              "calibration": {"text": "embedded:pydoc"}, "search": {"rates": [0.25]},
              "compose": {"intra": ["h2o:0.5"], "niah": ["h2o:0.5"]}, "evaluation": {}}
    with pytest.raises(ValueError, match="token_methods: false"):
        preflight(config)
    config["models"]["internlm2"]["token_methods"] = False
    preflight(config)  # no problem left


def test_fast_search_replays_remote_code_layers(model):
    """The fast search replays unchanged layers with stand-ins that answer like InternLM2's layers
    (``past_key_value=``, tuple outputs): its similarity equals a full forward's under the candidate."""
    from kvsharer.search.greedy import FastEvaluator, mean_similarity

    ids = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = model.model(input_ids=ids).last_hidden_state
    evaluator = FastEvaluator(model, ids, reference, batch_size=2)
    accepted, candidate = list(range(8)), [0, 1, 2, 3, 4, 5, 4, 7]  # layer 6 reads layer 4: replays 0..5
    fast = evaluator.similarity(accepted, candidate)
    assert evaluator.tuple_outputs
    with share_kv(model, SharingPolicy(candidate)), torch.no_grad():
        full = model.model(input_ids=ids).last_hidden_state
    assert fast == pytest.approx(float(mean_similarity(full, reference).mean()), abs=1e-6)
    assert fast < 1.0


def test_a_search_started_from_the_plain_run_replays_remote_code_layers(model):
    """Started from a stored plain run (no forward of its own yet), the replays still answer with InternLM2's
    tuples: the plain run records how the layers answer."""
    from kvsharer.search.greedy import FastEvaluator, plain_run, unpack_plain_run

    ids = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = model.model(input_ids=ids).last_hidden_state
    accepted, candidate = list(range(8)), [0, 1, 2, 3, 4, 5, 4, 7]
    fresh = FastEvaluator(model, ids, reference, batch_size=2).similarity(accepted, candidate)
    started = FastEvaluator(model, ids, reference, batch_size=2)
    started.start_from(*unpack_plain_run(plain_run(model, ids, batch_size=2)))
    assert started.tuple_outputs and started.similarity(accepted, candidate) == fresh
    assert started.layers_run == 2 * 4  # layers 6 and 7 only


def test_calibration_passes_its_own_cache_to_remote_code(model):
    """InternLM2's remote code builds a missing cache with the legacy API transformers 5 removed;
    calibration hands it a DynamicCache, and reads the mean K/V of every layer from it."""
    from kvsharer.search.calibrate import collect

    ids = torch.randint(3, VOCAB, (3, 10), generator=torch.Generator().manual_seed(4))
    stats = collect(model, ids, batch_size=2)
    kv_heads, head_dim = model.config.num_key_value_heads, model.config.hidden_size // model.config.num_attention_heads
    assert stats["keys"].shape == stats["values"].shape == (8, kv_heads, 10, head_dim)
    assert stats["reference_hidden"].shape == (3, 10, 64)
