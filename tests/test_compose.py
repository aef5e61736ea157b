"""A sharing policy composed with a cache method: specs, streamed scoring, and the evaluation stages."""

from __future__ import annotations

import json

import pytest
import torch

from kvsharer import SharingPolicy
from kvsharer.cli import main as cli
from kvsharer.cache.compose import CacheMethod, apply_setting, split_setting
from kvsharer.cache.hooks import attached_methods
from kvsharer.stages import evaluate_harness, evaluate_longctx, evaluate_ppl
from kvsharer.evaluate.ppl import perplexity
from kvsharer.evaluate.streaming import streamed_logits
from kvsharer.methods.intra import stored_tokens

from conftest import make_tiny

SHARING_MAP = [0, 1, 2, 1, 4, 4, 2, 0]


# ------------------------------------------------------------------------------------------------
# specs
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, family, name, value, label", [
    ("h2o:0.5", "intra", "h2o", 0.5, "h2o-0.5"),
    ("PyramidInfer:0.25", "intra", "pyramidinfer", 0.25, "pyramidinfer-0.25"),
    ("kvmerger:128", "intra", "kvmerger", 128, "kvmerger-128"),
    ("int4", "quant", "int4", 4, "int4"),
    ("int8", "quant", "int8", 8, "int8"),
    ("minicache:0.25", "minicache", "minicache", 0.25, "minicache-0.25"),
])
def test_spec_parses_and_its_label_round_trips(spec, family, name, value, label):
    method = CacheMethod.parse(spec)
    assert (method.family, method.name, method.value, method.label) == (family, name, value, label)
    assert CacheMethod.from_label(label) == method
    assert split_setting(f"r0.25_dissimilar_euclidean_T0.5_s0+{label}") == ("r0.25_dissimilar_euclidean_T0.5_s0", method)


def test_no_method_and_bad_specs():
    assert CacheMethod.parse("none") is None and CacheMethod.parse(None) is None
    assert split_setting("plain") == ("plain", None)
    for bad, words in [("h2o", "expected none"), ("h2o:0", "fraction kept"), ("h2o:1.5", "fraction kept"),
                       ("h3o:0.5", "unknown method"), ("int3", "int2"), ("minicache:0.9", "(0, 0.5]"),
                       ("h2o:half", "not a number")]:
        with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
            CacheMethod.parse(bad)


def test_minicache_is_not_stacked_on_sharing():
    with pytest.raises(ValueError, match="without --policy"):
        CacheMethod.parse("minicache:0.25").check_policy(SharingPolicy(SHARING_MAP))
    CacheMethod.parse("minicache:0.25").check_policy(SharingPolicy.identity(8))  # nothing shared: fine


# ------------------------------------------------------------------------------------------------
# streamed scoring
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def windows():
    g = torch.Generator().manual_seed(3)
    return torch.randint(3, 96, (3, 48), generator=g)


@pytest.mark.parametrize("share", [False, True])
def test_streaming_without_a_cache_method_equals_one_forward(windows, share):
    model = make_tiny("llama")
    policy = SharingPolicy(SHARING_MAP) if share else None
    with apply_setting(model, policy, None):
        one = perplexity(model, windows, batch_size=2)
        for chunk in (1, 7, 16):
            streamed = perplexity(model, windows, batch_size=2, chunk=chunk)
            assert streamed["tokens_scored"] == one["tokens_scored"] == 3 * 47
            assert streamed["nll_sum"] == pytest.approx(one["nll_sum"], rel=1e-5)
        with torch.no_grad():
            full = model(input_ids=windows, use_cache=False).logits
        torch.testing.assert_close(streamed_logits(model, windows, 10), full, rtol=1e-4, atol=1e-4)


