"""MiniCache (SLERP merging of adjacent deep layer pairs, with token retention) on tiny models."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import VOCAB, make_tiny
from transformers import DynamicCache

from kvsharer import SharingPolicy, cache_nbytes, share_kv
from kvsharer.methods.intra import compress_kv, make_method
from kvsharer.methods.minicache import (
    MiniCache, minicache, MiniCachePair, MiniCachePartner, expected_minicache_nbytes, pairs_for_rate, retained_count, slerp,
)
from kvsharer.cache.hooks import attached_methods
from kvsharer.models.loading import kv_shape

GEN = dict(do_sample=False, pad_token_id=0)


def _tokens(shape, seed):
    return torch.randint(3, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def _angle(a, b):
    return torch.arccos((_unit(a) * _unit(b)).sum(-1).clamp(-1.0, 1.0))


def _run(model, prompt, steps, **kwargs):
    """Prefill, then ``steps`` decoding forwards fed fixed tokens: every forward's logits, and the cache."""
    out = model(prompt, **kwargs)
    logits, cache = [out.logits], out.past_key_values
    for i in range(steps):
        out = model(_tokens((prompt.shape[0], 1), 100 + i), past_key_values=cache)
        logits.append(out.logits)
    return logits, cache


def _pair(t=0.6, gamma=0.05):
    pair = MiniCachePair((0, 1), t, gamma)
    return pair, MiniCachePartner(pair)


# ---------------------------------------------------------------------------------------------
# SLERP and the merged state, by hand
# ---------------------------------------------------------------------------------------------


def test_slerp_known_angles():
    e0, e1 = torch.eye(4)[0], torch.eye(4)[1]
    torch.testing.assert_close(slerp(e0, e1, 0.0), e0, atol=1e-6, rtol=0)
    torch.testing.assert_close(slerp(e0, e1, 1.0), e1, atol=1e-6, rtol=0)
    half = slerp(e0, e1, 0.5)
    torch.testing.assert_close(half, (e0 + e1) / math.sqrt(2), atol=1e-6, rtol=0)
    assert math.isclose(math.degrees(_angle(half, e0)), 45.0, abs_tol=1e-4)

    # random pairs: the result lies at t·Ω from a and (1 − t)·Ω from b, on the unit sphere
    g = torch.Generator().manual_seed(0)
    a, b = _unit(torch.randn(200, 8, generator=g)), _unit(torch.randn(200, 8, generator=g))
    omega = _angle(a, b)
    for t in (0.25, 0.6):
        s = slerp(a, b, t)
        torch.testing.assert_close(s.norm(dim=-1), torch.ones(200), atol=1e-6, rtol=0)
        torch.testing.assert_close(_angle(a, s), t * omega, atol=2e-4, rtol=0)
        torch.testing.assert_close(_angle(s, b), (1 - t) * omega, atol=2e-4, rtol=0)

    # near-parallel and identical: no 0/0, the (normalised) common direction
    near = _unit(a + 1e-7 * torch.randn(200, 8, generator=g))
    for other in (near, a.clone()):
        s = slerp(a, other, 0.6)
        assert torch.isfinite(s).all()
        torch.testing.assert_close(s, a, atol=1e-6, rtol=0)
    # exactly opposite: undefined great circle, still finite unit vectors
    s = slerp(a, -a, 0.5)
    assert torch.isfinite(s).all()
    torch.testing.assert_close(s.norm(dim=-1), torch.ones(200), atol=1e-6, rtol=0)


