"""Fitted K/V maps (kvsharer.cache.kv_maps) and the fitted order: the rotation is the model's, the map is applied
where the model attends, it reduces the error it was fitted on, the search writes policy + maps and every stage
reads them, and what cannot work is refused."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAMILIES, make_tiny

from kvsharer.cache.kv_maps import FAMILIES as MAP_FAMILIES, Fitter, KVMaps, LayerMap, MapError, Rope
from kvsharer.cache.policy import SharingPolicy
from kvsharer.cache.prefill import prefill_cache
from kvsharer.cache.sharing import share_kv
from kvsharer.cli import main as cli
from kvsharer.models.loading import kv_shape
from kvsharer.search.greedy import FastEvaluator, plain_run, unpack_plain_run


def _search_args(model, cal, out):
    import argparse

    parser = argparse.ArgumentParser()
    from kvsharer.stages import search

    search.add_arguments(parser)
    return parser.parse_args(["--model", str(model), "--calibration", str(cal), "--rate", "0.25", "--order", "fitted",
                              "--out", str(out)])


def _ids(n=6, t=24, seed=0, vocab=96):
    return torch.randint(3, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def _plain_kv(model, ids):
    return unpack_plain_run(plain_run(model, ids))[1]  # per layer (keys after RoPE, values) [N, H, T, D]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_unrotate_gives_the_keys_the_model_rotated(family):
    """The cache's keys, un-rotated at positions 0..T-1, are the keys the attention computed before RoPE (after
    Qwen3's k_norm): the rotation, its layout and the positions are the model's."""
    model = make_tiny(family, n_layers=2)
    attn = model.model.layers[1].self_attn
    before = []
    module = attn.k_norm if family == "qwen3" else attn.k_proj
    hook = module.register_forward_hook(lambda m, a, out: before.append(out))
    ids = _ids(2, 20)
    with torch.inference_mode():
        cache = model(ids, use_cache=True).past_key_values
    hook.remove()
    n, t = ids.shape
    expected = before[0].reshape(n, t, -1, cache.layers[1].keys.shape[-1]).transpose(1, 2)  # [N, H, T, D]
    got = Rope(model).unrotate(cache.layers[1].keys)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(cache.layers[1].keys, expected, atol=1e-3)  # RoPE did rotate them


def _identity_maps(model, policy):
    """Maps that return the source's K/V unchanged: keys from the k̃ half, values from the v half."""
    _, heads, head_dim = kv_shape(model)
    e = heads * head_dim
    eye, zero = torch.eye(e), torch.zeros(e, e)
    return KVMaps({i: LayerMap(i, s, torch.cat([eye, zero]), torch.zeros(e), torch.cat([zero, eye]), torch.zeros(e))
                   for i, s in enumerate(policy.map) if s != i})


def _logits_in_two_forwards(model, ids, policy, maps=None):
    """Prefill of the first 14 tokens, then the rest through the same cache (positions continue across forwards)."""
    with torch.inference_mode(), share_kv(model, policy, maps):
        cache = prefill_cache(model.config)
        first = model(ids[:, :14], past_key_values=cache, use_cache=True).logits
        rest = model(ids[:, 14:], past_key_values=cache, use_cache=True).logits
    return torch.cat([first, rest], dim=1)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_identity_maps_leave_sharing_unchanged_and_a_fitted_one_changes_it(family):
    model = make_tiny(family, n_layers=6)
    policy = SharingPolicy([0, 0, 2, 2, 4, 4])
    ids = _ids(2, 24, seed=3)
    plain_sharing = _logits_in_two_forwards(model, ids, policy)
    assert torch.allclose(_logits_in_two_forwards(model, ids, policy, _identity_maps(model, policy)), plain_sharing,
                          atol=1e-4)
    fitted = Fitter(_plain_kv(model, _ids(8, 24, seed=1)), Rope(model)).maps(policy.map)
    assert not torch.allclose(_logits_in_two_forwards(model, ids, policy, fitted), plain_sharing, atol=1e-2)