def test_streaming_sees_eviction_and_a_full_budget_changes_nothing(windows):
    model = make_tiny("llama")
    plain = perplexity(model, windows, batch_size=3)
    with apply_setting(model, None, CacheMethod.parse("h2o:1.0")):
        kept_all = perplexity(model, windows, batch_size=3, chunk=8)
    with apply_setting(model, None, CacheMethod.parse("h2o:0.25")):
        evicted = perplexity(model, windows, batch_size=3, chunk=8)
        one_pass = perplexity(model, windows, batch_size=3)  # never reads a cache: blind to eviction
    assert kept_all["nll_sum"] == pytest.approx(plain["nll_sum"], rel=1e-5)
    assert one_pass["nll_sum"] == pytest.approx(plain["nll_sum"], rel=1e-5)
    assert abs(evicted["nll_sum"] - plain["nll_sum"]) > 1e-3 * plain["nll_sum"]


def test_sharing_and_eviction_compose_in_one_cache(windows):
    from transformers.cache_utils import DynamicCache

    model = make_tiny("llama")
    with apply_setting(model, SharingPolicy(SHARING_MAP), CacheMethod.parse("h2o:16")):
        cache = DynamicCache(config=model.config)
        for start in range(0, 48, 8):
            with torch.no_grad():
                model(input_ids=windows[:, start:start + 8], past_key_values=cache, use_cache=True)
    stored = stored_tokens(cache)
    assert [s is None for s in stored] == [m != i for i, m in enumerate(SHARING_MAP)]  # sharers store nothing
    assert {s for s in stored if s is not None} == {16}  # every source at its budget after each chunk


