"""Every cache method gives the recorded logits, cache contents and bytes, bit for bit
(``tests/data/cache_method_reference.json``, written by ``tests/make_cache_method_reference.py``); and the
shape they share (``kvsharer.cache.method.KVMethod``): a new method is one subclass, which methods combine
is declared by the classes, detach restores the model, attaching twice is refused."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

import make_cache_method_reference as ref
from kvsharer import SharingPolicy, cache_nbytes, expected_kv_nbytes, quantize_kv, share_kv
from kvsharer.cache.assembly import source_of
from kvsharer.cache.compose import CacheMethod, apply_setting
from kvsharer.cache.hooks import attached_methods
from kvsharer.cache.method import CombinationError, KVMethod, check_combination
from kvsharer.cache.sharing import KVSharing, SharedLayer
from kvsharer.methods.intra import KVCompression
from kvsharer.methods.minicache import MiniCache
from kvsharer.methods.quant import KVQuantization
from kvsharer.models.loading import find_parts


@functools.lru_cache(maxsize=1)
def reference() -> dict:
    return json.loads(ref.REFERENCE.read_text())


@functools.lru_cache(maxsize=1)
def tiny(name: str):
    return ref.model(name)


def test_the_reference_covers_every_case():
    assert sorted(reference()) == sorted(ref.case_key(*case) for case in ref.cases())


@pytest.mark.parametrize("name, spec, share", ref.cases(), ids=[ref.case_key(*case) for case in ref.cases()])
def test_a_setting_gives_the_recorded_outputs(name, spec, share):
    """Exact where the numbers are integers (tokens, bytes, counts, classes), within ``ref.RTOL`` of each
    tensor's magnitude where they are floats (another CPU sums in another order)."""
    problems = ref.close(ref.record(tiny(name), spec, share), reference()[ref.case_key(name, spec, share)])
    assert not problems, "\n".join(problems[:8])


def test_the_comparison_catches_a_changed_number():
    """The tolerance is tight enough to fail: one logit of 7,680 moved by half the mean logit size fails, and so
    do two swapped ones (the sums cannot see that; the seeded ±1 projection does)."""
    want = reference()[ref.case_key("llama_mha", "none", False)]
    with torch.inference_mode():
        logits = tiny("llama_mha")(input_ids=ref.inputs()[0], use_cache=False).logits
    assert logits.numel() == 7680 and not ref.close(ref.digest(logits), want["one_pass"]["logits"])
    moved = logits.clone()
    moved[1, 20, 50] += 0.5 * logits.abs().mean()
    assert ref.close(ref.digest(moved), want["one_pass"]["logits"])
    swapped = logits.clone()
    order = swapped[1, 20].argsort()
    swapped[1, 20, order[0]], swapped[1, 20, order[-1]] = logits[1, 20, order[-1]], logits[1, 20, order[0]]
    assert ref.close(ref.digest(swapped), want["one_pass"]["logits"])


# ------------------------------------------------------------------------------------------------
# the shape: a new method is one subclass; combinations, detach and double attach are the base's
# ------------------------------------------------------------------------------------------------


class CountingLayer(DynamicLayer):
    """A plain cache layer that counts its updates."""

    def __init__(self):
        super().__init__()
        self.updates = 0

    def update(self, key_states, value_states, *args, **kwargs):
        self.updates += 1
        return super().update(key_states, value_states, *args, **kwargs)


class CountUpdates(KVMethod):
    """A toy cache method: every storing layer counts its updates; it composes with sharing."""

    title = "update counting"

    def build_layer(self, i, layers):
        return layers[i] if source_of(layers, i) != i else CountingLayer()


class RivalCount(CountUpdates):
    title = "rival counting"
    with_sharing = False


POLICY = SharingPolicy(ref.SHARING_MAP)


def _chunks(model, ids):
    """Logits of ``ids`` in chunks of 8 through one cache, and the cache."""
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        logits = [model(input_ids=ids[:, s : s + 8], past_key_values=cache, use_cache=True).logits
                  for s in range(0, ids.shape[1], 8)]
    return torch.cat(logits, dim=1), cache