def test_a_fitted_map_reduces_the_error_it_was_fitted_on_and_the_ranking_agrees():
    model = make_tiny("llama", n_layers=6)
    kv = _plain_kv(model, _ids(12, 32, seed=2))
    rope = Rope(model)
    fitter = Fitter(kv, rope)
    for i, j in ((1, 0), (3, 2), (5, 1)):
        layer_map = fitter.fit(i, j)
        keys, values = layer_map(*kv[j], rope)  # what layer i reads through the map
        for got, own, source in ((keys, kv[i][0], kv[j][0]), (values, kv[i][1], kv[j][1])):
            assert ((got - own) ** 2).sum() < 0.9 * ((source - own) ** 2).sum()
        # the residual it reports is the unexplained fraction of layer i's K and V variance, as measured here
        k_res, v_res = fitter.residuals(i, j)
        own_k = rope.unrotate(kv[i][0])
        measured = ((rope.unrotate(keys) - own_k) ** 2).sum() / ((own_k - own_k.mean((0, 2), keepdim=True)) ** 2).sum()
        assert float(measured) == pytest.approx(k_res, rel=0.02)
    pairs = [(i, j) for i in range(1, 6) for j in range(i)]
    ranked = fitter.ranking(pairs)  # batched per source: must agree with the pair-by-pair fit
    assert sorted((i, j) for i, j, _ in ranked) == sorted(pairs)
    assert [s for *_, s in ranked] == sorted(s for *_, s in ranked)
    for i, j, score in ranked:
        assert score == pytest.approx(sum(fitter.residuals(i, j)), abs=1e-4)
    assert fitter.maps([0, 0, 2, 2, 4, 4]).nbytes == 3 * 2 * (2 * 32 * 32 + 32) * 4  # E = 2 heads x 16


def test_maps_must_fit_the_policy_and_unsupported_families_are_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = make_tiny("llama", n_layers=4)
    policy = SharingPolicy([0, 0, 2, 3])
    maps = _identity_maps(model, SharingPolicy([0, 1, 1, 3]))
    with pytest.raises(MapError, match="layer 1 reads 0 but its map is from nothing.*a map for layer 2"):
        share_kv(model, policy, maps)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(MapError, match="support the " + ", ".join(MAP_FAMILIES)):
        Rope(gpt2)


def test_fitted_search_writes_policy_and_maps_that_every_stage_reads(tiny_model_dir, tmp_path):
    cal = tmp_path / "cal.safetensors"
    assert cli(["calibrate", "--model", str(tiny_model_dir), "--samples", "24", "--tokens", "32", "--out", str(cal)]) == 0
    out = tmp_path / "policies" / "r0.25_fitted_euclidean_T0.5_s0.json"
    assert cli(["search", "--model", str(tiny_model_dir), "--calibration", str(cal), "--rate", "0.25",
                "--order", "fitted", "--out", str(out)]) == 0
    policy = json.loads(out.read_text())
    maps_path = out.with_name("r0.25_fitted_euclidean_T0.5_s0.kvmaps.safetensors")
    assert policy["kv_maps"] == maps_path.name and policy["num_shared"] == 2
    maps = KVMaps.load(maps_path)
    assert {i: m.source for i, m in maps.items()} == {i: s for i, s in enumerate(policy["map"]) if s != i}
    assert policy["kv_maps_bytes"] == maps.nbytes == 2 * 2 * (2 * 32 * 32 + 32) * 4  # 2 layers; E = 2 heads x 16
    # pairs are kept as ranked: no sharing layer reads a layer that shares, none is a source of another
    shared = [i for i, s in enumerate(policy["map"]) if s != i]
    assert all(policy["map"][policy["map"][i]] == policy["map"][i] for i in shared)
    assert {tuple(t["pair"]) for t in policy["trace"] if t["accepted"]} == {(i, policy["map"][i]) for i in shared}

    # the evaluation reads the maps through the policy file; the same map without them is plain sharing
    unmapped = tmp_path / "unmapped.json"
    unmapped.write_text(json.dumps({k: v for k, v in policy.items() if not k.startswith("kv_maps")}))
    text = tmp_path / "eval.txt"
    from kvsharer.data import load_corpus

    text.write_text(load_corpus("embedded:pydoc")[-6000:])
    results = {}
    for name, path in (("plain", None), ("fitted", out), ("unmapped", unmapped)):
        res = tmp_path / f"{name}.json"
        args = ["evaluate-ppl", "--model", str(tiny_model_dir), "--text", str(text), "--window", "64",
                "--max-tokens", "256", "--out", str(res)] + (["--policy", str(path)] if path else [])
        assert cli(args) == 0
        results[name] = json.loads(res.read_text())
    assert results["fitted"]["ppl"] != pytest.approx(results["unmapped"]["ppl"], rel=1e-4)
    assert results["fitted"]["kv_bytes"] == results["unmapped"]["kv_bytes"] < results["plain"]["kv_bytes"]

    # maps that are not the ones the policy was written with are refused
    other = _identity_maps(make_tiny("llama", n_layers=8), SharingPolicy(policy["map"]))
    other.save(maps_path)
    with pytest.raises(Exception, match="sha256 differs"):
        share_kv(make_tiny("llama", n_layers=8), SharingPolicy.from_json(out))
    maps_path.unlink()
    with pytest.raises(MapError, match="not found"):
        share_kv(make_tiny("llama", n_layers=8), SharingPolicy.from_json(out))