def test_a_prefill_then_chunks_reads_the_compressed_prefill(windows):
    from kvsharer.evaluate.streaming import first_scored_position, scored_logits

    model = make_tiny("llama")
    with torch.no_grad():
        full = model(input_ids=windows, use_cache=False).logits
    # no method: any schedule is one forward (its positions from the prefill's end on)
    torch.testing.assert_close(streamed_logits(model, windows, 8, prefill=30), full[:, 30:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(scored_logits(model, windows, 30), full[:, 30:], rtol=1e-4, atol=1e-4)
    with apply_setting(model, None, CacheMethod.parse("h2o:0.25")):
        logits = streamed_logits(model, windows, 8, prefill=30)
        one_pass = scored_logits(model, windows, 30)  # no chunk: never reads a cache
    # every position after the prefill reads the evicted prefill
    assert (logits - full[:, 30:]).abs().amax(dim=-1).min() > 1e-3
    torch.testing.assert_close(one_pass, full[:, 30:], rtol=1e-4, atol=1e-4)
    # right padding (zeros): the shortest row bounds the prefill
    batch = torch.tensor([[5, 6, 7, 8, 9, 0, 0, 0], [1, 2, 3, 4, 5, 6, 7, 8]])
    assert first_scored_position(batch, 2) == 3
    assert first_scored_position(batch, 9) == 0 and first_scored_position(batch, None) == 0


def test_lm_eval_scores_every_continuation_from_the_compressed_context():
    """A padded batch of requests with unequal contexts and continuations: with eviction, no request's
    log-likelihood is the plain model's (none was scored inside the prefill); keeping everything changes none."""
    from lm_eval.models.huggingface import HFLM

    from kvsharer.evaluate.harness import scoring_lm
    from conftest import make_tokenizer

    model, tokenizer = make_tiny("llama"), make_tokenizer()
    g = torch.Generator().manual_seed(5)
    requests = [(("", ""), torch.randint(3, 96, (n,), generator=g).tolist(),
                 torch.randint(3, 96, (k,), generator=g).tolist()) for n, k in [(40, 1), (33, 3), (25, 6), (44, 2)]]

    def scores(spec, chunk):
        lm = scoring_lm(HFLM, chunk)(pretrained=model, tokenizer=tokenizer, batch_size=4)
        with apply_setting(model, None, CacheMethod.parse(spec) if spec else None):
            return [ll for ll, _ in lm._loglikelihood_tokens(requests, disable_tqdm=True)]

    reference = [ll for ll, _ in HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)._loglikelihood_tokens(
        requests, disable_tqdm=True)]  # lm-eval's own, every position's logits
    plain = scores(None, None)  # only the logits scored
    assert plain == pytest.approx(reference, rel=1e-5)
    assert scores("h2o:1.0", 8) == pytest.approx(plain, rel=1e-4)
    evicted = scores("h2o:0.25", 8)
    assert all(abs(e - p) > 1e-3 for e, p in zip(evicted, plain))


@pytest.mark.parametrize("share", [False, True])
def test_one_prefill_per_context_scores_every_choice_as_lm_eval_does(share):
    """Batch size 1: three multiple-choice items (a 30-40-token context, four choices of 1-4 tokens, two of them
    one-token) are scored from one prefill of each context. Without a cache method the log-likelihoods and
    greedy flags are lm-eval's own (one forward per choice over context + choice, with and without KV sharing);
    the model reads 45 % fewer tokens; with a cache method that keeps everything nothing changes, and with one
    that evicts every choice is scored from the compressed context."""
    from lm_eval.models.huggingface import HFLM

    from kvsharer.evaluate.harness import scoring_lm
    from conftest import make_tokenizer

    model, tokenizer = make_tiny("llama"), make_tokenizer()
    policy = SharingPolicy(SHARING_MAP) if share else None
    g = torch.Generator().manual_seed(7)
    requests = []
    for n in (30, 36, 40):
        context = torch.randint(3, 96, (n,), generator=g).tolist()
        for k in (1, 1, 3, 4):
            requests.append((("", ""), context, torch.randint(3, 96, (k,), generator=g).tolist()))
    tokens_read = []
    counter = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: tokens_read.append(kwargs["input_ids"].shape[1]), with_kwargs=True)

    def scores(lm_class, spec=None, chunk=None):
        tokens_read.clear()
        lm = lm_class(pretrained=model, tokenizer=tokenizer, batch_size=1)
        with apply_setting(model, policy, CacheMethod.parse(spec) if spec else None):
            return lm._loglikelihood_tokens(requests, disable_tqdm=True), sum(tokens_read)

    reference, reference_tokens = scores(HFLM)
    plain, plain_tokens = scores(scoring_lm(HFLM, None))
    counter.remove()
    assert [ll for ll, _ in plain] == pytest.approx([ll for ll, _ in reference], rel=1e-5, abs=1e-4)
    assert [greedy for _, greedy in plain] == [greedy for _, greedy in reference]
    # lm-eval: 3 one-token groups of one forward + 6 forwards of context + choice; ours: context - 1 once, then
    # the last context token alone (the one-token choices) and with each longer choice but its last token
    assert plain_tokens == sum(n - 1 + 1 + 3 + 4 for n in (30, 36, 40))
    assert plain_tokens < 0.6 * reference_tokens
    kept, _ = scores(scoring_lm(HFLM, 2), "h2o:1.0", 2)
    assert [ll for ll, _ in kept] == pytest.approx([ll for ll, _ in plain], rel=1e-4, abs=1e-4)
    evicted, _ = scores(scoring_lm(HFLM, 2), "h2o:0.25", 2)
    assert all(abs(e - p) > 1e-3 for (e, _), (p, _) in zip(evicted, plain))


# ------------------------------------------------------------------------------------------------
# the stages
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    from kvsharer.data import load_corpus, split_corpus

    path = tmp_path_factory.mktemp("text") / "evaluation.txt"
    path.write_text(split_corpus(load_corpus("embedded:pydoc"), 0.5)[1])
    return path


def run_stage(argv):
    assert cli(argv) == 0
    return json.loads(open(argv[argv.index("--out") + 1]).read())