def test_identical_directions_restore_exactly_and_magnitudes_always():
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(2, 2, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g)
    sk, sv = torch.rand(2, 2, 5, 1, generator=g) + 0.5, torch.rand(2, 2, 5, 1, generator=g) + 0.5
    pair, partner = _pair(gamma=0.0)  # merge every token
    pair.update(k, v)
    partner.update(k * sk, v * sv)  # same directions, other lengths
    pair.merge()
    assert pair.retained == (0, 0) and pair.k.length == 5
    k1, v1 = torch.randn(2, 2, 1, 8, generator=g), torch.randn(2, 2, 1, 8, generator=g)
    keys, values = pair.update(k1, v1)
    assert keys.shape == values.shape == (2, 2, 6, 8)
    torch.testing.assert_close(keys[:, :, :5], k, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(values[:, :, :5], v, atol=1e-6, rtol=1e-5)
    assert torch.equal(keys[:, :, 5:], k1) and torch.equal(values[:, :, 5:], v1)  # this forward's tokens: exact
    keys, values = partner.update(k1, v1)
    torch.testing.assert_close(keys[:, :, :5], k * sk, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(values[:, :, :5], v * sv, atol=1e-6, rtol=1e-5)
    assert pair.get_seq_length() == partner.get_seq_length() == 6

    # different directions: one merged direction for both layers, each layer's own magnitude
    kb = torch.randn(2, 2, 5, 8, generator=g)
    pair, partner = _pair(gamma=0.0)
    pair.update(k, v)
    partner.update(kb, v)
    pair.merge()
    ka_hat, _ = pair.update(k1, v1)
    kb_hat, _ = partner.update(k1, v1)
    ka_hat, kb_hat = ka_hat[:, :, :5], kb_hat[:, :, :5]
    torch.testing.assert_close(ka_hat.norm(dim=-1), k.norm(dim=-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kb_hat.norm(dim=-1), kb.norm(dim=-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_unit(ka_hat), _unit(kb_hat), atol=1e-6, rtol=0)
    torch.testing.assert_close(_angle(k, ka_hat), 0.6 * _angle(k, kb), atol=2e-4, rtol=0)
    assert not torch.allclose(ka_hat, k, atol=1e-2)

    # bytes: everything on the pair, nothing on the partner; directions + 2 magnitudes + fp32 range, K and V
    assert partner.stored_nbytes() == 0
    pending = 2 * 2 * (2 * 2 * 1 * 8 * 4)  # both layers' K and V of the unmerged token
    per_kv = (2 * 2 * 5 * 8 + 2 * 2 * 2 * 5) * 4 + 2 * 2 * 2 * 4
    assert cache_nbytes(SimpleNamespace(layers=[pair, partner])) == 2 * per_kv + pending


def _rotated(thetas, radius_a=1.0, radius_b=2.0):
    """One row, one head, 2-D vectors: layer b's vector at angle thetas[i] from layer a's."""
    alpha = torch.linspace(0.0, 3.0, len(thetas))
    th = torch.tensor(thetas)
    a = radius_a * torch.stack([alpha.cos(), alpha.sin()], -1)
    b = radius_b * torch.stack([(alpha + th).cos(), (alpha + th).sin()], -1)
    return a[None, None], b[None, None]


@pytest.mark.parametrize("gamma,expected", [(0.0, []), (0.05, [3]), (0.1, [3, 4]), (1.0, [0, 1, 2, 3, 4, 5])])
def test_retention_rule_keeps_the_most_distant_tokens(gamma, expected):
    """retain i ⇔ d_i ≥ d_max − γ·(d_max − d_min); retained tokens come back bit-exact for both layers."""
    thetas = [0.1, 0.2, 0.3, 1.0, 0.95, 0.5]  # (θ − 0.1)/0.9: 0, .11, .22, 1, .944, .44
    ka, kb = _rotated(thetas)
    pair, partner = _pair(gamma=gamma)
    pair.update(ka, ka)
    partner.update(kb, kb)
    pair.merge()
    assert pair.retained == (len(expected), len(expected))
    assert sorted(pair.k.index.tolist()) == expected  # one row, one head: index = token
    new = torch.zeros(1, 1, 1, 2)
    ra, _ = pair.update(new, new)
    rb, _ = partner.update(new, new)
    for i in range(6):
        same = torch.equal(ra[0, 0, i], ka[0, 0, i]) and torch.equal(rb[0, 0, i], kb[0, 0, i])
        assert same == (i in expected)


def test_retention_range_runs_over_decoding_and_skips_padding():
    ka, kb = _rotated([0.1, 0.2, 0.3, 1.0, 3.0])
    pair, partner = _pair(gamma=0.05)
    pair.update(ka, ka)
    partner.update(kb, kb)
    pair.merge(valid=torch.tensor([[True, True, True, True, False]]))  # token 4 (farthest) is padding
    assert pair.k.index.tolist() == [3]  # padding neither retained nor in the range
    assert math.isclose(pair.k.d_hi.item(), 1.0 / math.pi, rel_tol=1e-5)
    # decoding one token at a time: judged against the running range
    for theta, kept in ((0.15, False), (1.2, True), (1.19, True), (0.6, False)):
        a1, b1 = _rotated([theta])
        before = pair.retained[0]
        pair.update(a1, a1)
        partner.update(b1, b1)
        pair.merge()
        assert pair.retained[0] == before + kept, theta
    # a single first token has no range: merged unless gamma = 1
    for gamma, kept in ((0.5, 0), (1.0, 1)):
        pair, partner = _pair(gamma=gamma)
        a1, b1 = _rotated([0.7])
        pair.update(a1, a1)
        partner.update(b1, b1)
        pair.merge()
        assert pair.retained == (kept, kept)


def test_batch_operations_move_rows_with_their_retained_tokens():
    g = torch.Generator().manual_seed(4)
    k, kb = torch.randn(3, 2, 7, 4, generator=g), torch.randn(3, 2, 7, 4, generator=g)
    pair, partner = _pair(gamma=0.3)

    def restored(p, q):
        z = torch.zeros(p.k.direction.shape[0], 2, 1, 4)
        ka, _ = p.update(z, z)
        kb_, _ = q.update(z, z)
        p.discard_pending()
        return ka[:, :, :-1], kb_[:, :, :-1]

    pair.update(k, k)
    partner.update(kb, kb)
    pair.merge()
    ra, rb = restored(pair, partner)
    per_row = [((pair.k.index % 6) // 2 == r).sum().item() for r in range(3)]
    assert 0 < sum(per_row) == pair.retained[0]
    pair.reorder_cache(torch.tensor([2, 0, 2]))
    partner.reorder_cache(torch.tensor([2, 0, 2]))  # a no-op: the pair moved both layers
    ra2, rb2 = restored(pair, partner)
    assert torch.equal(ra2, ra[[2, 0, 2]]) and torch.equal(rb2, rb[[2, 0, 2]])
    assert pair.retained[0] == 2 * per_row[2] + per_row[0]
    pair.batch_select_indices(torch.tensor([1]))
    ra3, _ = restored(pair, partner)
    assert torch.equal(ra3, ra[[0]])
    pair.batch_repeat_interleave(2)
    ra4, rb4 = restored(pair, partner)
    assert torch.equal(ra4, ra[[0, 0]]) and torch.equal(rb4, rb[[0, 0]])
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        pair.crop(-1)


# ---------------------------------------------------------------------------------------------
# on models
# ---------------------------------------------------------------------------------------------


def test_pairs_from_rate():
    assert pairs_for_rate(0.125, 8) == [(6, 7)]
    assert pairs_for_rate(0.25, 8) == [(4, 5), (6, 7)]  # the paper's setting: from the middle layer down
    assert pairs_for_rate(0.5, 8) == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert pairs_for_rate(0.25, 30) == [(l, l + 1) for l in range(14, 30, 2)]  # round(7.5) = 8, like sharing
    assert pairs_for_rate(3 / 7, 7) == [(1, 2), (3, 4), (5, 6)]
    model = make_tiny("llama")
    assert MiniCache(model, None, pairs=[(5, 6), (1, 2)]).pairs == [(1, 2), (5, 6)]


def test_single_forward_is_the_plain_model(family):
    """Merging happens after the forward: the forward's own logits are the plain model's, bit for bit."""
    model = make_tiny(family)
    tokens = _tokens((2, 12), 1)
    ref = model(tokens).logits
    with minicache(model, 0.25):
        out = model(tokens)
        no_cache = model(tokens, use_cache=False)
    assert torch.equal(out.logits, ref) and torch.equal(no_cache.logits, ref)
    assert no_cache.past_key_values is None
    assert retained_count(out.past_key_values) > 0


def test_gamma_one_retains_everything_and_equals_plain(family):
    model = make_tiny(family)
    prompt = _tokens((2, 12), 2)
    ref, _ = _run(model, prompt, 3)
    ref_beam = model.generate(prompt, num_beams=2, max_new_tokens=3, **GEN)
    chunks = _tokens((2, 16), 3)
    ref_chunk = model(chunks[:, 8:], past_key_values=model(chunks[:, :8]).past_key_values).logits
    with minicache(model, 0.25, gamma=1.0):
        got, cache = _run(model, prompt, 3)
        beam = model.generate(prompt, num_beams=2, max_new_tokens=3, **GEN)
        chunk = model(chunks[:, 8:], past_key_values=model(chunks[:, :8]).past_key_values).logits
    for r, x in zip(ref, got):
        assert torch.equal(r, x)
    n_layers, heads, _ = kv_shape(model)
    assert retained_count(cache) == 2 * 2 * 2 * heads * 15  # 2 pairs x K,V x rows x heads x tokens
    assert torch.equal(beam, ref_beam) and torch.equal(chunk, ref_chunk)


def test_prefill_decode_bytes_exact_and_logits_move(family):
    model = make_tiny(family)
    prompt = _tokens((2, 16), 4)
    ref, plain_cache = _run(model, prompt, 4)
    with minicache(model, 0.25) as merger:
        got, cache = _run(model, prompt, 4)
        assert cache.get_seq_length() == 20 and len(cache.layers) == 8
        assert [type(layer).__name__ for layer in cache.layers[4:]] == ["MiniCachePair", "MiniCachePartner"] * 2
    n_layers, heads, dim = kv_shape(model)
    retained = retained_count(cache)
    slots = 2 * 2 * 2 * heads * 20  # pairs x (K, V) x rows x heads x tokens
    assert 0 < retained < 0.5 * slots
    got_bytes, plain_bytes = cache_nbytes(cache), cache_nbytes(plain_cache)
    assert got_bytes == expected_minicache_nbytes(model, merger.pairs, 2, 20, 4, retained)
    assert plain_bytes == 2 * n_layers * 2 * heads * 20 * dim * 4
    # each pair saves one layer's KV minus its magnitudes (2/D of a layer), minus the retained tokens
    saved = 1 - got_bytes / plain_bytes
    ideal = merger.n_pairs / n_layers * (1 - 2 / dim)
    assert ideal - 0.06 < saved < merger.n_pairs / n_layers
    # the prefill is exact; decoding reads merged K/V: different, finite logits
    assert torch.equal(got[0], ref[0])
    for r, x in zip(ref[1:], got[1:]):
        assert torch.isfinite(x).all()
        assert (r - x).abs().max() > 1e-4


def test_left_padded_batch_generates(family):
    model = make_tiny(family)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :7] = 0
    padded = _tokens((3, 12), 5).masked_fill(mask == 0, 0)
    ref = model.generate(padded, attention_mask=mask, max_new_tokens=4, **GEN)
    with minicache(model, 0.25, gamma=1.0):
        assert torch.equal(model.generate(padded, attention_mask=mask, max_new_tokens=4, **GEN), ref)
    with minicache(model, 0.25):
        out = model.generate(padded, attention_mask=mask, max_new_tokens=4, return_dict_in_generate=True, **GEN)
        # rows are merged independently and padding stays out: each row generates what it does alone
        for row in range(3):
            real = int(mask[row].sum())
            alone = model.generate(padded[row:row + 1, 12 - real:], max_new_tokens=4, **GEN)[0, real:]
            assert torch.equal(out.sequences[row, 12:12 + len(alone)], alone)
    assert out.sequences.shape == (3, 16)
    assert torch.equal(out.sequences[:, :12], padded)
    cache = out.past_key_values
    assert cache.get_seq_length() == 15
    _, heads, _ = kv_shape(model)
    full_mask = torch.cat([mask, torch.ones(3, 3, dtype=torch.long)], dim=1)
    for layer in cache.layers:
        if isinstance(layer, MiniCachePair):
            for state in (layer.k, layer.v):
                s, bh = state.index // (3 * heads), state.index % (3 * heads)
                assert full_mask[bh // heads, s].bool().all()  # padding is never retained


def test_sliding_window_beyond_the_window():
    model = make_tiny("mistral", sliding_window=6)
    prompt = _tokens((2, 10), 6)
    ref, _ = _run(model, prompt, 3)
    with minicache(model, 0.25, gamma=1.0):
        got, _ = _run(model, prompt, 3)
    for r, x in zip(ref, got):
        assert torch.equal(r, x)
    with minicache(model, 0.25):
        got, cache = _run(model, prompt, 3)
    assert all(torch.isfinite(x).all() for x in got) and cache.layers[4].k.length == 13


def test_detach_restores_the_plain_model():
    model = make_tiny("qwen2")
    prompt = _tokens((2, 10), 7)
    ref, _ = _run(model, prompt, 2)
    ref_gen = model.generate(prompt, max_new_tokens=4, **GEN)
    decoder = model.get_decoder()
    hooks = (len(decoder._forward_pre_hooks), len(decoder._forward_hooks))
    with minicache(model, 0.25):
        inside, _ = _run(model, prompt, 2)
    assert not torch.equal(inside[1], ref[1])
    after, _ = _run(model, prompt, 2)
    for r, x in zip(ref, after):
        assert torch.equal(r, x)
    assert torch.equal(model.generate(prompt, max_new_tokens=4, **GEN), ref_gen)
    assert (len(decoder._forward_pre_hooks), len(decoder._forward_hooks)) == hooks
    assert not attached_methods(model) and not hasattr(model, "_kvsharer_hooks")


def test_refusals():
    model = make_tiny("llama")
    policy = SharingPolicy.from_pairs(8, {3: 1})
    with share_kv(model, policy), pytest.raises(RuntimeError, match="KV-sharing policy attached"):
        minicache(model, 0.25).__enter__()
    with compress_kv(model, make_method("h2o", 0.5)), pytest.raises(RuntimeError, match="token-level method"):
        MiniCache(model, 0.25).attach()
    with minicache(model, 0.25) as merger:
        with pytest.raises(RuntimeError, match="already has MiniCache"):
            MiniCache(model, 0.125).attach()
        with pytest.raises(RuntimeError, match="KV-sharing policy attached"):
            share_kv(model, policy).__enter__()  # attached after MiniCache: refused as well
        assert attached_methods(model) == [merger]
        plain_cache = DynamicCache(config=model.config)
        plain_cache.update(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16), 0)
        with pytest.raises(ValueError, match="already holds tokens"):
            model(_tokens((1, 4), 0), past_key_values=plain_cache)
    assert not attached_methods(model) and not hasattr(model, "_kvsharer_hooks")
    for kwargs, message in (
        (dict(t=1.5), r"interpolation t must be a number in \[0, 1\]"),
        (dict(t=-0.1), r"interpolation t must be a number in \[0, 1\]"),
        (dict(gamma=2.0), r"gamma must be a number in \[0, 1\]"),
        (dict(gamma=True), r"gamma must be a number in \[0, 1\]"),
    ):
        with pytest.raises(ValueError, match=message):
            MiniCache(model, 0.25, **kwargs)
    with pytest.raises(ValueError, match="needs 6 adjacent layer pairs.*at most 4 disjoint pairs"):
        MiniCache(model, 0.75)
    with pytest.raises(ValueError, match="0 layer pairs"):
        MiniCache(model, 0.01)
    for pairs, message in (
        ([(3, 5)], "not \\(l, l \\+ 1\\)"),
        ([(4, 5), (5, 6)], "disjoint: layer 5"),
        ([(7, 8)], "outside the model's layers 0..7"),
        ([], "at least one layer pair"),
    ):
        with pytest.raises(ValueError, match=message):
            MiniCache(model, None, pairs=pairs)
    with pytest.raises(ValueError, match="either a rate or explicit pairs"):
        MiniCache(model, 0.25, pairs=[(6, 7)])
    with pytest.raises(ValueError, match="either a rate or explicit pairs"):
        MiniCache(model)
