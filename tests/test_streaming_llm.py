"""StreamingLLM (attention sinks + recent window) against a slow reference of its rule, alone and
composed with KV sharing, through the CLI."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from conftest import VOCAB, make_tiny
from masked_reference import reference_new_logits

from kvsharer import SharingPolicy, cache_nbytes, share_kv
from kvsharer.cli import main as cli
from kvsharer.methods.intra import Budget, CompressedLayer, StreamingLLM, compress_kv
from kvsharer.models.loading import kv_shape
from kvsharer.cache.sharing import SharedLayer

SHARING_MAP = [0, 1, 2, 1, 4, 4, 2, 0]  # groups {0, 7}, {1, 3}, {2, 6}, {4, 5}
CHUNKS = [7, 5, 1, 9, 1, 1, 6]  # a prefill, chunks and single decoding steps through one cache


def reference_kept(chunks, budget, sinks):
    """The paper's rule written plainly: after every forward that leaves more than ``k`` tokens, keep
    the first ``min(sinks, k - 1)`` tokens still held and the most recent others. Positions per forward."""
    kept, seen, history = [], 0, []
    for q in chunks:
        kept += list(range(seen, seen + q))
        seen += q
        k = Budget.parse(budget).keep(seen)
        if len(kept) > k:
            s = min(sinks, k - 1)
            kept = kept[:s] + kept[len(kept) - (k - s):]
        history.append(list(kept))
    return history


def _stream(model, tokens, chunks):
    """Feed ``tokens`` chunk by chunk through one cache; the cache after each forward."""
    cache, start = None, 0
    for q in chunks:
        cache = model(tokens[:, start:start + q], past_key_values=cache, use_cache=True).past_key_values
        start += q
        yield cache


@pytest.mark.parametrize("sharing", [False, True])
@pytest.mark.parametrize("budget, sinks", [(0.5, 4), (10, 4), (6, 2), (3, 4), (0.3, 0)])
def test_kept_positions_follow_the_papers_rule(budget, sinks, sharing):
    model = make_tiny("llama")
    policy = SharingPolicy(SHARING_MAP) if sharing else None
    tokens = torch.randint(3, VOCAB, (2, sum(CHUNKS)), generator=torch.Generator().manual_seed(4))
    expected = reference_kept(CHUNKS, budget, sinks)
    with compress_kv(model, StreamingLLM(budget, sinks=sinks), policy=policy):
        for cache, kept in zip(_stream(model, tokens, CHUNKS), expected):
            for layer in cache.layers:
                if isinstance(layer, CompressedLayer):
                    assert layer.positions.tolist() == [kept, kept]


def test_composed_with_sharing_one_physical_cache_per_group_and_its_bytes():
    model = make_tiny("llama")
    policy = SharingPolicy(SHARING_MAP)
    n_layers, kv_heads, head_dim = kv_shape(model)
    tokens = torch.randint(3, VOCAB, (2, 30), generator=torch.Generator().manual_seed(1))
    with compress_kv(model, StreamingLLM(12), policy=policy):
        cache = model(tokens).past_key_values
    groups = policy.groups()
    for idx, layer in enumerate(cache.layers):
        if idx in groups:
            assert isinstance(layer, CompressedLayer) and layer.group == groups[idx] and layer.stored == 12
        else:
            assert isinstance(layer, SharedLayer) and layer.source is cache.layers[SHARING_MAP[idx]]
    assert cache_nbytes(cache) == 2 * len(groups) * 2 * kv_heads * 12 * head_dim * 4  # fp32, 4 physical caches


@pytest.mark.parametrize("sharing", [False, True])
def test_decoding_after_eviction_attends_to_sinks_and_window_only(sharing):
    """The logits of new tokens equal the plain model's with each query masked to the kept positions."""
    model = make_tiny("qwen2")
    policy = SharingPolicy(SHARING_MAP) if sharing else None
    share_map = policy.map if policy else list(range(8))
    full = torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(8))
    with compress_kv(model, StreamingLLM(8, sinks=3), policy=policy):
        cache = model(full[:, :17]).past_key_values
        kept = {i: layer.positions.clone() for i, layer in enumerate(cache.layers) if isinstance(layer, CompressedLayer)}
        assert all(k[0].tolist() == [0, 1, 2, 12, 13, 14, 15, 16] for k in kept.values())
        got = model(full[:, 17:], past_key_values=cache).logits
    with share_kv(model, policy) if policy else contextlib.nullcontext():
        ref = reference_new_logits(model, full, kept, share_map, 3)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_bad_sinks_are_refused():
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="sinks"):
            StreamingLLM(0.5, sinks=bad)


def test_ppl_stage_runs_it_from_its_spec(tiny_model_dir, tmp_path):
    from kvsharer.data import load_corpus, split_corpus

    text = tmp_path / "heldout.txt"
    text.write_text(split_corpus(load_corpus("embedded:pydoc"), 0.5)[1])
    out = tmp_path / "ppl.json"
    argv = ["evaluate-ppl", "--model", str(tiny_model_dir), "--text", str(text), "--window", "64",
            "--max-tokens", "128", "--batch-size", "2", "--cache", "streamingllm:0.5", "--chunk", "16",
            "--out", str(out)]
    assert cli(argv) == 0
    result = json.loads(out.read_text())
    assert (result["cache"], result["cache_family"], result["chunk"]) == ("streamingllm:0.5", "intra", 16)
    assert result["kv_fraction"] == 0.5