def test_a_larger_fitted_search_reuses_the_smaller_ones_ranking_and_candidates(tiny_model_dir, tmp_path, monkeypatch):
    """The journal records the pair ranking once: a search to a larger target (--after) fits no pair again, and its
    first candidates are the smaller search's."""
    from kvsharer.cache.kv_maps import Fitter

    cal = tmp_path / "cal.safetensors"
    assert cli(["calibrate", "--model", str(tiny_model_dir), "--samples", "24", "--tokens", "32", "--out", str(cal)]) == 0
    search = ["search", "--model", str(tiny_model_dir), "--calibration", str(cal), "--order", "fitted"]
    small, large = tmp_path / "r0.25.json", tmp_path / "r0.5.json"
    assert cli(search + ["--rate", "0.25", "--out", str(small)]) == 0
    journal = [json.loads(line) for line in small.with_name(small.name + ".journal.jsonl").read_text().splitlines()]
    ranking = [line["ranking"] for line in journal if "ranking" in line]
    assert len(ranking) == 1 and len(ranking[0]) == 8 * 7 // 2  # every pair (i > j) of the 8 layers

    def refit(*args, **kwargs):
        raise AssertionError("the pairs were ranked again")

    monkeypatch.setattr(Fitter, "ranking", refit)
    assert cli(search + ["--rate", "0.5", "--after", str(small), "--out", str(large)]) == 0
    first, second = json.loads(small.read_text()), json.loads(large.read_text())
    assert second["num_shared"] == 4 and second["candidates_resumed"] == first["candidates_evaluated"]
    assert [t["pair"] for t in second["trace"][:len(first["trace"])]] == [t["pair"] for t in first["trace"]]
    with pytest.raises(AssertionError, match="ranked again"):  # without the smaller search's journal: a new ranking
        cli(search + ["--rate", "0.5", "--out", str(tmp_path / "alone.json")])


def test_the_fitted_search_refuses_a_family_its_maps_cannot_unrotate_before_loading(tmp_path):
    folder = tmp_path / "phi"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "phi3", "architectures": ["Phi3ForCausalLM"]}))
    cal = tmp_path / "missing.safetensors"  # never read: the family is refused first
    from kvsharer.stages import search

    with pytest.raises(ValueError, match="support the llama, mistral, qwen2, qwen3 families, not phi3"):
        search.main(_search_args(folder, cal, tmp_path / "p.json"))