def test_a_new_method_attaches_with_no_other_change():
    model = ref.model("llama_mha")
    ids = ref.inputs()[0]
    plain, _ = _chunks(model, ids)
    with CountUpdates(model) as counting:
        assert counting.attached and attached_methods(model) == [counting]
        alone, cache = _chunks(model, ids)
    assert torch.equal(alone, plain)
    assert all(type(layer) is CountingLayer and layer.updates == 5 for layer in cache.layers)  # 40 tokens / 8
    with share_kv(model, POLICY):
        shared, _ = _chunks(model, ids)
    with CountUpdates(model), share_kv(model, POLICY):  # attached in either order: sharing wires first
        both, cache = _chunks(model, ids)
    assert torch.equal(both, shared) and not torch.equal(both, plain)
    for layer, src in enumerate(ref.SHARING_MAP):
        if layer == src:
            assert type(cache.layers[layer]) is CountingLayer and cache.layers[layer].updates == 5
        else:  # a sharer reads its source's new layer
            assert isinstance(cache.layers[layer], SharedLayer) and cache.layers[layer].source is cache.layers[src]
    assert cache_nbytes(cache) * 8 == expected_kv_nbytes(model, None, 2, 40, 4) * 4  # 4 of 8 layers store


def test_which_methods_combine_is_declared_by_the_classes():
    model = ref.model("llama_mha")
    with share_kv(model, POLICY):
        with pytest.raises(CombinationError, match="rival counting is a rival of KV sharing"):
            RivalCount(model).attach()
        with CountUpdates(model):
            with pytest.raises(CombinationError, match="has update counting attached; KV quantization cannot be "
                                                       "combined with it"):
                quantize_kv(model, 4, group_size=16).__enter__()
    with RivalCount(model):
        with pytest.raises(CombinationError, match="rival counting is a rival of KV sharing"):
            share_kv(model, POLICY).__enter__()
    assert not attached_methods(model)
    # the same rule on classes, before any model: what a stage checks of --policy and --cache
    check_combination([KVSharing], KVQuantization)
    check_combination([KVSharing], CountUpdates)
    for rival in (MiniCache, RivalCount):
        with pytest.raises(CombinationError, match="rival of KV sharing"):
            check_combination([KVSharing], rival)
    with pytest.raises(CombinationError, match="one cache method at a time"):
        check_combination([KVCompression], KVQuantization)
    with pytest.raises(ValueError, match="MiniCache is a rival of KV sharing.*without --policy"):
        CacheMethod.parse("minicache:0.25").check_policy(POLICY)


def test_detach_restores_the_model():
    model = ref.model("qwen3_gqa")
    ids = ref.inputs()[0]
    config, decoder = model.config, model.get_decoder()
    projections = [(a.k_proj, a.v_proj) for a in find_parts(model).attentions]
    plain, _ = _chunks(model, ids)
    for spec in ("h2o:0.5", "int4", "none"):
        with apply_setting(model, POLICY, CacheMethod.parse(spec)):
            inside, _ = _chunks(model, ids)
            assert len(decoder._forward_pre_hooks) == len(decoder._forward_hooks) == 1  # one hook pair for all
        assert not torch.equal(inside, plain)
        assert not attached_methods(model) and not hasattr(model, "_kvsharer_hooks")
        assert not decoder._forward_pre_hooks and not decoder._forward_hooks
        assert model.config is config and all(m.config is config for m in model.modules() if hasattr(m, "config"))
        assert [(a.k_proj, a.v_proj) for a in find_parts(model).attentions] == projections
        assert not any(hasattr(m, "_kvsharer_intra") for m in model.modules())
        after, cache = _chunks(model, ids)
        assert torch.equal(after, plain) and all(type(layer) is DynamicLayer for layer in cache.layers)


def test_attaching_twice_is_refused_and_a_cache_is_wired_for_one_set_of_methods():
    model = ref.model("llama_mha")
    counting = CountUpdates(model).attach()
    with pytest.raises(RuntimeError, match="this CountUpdates is already attached"):
        counting.attach()
    with pytest.raises(CombinationError, match="already has update counting attached; detach it first"):
        CountUpdates(model).attach()
    _, cache = _chunks(model, ref.inputs()[0][:, :8])
    counting.detach()
    with share_kv(model, POLICY), pytest.raises(ValueError, match="wired for other cache methods"):
        model(input_ids=ref.inputs()[0][:, 8:16], past_key_values=cache)
    counting.attach()  # attachable again once detached
    assert attached_methods(model) == [counting]
    counting.detach()
    assert not counting.attached and not hasattr(model, "_kvsharer_hooks")