def test_ppl_stage_streams_with_a_cache_method(tiny_model_dir, heldout, tmp_path):
    base = ["evaluate-ppl", "--model", str(tiny_model_dir), "--text", str(heldout), "--window", "64",
            "--max-tokens", "256", "--batch-size", "4"]
    plain = run_stage(base + ["--out", str(tmp_path / "plain.json")])
    full = run_stage(base + ["--cache", "h2o:1.0", "--chunk", "16", "--out", str(tmp_path / "full.json")])
    half = run_stage(base + ["--cache", "h2o:0.5", "--chunk", "16", "--out", str(tmp_path / "half.json")])
    assert (plain["cache"], plain["chunk"]) == (None, None)
    assert (half["cache"], half["cache_family"], half["chunk"]) == ("h2o:0.5", "intra", 16)
    assert full["ppl"] == pytest.approx(plain["ppl"], rel=1e-5)
    assert abs(half["ppl"] - plain["ppl"]) > 1e-3 * plain["ppl"]
    # the cache of one 64-token window: everything, or half of every layer's tokens
    assert plain["kv_fraction"] == full["kv_fraction"] == 1.0
    assert half["kv_fraction"] == 0.5 and half["kv_bytes"] * 2 == half["kv_bytes_plain"]


@pytest.fixture
def no_model_load(monkeypatch):
    for module in (evaluate_ppl, evaluate_harness, evaluate_longctx):
        monkeypatch.setattr(module, "load_model", lambda *a, **k: pytest.fail("model loaded"))


@pytest.mark.parametrize("stage, extra", [
    ("evaluate-ppl", ["--text", "embedded:pydoc"]),
    ("evaluate-longctx", ["--text", "embedded:pydoc", "--lengths", "64"]),
    ("evaluate-harness", ["--tasks", "kvs_cloze"]),
])
@pytest.mark.parametrize("cache, with_policy", [("h2o:2.5", False), ("minicache:0.25", True), ("int5", False)])
def test_bad_settings_are_refused_before_loading(tiny_model_dir, tmp_path, no_model_load, stage, extra, cache,
                                                 with_policy, caplog):
    policy = tmp_path / "policy.json"
    SharingPolicy(SHARING_MAP).to_json(policy)
    argv = [stage, "--model", str(tiny_model_dir), *extra, "--cache", cache, "--out", str(tmp_path / "x.json")]
    assert cli(argv + (["--policy", str(policy)] if with_policy else [])) == 2
    assert "cache spec" in caplog.text or "without --policy" in caplog.text
    assert not (tmp_path / "x.json").exists()


def test_quantization_composes_with_sharing_in_a_streamed_score(windows):
    """int8 barely moves the PPL, int2 moves it more; with sharing, sharers store nothing and the bytes
    are the shape's prediction."""
    model = make_tiny("llama")
    plain = perplexity(model, windows, batch_size=3)
    drift = {}
    for bits in (8, 2):
        with apply_setting(model, None, CacheMethod.parse(f"int{bits}")):
            drift[bits] = abs(perplexity(model, windows, batch_size=3, chunk=8)["nll_sum"] - plain["nll_sum"])
    assert 0 < 10 * drift[8] < drift[2]  # (only tokens older than the 32-token exact window are quantized)
    policy = SharingPolicy(SHARING_MAP)
    with apply_setting(model, policy, CacheMethod.parse("int4")):
        quant_shared = perplexity(model, windows, 3, 8)
    with apply_setting(model, None, CacheMethod.parse("int4")):
        quant_alone = perplexity(model, windows, 3, 8)
    assert quant_shared["kv_bytes"] * 8 == quant_alone["kv_bytes"] * 4  # 4 of 8 layers store
    assert quant_alone["kv_fraction"] < 1.0


def test_minicache_is_seen_by_a_streamed_score_and_holds_fewer_bytes(windows):
    model = make_tiny("llama")
    plain = perplexity(model, windows, batch_size=3)
    with apply_setting(model, SharingPolicy.identity(8), CacheMethod.parse("minicache:0.25")):
        merged = perplexity(model, windows, batch_size=3, chunk=8)
        held = perplexity(model, windows, 3, 8)
        assert [type(m).__name__ for m in attached_methods(model)] == ["MiniCache"]  # the identity policy: no sharing
    assert abs(merged["nll_sum"] - plain["nll_sum"]) > 1e-3 * plain["nll_sum"]
    assert 0.75 < held["kv_fraction"] < 1.0  # 2 of 8 layers merged, minus magnitudes and retained tokens
