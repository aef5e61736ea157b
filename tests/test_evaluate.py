"""Evaluation stages on the tiny model folder: perplexity, lm-eval harness (local tasks), passkey retrieval.

Every stage runs through ``kvsharer.cli.main`` and is judged by the JSON it writes.
"""

from __future__ import annotations

import contextlib
import json
import random
import socket

import pytest
import torch
import torch.nn.functional as F
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvsharer import SharingPolicy
from kvsharer.cache import sharing
from kvsharer.cli import main as cli
from kvsharer.data import load_corpus, split_corpus, token_chunks
from kvsharer.stages import evaluate_harness, evaluate_longctx, evaluate_ppl
from kvsharer.evaluate.longctx import INSTRUCTION, NEEDLE, QUESTION, passkey_prompt, sentence_ends
from kvsharer.evaluate.passages import PASSAGE_WORDS, SENTENCE_QUESTION, WORD_QUESTION, followers, passages
from kvsharer.evaluate.ruler import OFFLINE
from kvsharer.evaluate.tasks import BUILDERS

SHARING_MAP = [0, 1, 2, 1, 4, 4, 2, 0]  # 4 of 8 layers read an earlier layer's KV


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    """The evaluation half of the embedded corpus, as a text file."""
    _, evaluation = split_corpus(load_corpus("embedded:pydoc"), 0.5)
    path = tmp_path_factory.mktemp("text") / "evaluation.txt"
    path.write_text(evaluation)
    return path


@pytest.fixture(scope="module")
def policy_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("policy") / "policy.json"
    SharingPolicy(SHARING_MAP).to_json(path)
    return path


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, heldout):
    out = tmp_path_factory.mktemp("tasks") / "seed0"
    assert cli(["make-tasks", "--text", str(heldout), "--out-dir", str(out), "--seed", "0"]) == 0
    return out


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails a test whose stage loads a model: bad input must be refused before that."""
    calls = []
    for module in (evaluate_ppl, evaluate_harness, evaluate_longctx):
        monkeypatch.setattr(module, "load_model", lambda *a, **k: calls.append(a) or pytest.fail("model loaded"))
    return calls


@pytest.fixture
def sharing_spy(monkeypatch):
    """Records, per ``share_kv`` use of a stage, the map and how often each skipped K/V projection ran:
    proof that the stage's forwards really ran under the policy."""
    uses = []
    real_share_kv = sharing.share_kv

    @contextlib.contextmanager
    def spy(model, policy):
        with real_share_kv(model, policy) as attached:
            projections = attached.skipped_projections()
            yield attached
            uses.append((list(policy.map), [p.calls for p in projections]))

    monkeypatch.setattr(sharing, "share_kv", spy)  # what the stages' apply_setting attaches
    return uses


def read(path):
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------------
# evaluate-ppl
# ------------------------------------------------------------------------------------------------


def run_ppl(model_dir, text, out, *extra):
    argv = ["evaluate-ppl", "--model", str(model_dir), "--text", str(text), "--window", "64",
            "--max-tokens", "1024", "--batch-size", "5", "--out", str(out), *extra]
    assert cli(argv) == 0
    return read(out)


def test_ppl_identity_equals_direct_cross_entropy(tiny_model_dir, heldout, tmp_path):
    result = run_ppl(tiny_model_dir, heldout, tmp_path / "ppl.json")
    assert (result["windows"], result["window"], result["tokens_scored"]) == (16, 64, 16 * 63)
    assert result["map"] == list(range(8)) and result["rate"] == 0 and result["num_shared"] == 0
    assert result["model"] == str(tiny_model_dir)

    # independently: the plain model, the first 16 x 64 tokens, each window on its own
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = token_chunks(tokenizer, heldout.read_text(), 16, 64)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    nll = F.cross_entropy(logits[:, :-1].double().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert result["ppl"] == pytest.approx(torch.exp(nll).item(), rel=1e-5)
    assert result["nll_mean"] == pytest.approx(nll.item(), rel=1e-5)


def test_ppl_changes_under_a_sharing_policy(tiny_model_dir, heldout, policy_file, tmp_path):
    plain = run_ppl(tiny_model_dir, heldout, tmp_path / "plain.json")
    shared = run_ppl(tiny_model_dir, heldout, tmp_path / "shared.json", "--policy", str(policy_file))
    assert shared["map"] == SHARING_MAP and shared["num_shared"] == 4 and shared["rate"] == 0.5
    assert shared["policy"] == str(policy_file)
    assert shared["tokens_scored"] == plain["tokens_scored"]
    assert abs(shared["ppl"] - plain["ppl"]) > 1e-3 * plain["ppl"]
    assert (plain["kv_fraction"], shared["kv_fraction"]) == (1.0, 0.5)  # 4 of 8 layers store nothing


def test_ppl_bad_window_is_refused_before_loading(tiny_model_dir, heldout, tmp_path, no_model_load):
    argv = ["evaluate-ppl", "--model", str(tiny_model_dir), "--text", str(heldout), "--window", "1",
            "--out", str(tmp_path / "x.json")]
    assert cli(argv) == 2
    assert not no_model_load and not (tmp_path / "x.json").exists()


def test_second_corpus_is_other_text_and_labels_its_ppl(tiny_model_dir, heldout, tmp_path, no_model_load):
    docstrings = load_corpus("embedded:docstrings")
    assert len(docstrings) > 100_000 and docstrings == load_corpus("embedded:docstrings")
    pydoc = load_corpus("embedded:pydoc")
    # no paragraph of the second corpus is in the language reference (calibration and main held-out text)
    paragraphs = [p for p in docstrings.split("\n\n") if len(p) > 200]
    assert len(paragraphs) > 100 and not any(p in pydoc for p in paragraphs[:200])
    no_model_load.clear()
    assert cli(["evaluate-ppl", "--model", str(tiny_model_dir), "--text", "embedded:docstrings", "--corpus", "doc s",
                "--out", str(tmp_path / "x.json")]) == 2
    assert not no_model_load


def test_ppl_on_a_labelled_corpus(tiny_model_dir, tmp_path):
    result = run_ppl(tiny_model_dir, "embedded:docstrings", tmp_path / "ppl_docstrings.json", "--corpus", "docstrings")
    assert result["corpus"] == "docstrings" and result["text"] == "embedded:docstrings" and result["windows"] == 16


# ------------------------------------------------------------------------------------------------
# make-tasks
# ------------------------------------------------------------------------------------------------


def test_make_tasks_items_are_four_way_true_and_deterministic(task_dir, heldout, tmp_path):
    flat_text = " ".join(heldout.read_text().split())
    manifest = read(task_dir / "tasks.json")
    assert set(manifest["tasks"]) == set(BUILDERS) == {"kvs_next_sentence", "kvs_cloze", "kvs_passage_sentence",
                                                       "kvs_passage_word"}
    for name, info in manifest["tasks"].items():
        config = yaml.safe_load((task_dir / f"{name}.yaml").read_text())
        data_file = config["dataset_kwargs"]["data_files"]["test"]
        assert config["task"] == name and config["dataset_path"] == "json"
        assert data_file == str((task_dir / f"{name}.jsonl").resolve()) and data_file.startswith("/")
        items = [json.loads(line) for line in (task_dir / f"{name}.jsonl").read_text().splitlines()]
        assert len(items) == info["items"] >= 50
        for item in items:
            choices, label = item["choices"], item["label"]
            assert len(choices) == 4 and 0 <= label < 4
            assert len({c.lower() for c in choices}) == 4  # the answer appears exactly once
            if not name.startswith("kvs_passage"):  # (passage items: test_passage_items_...)
                answer = choices[label] + ("." if name == "kvs_cloze" else "")
                assert item["context"] + " " + answer in flat_text  # it really follows the context
        assert len({item["label"] for item in items}) == 4  # answers sit in every position

    again, other = tmp_path / "again", tmp_path / "other"
    assert cli(["make-tasks", "--text", str(heldout), "--out-dir", str(again), "--seed", "0"]) == 0
    assert cli(["make-tasks", "--text", str(heldout), "--out-dir", str(other), "--seed", "1"]) == 0
    for name in BUILDERS:
        data = (task_dir / f"{name}.jsonl").read_text()
        assert (again / f"{name}.jsonl").read_text() == data
        assert (other / f"{name}.jsonl").read_text() != data


def test_passages_are_consecutive_paragraphs_within_the_word_bounds(heldout):
    text = heldout.read_text()
    found = passages(text, *PASSAGE_WORDS)
    assert len(found) >= 50
    flat = " ".join(text.split())
    last = -1
    for passage, sentences in found:
        assert PASSAGE_WORDS[0] <= len(passage.split()) <= PASSAGE_WORDS[1]
        for paragraph in passage.split("\n\n"):
            at = flat.find(paragraph, last + 1)
            assert at > last  # paragraphs of the text, in order, never reused by a later passage
            last = at
        assert all(passage[at : at + len(s)] == s for s, _, at in sentences)
    with pytest.raises(ValueError, match="passage bounds"):
        passages(text, 300, 200)


def load_items(task_dir, name):
    return [json.loads(line) for line in (task_dir / f"{name}.jsonl").read_text().splitlines()]


def test_passage_items_ask_about_the_early_part_of_a_long_context(task_dir, heldout, tiny_model_dir):
    """The answer is in the passage's first half, hundreds of tokens before the choice is scored (outside a
    streamed chunk and the quantizer's exact window), and only the passage tells it from the distractors."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = heldout.read_text()
    after = followers(text)

    def n_tokens(s):
        return len(tokenizer(s, add_special_tokens=False)["input_ids"])

    for name, question in (("kvs_passage_sentence", SENTENCE_QUESTION), ("kvs_passage_word", WORD_QUESTION)):
        items = load_items(task_dir, name)
        assert len(items) >= 50 and len({item["label"] for item in items}) == 4
        for item in items:
            choices, answer = item["choices"], item["choices"][item["label"]]
            distractors = [c for i, c in enumerate(choices) if i != item["label"]]
            if name == "kvs_passage_sentence":
                passage = item["context"].removesuffix(question)
                assert passage != item["context"]
                assert passage.count(answer) == 1 and passage.index(answer) == item["answer_at"]
                assert not any(d in passage for d in distractors)  # and nothing else of the passage
                n = len(answer.split())
                assert all(0.5 * n <= len(d.split()) <= 2 * n for d in distractors)  # no length give-away
            else:
                passage, _, phrase = item["context"].rpartition(question.split("{")[0])
                phrase = phrase.removeprefix('"')
                assert len(phrase.split()) == 6 and passage.count(phrase) == 1
                assert passage[item["answer_at"] - len(phrase) - 1 :].startswith(f"{phrase} {answer}")
                assert not any(f"{phrase} {d}" in passage for d in distractors)
                # every choice follows the phrase's last word somewhere: that word alone does not tell
                assert set(choices) <= after[phrase.split()[-1].lower()]
            assert PASSAGE_WORDS[0] <= len(passage.split()) <= PASSAGE_WORDS[1]
            assert item["answer_at"] < len(passage) / 2
            # hundreds of tokens between the answer in the passage and the end of the context
            assert n_tokens(item["context"]) - n_tokens(item["context"][: item["answer_at"]]) >= 128
            assert n_tokens(item["context"]) >= 300


def test_make_tasks_passage_words_bounds_the_passages(heldout, tmp_path, no_model_load):
    out = tmp_path / "short"
    assert cli(["make-tasks", "--text", str(heldout), "--out-dir", str(out), "--passage-words", "60,90"]) == 0
    manifest = read(out / "tasks.json")
    assert manifest["passage_words"] == [60, 90]
    for name in ("kvs_passage_sentence", "kvs_passage_word"):
        items = load_items(out, name)
        assert manifest["tasks"][name]["items"] == len(items) > 100  # smaller passages: more of them
        assert all(len(item["context"].split()) <= 90 + 15 for item in items)
    assert cli(["make-tasks", "--text", str(heldout), "--out-dir", str(tmp_path / "x"), "--passage-words", "90"]) == 2
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------
# evaluate-harness
# ------------------------------------------------------------------------------------------------


def test_harness_runs_local_tasks_offline(tiny_model_dir, task_dir, policy_file, tmp_path, monkeypatch, sharing_spy):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)  # the stage sets them; restored after the test
    attempts = []
    real_connect = socket.socket.connect

    def guarded_connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError(f"test: network access to {address}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    out = tmp_path / "harness.json"
    argv = ["evaluate-harness", "--model", str(tiny_model_dir), "--tasks", "kvs_next_sentence,kvs_cloze",
            "--task-dir", str(task_dir), "--limit", "6", "--batch-size", "8", "--policy", str(policy_file),
            "--out", str(out)]
    assert cli(argv) == 0
    result = read(out)
    assert set(result["tasks"]) == {"kvs_next_sentence", "kvs_cloze"}
    for metrics in result["tasks"].values():
        assert metrics["samples"] == 6
        assert 0.0 <= metrics["acc"] <= 1.0 and 0.0 <= metrics["acc_norm"] <= 1.0
        assert metrics["acc_stderr"] >= 0
    assert result["map"] == SHARING_MAP and result["num_shared"] == 4
    (share_map, calls), = sharing_spy
    assert share_map == SHARING_MAP and min(calls) > 0  # lm-eval's forwards ran under the policy
    assert not attempts


def test_harness_unknown_task_is_refused_before_loading(tiny_model_dir, task_dir, tmp_path, caplog, no_model_load):
    argv = ["evaluate-harness", "--model", str(tiny_model_dir), "--tasks", "kvs_cloze,hellaswag,kvs_nope,zzz_task",
            "--task-dir", str(task_dir), "--out", str(tmp_path / "x.json")]
    assert cli(argv) == 2
    assert not no_model_load and not (tmp_path / "x.json").exists()
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "kvs_nope, zzz_task" in errors[0]
    assert "hellaswag" not in errors[0].split(";")[0]  # a real lm-eval task is known


def test_harness_runs_offline_ruler_tasks_per_length_with_their_own_metric(tiny_model_dir, task_dir, policy_file,
                                                                            tmp_path, sharing_spy):
    out = tmp_path / "ruler.json"
    argv = ["evaluate-harness", "--model", str(tiny_model_dir), "--tasks", "niah_single_1,kvs_passage_word",
            "--task-dir", str(task_dir), "--max-seq-lengths", "500,400", "--limit", "2", "--batch-size", "2",
            "--policy", str(policy_file), "--out", str(out)]
    assert cli(argv) == 0
    result = read(out)
    assert result["max_seq_lengths"] == [400, 500] and set(result["ruler_seconds_by_length"]) == {"400", "500"}
    ruler = result["tasks"]["niah_single_1"]
    assert ruler["metric"] == "string_match_all" and "acc" not in ruler
    assert set(ruler["by_length"]) == {"400", "500"}  # --limit counts per length
    assert all(cell["samples"] == 2 and 0.0 <= cell["score"] <= 1.0 for cell in ruler["by_length"].values())
    assert ruler["samples"] == 4
    assert ruler["score"] == pytest.approx(sum(c["score"] for c in ruler["by_length"].values()) / 2)
    assert result["tasks"]["kvs_passage_word"]["samples"] == 2 and "acc" in result["tasks"]["kvs_passage_word"]
    (share_map, calls), = sharing_spy
    assert share_map == SHARING_MAP and min(calls) > 0


def test_harness_max_length_truncates_long_prompts_from_the_left(tiny_model_dir, heldout, tmp_path, caplog):
    """LongBench's rule (evaluate_longbench --max-length): a prompt longer than the cap loses its start, the
    question at its end stays; the group stand-in is scored by its `score` aggregate."""
    import logging

    from kvsharer.evaluate.standin_tasks import MAX_GEN_TOKENS, write_standins

    write_standins({"longbench": "generation_group"}, heldout.read_text(), 0, 1, tmp_path / "tasks")
    out = tmp_path / "longbench.json"
    argv = ["evaluate-harness", "--model", str(tiny_model_dir), "--tasks", "standin_longbench",
            "--task-dir", str(tmp_path / "tasks"), "--max-length", "160", "--limit", "1", "--out", str(out)]
    with caplog.at_level(logging.WARNING):
        assert cli(argv) == 0
    result = read(out)
    assert result["max_length"] == 160
    assert result["scores"]["standin_longbench"]["kind"] == "group"
    assert result["scores"]["standin_longbench"]["metric"] == "score"
    truncated = [r.getMessage() for r in caplog.records if "Left truncation applied" in r.getMessage()]
    assert truncated  # the four subtasks' prompts (hundreds of words each) are one batch here
    assert all(f"truncating to last {160 - MAX_GEN_TOKENS} tokens" in m for m in truncated)


@pytest.mark.parametrize("tasks, extra, expected", [
    ("kvs_cloze", ["--max-length", "4096"], "--max-length 4096 exceeds the model's window of 512"),
    ("kvs_cloze", ["--max-length", "8"], "--max-length must be at least 64"),
    ("niah_single_1,niah_single_2,ruler_qa_squad", [], "niah_single_2: Paul Graham essays; ruler_qa_squad: SQuAD"),
    ("ruler", [], "ruler: the whole group"),
    ("kvs_cloze", ["--max-seq-lengths", "400"], "RULER tasks only"),
    ("niah_single_1", ["--max-seq-lengths", "400,600"], "600 exceed the model's window of 512"),
    ("niah_single_1", ["--max-seq-lengths", "4k"], "comma-separated list of token counts"),
    # the tiny tokenizer spends ~1,600 tokens on ruler_cwe's 10-word prompt: lm-eval would give every sample an
    # empty answer list and divide by zero after the run (the Qwen2.5 stand-in's rehearsal at 1,024 tokens)
    ("niah_single_1,ruler_cwe", ["--max-seq-lengths", "512"], "ruler_cwe at 512 tokens (needs about"),
    # ruler_fwe's bare template (~260 tokens here) and ruler_vt's worked example (~700 of its 500) never fit:
    # lm-eval's generators would loop for ever
    ("ruler_fwe", ["--max-seq-lengths", "256"], "ruler_fwe at 256 tokens (needs about"),
    ("ruler_vt", ["--max-seq-lengths", "512"], "ruler_vt at 512 tokens (its worked example does not fit"),
])
def test_harness_ruler_bad_input_is_refused_before_loading(tiny_model_dir, task_dir, tmp_path, caplog, no_model_load,
                                                           tasks, extra, expected):
    argv = ["evaluate-harness", "--model", str(tiny_model_dir), "--tasks", tasks, "--task-dir", str(task_dir), *extra,
            "--out", str(tmp_path / "x.json")]
    assert cli(argv) == 2
    assert not no_model_load and not (tmp_path / "x.json").exists()
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and expected in errors[0]
    if "download" in errors[0]:
        assert all(name in errors[0] for name in OFFLINE) and "niah_single_1:" not in errors[0]


def test_ruler_samples_without_an_answer_are_refused_after_generation(tiny_model_dir, monkeypatch):
    """The check behind the prompt probes: with the probe switched off, ruler_cwe at 512 tokens generates
    samples that all lack an expected answer, and the build says so by task and length (lm-eval would divide
    by zero after the whole run)."""
    from kvsharer.evaluate import ruler_samples

    monkeypatch.setattr(ruler_samples, "prompt_floor", lambda name, tokenizer: None)
    with pytest.raises(ValueError, match=r"ruler_cwe at 512 tokens \(500 of 500 samples\)"):
        ruler_samples.build_ruler_tasks(["ruler_cwe"], [512], str(tiny_model_dir))


def test_ruler_tasks_are_built_once_per_length_with_answers(tiny_model_dir):
    from kvsharer.evaluate.ruler_samples import build_ruler_tasks, missing_answers

    built = build_ruler_tasks(["niah_single_1", "niah_multikey_2"], [400, 500], str(tiny_model_dir))
    assert sorted(built) == [400, 500]
    for length, (manager, tasks) in built.items():
        assert sorted(tasks) == ["niah_multikey_2", "niah_single_1"]
        docs = list(tasks["niah_single_1"].test_docs())
        assert docs and missing_answers(docs) == 0 and all(doc["max_length"] == length for doc in docs)
    # seeded as lm-eval's simple_evaluate seeds before it builds: the same samples whatever ran before
    random.seed(123)
    again = build_ruler_tasks(["niah_single_1"], [400], str(tiny_model_dir))[400][1]["niah_single_1"]
    assert list(again.test_docs()) == list(built[400][1]["niah_single_1"].test_docs())


# ------------------------------------------------------------------------------------------------
# evaluate-longctx
# ------------------------------------------------------------------------------------------------


def test_passkey_prompt_has_the_length_and_the_needle_at_the_depth(tiny_model_dir, heldout):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    haystack = tokenizer(heldout.read_text()[:20000], add_special_tokens=False)["input_ids"]
    ends = sentence_ends(tokenizer, haystack)

    def n_tokens(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    head = len(tokenizer("")["input_ids"]) + n_tokens(INSTRUCTION)
    needle, question = n_tokens(NEEDLE.format(key=12345)), n_tokens(QUESTION)
    n_fill = 400 - head - needle - question
    positions = {}
    for depth in (0.0, 0.5, 1.0):
        ids, at = passkey_prompt(tokenizer, haystack, ends, 0, 400, depth, 12345)
        assert len(ids) == 400
        assert tokenizer.decode(ids[at : at + needle]) == NEEDLE.format(key=12345)
        assert tokenizer.decode(ids[-question:]) == QUESTION
        positions[depth] = at - head
    assert positions[0.0] == 0 and positions[1.0] == n_fill
    assert abs(positions[0.5] / n_fill - 0.5) < 0.15  # the sentence boundary nearest to the middle
    with pytest.raises(ValueError, match="too short"):
        passkey_prompt(tokenizer, haystack, ends, 0, head, 0.5, 12345)


def test_longctx_covers_the_grid(tiny_model_dir, heldout, policy_file, tmp_path, sharing_spy):
    out = tmp_path / "longctx.json"
    argv = ["evaluate-longctx", "--model", str(tiny_model_dir), "--text", str(heldout), "--lengths", "200,400",
            "--depths", "0,0.5,1", "--trials", "2", "--max-new-tokens", "6", "--policy", str(policy_file),
            "--out", str(out)]
    assert cli(argv) == 0
    result = read(out)
    cells = {(c["length"], c["depth"]): c for c in result["cells"]}
    assert set(cells) == {(n, d) for n in (200, 400) for d in (0.0, 0.5, 1.0)} and len(result["cells"]) == 6
    for cell in cells.values():
        assert cell["trials"] == 2 and 0 <= cell["correct"] <= 2 and cell["accuracy"] == cell["correct"] / 2
        assert len(cell["outputs"]) == 2 and all(10000 <= o["key"] <= 99999 for o in cell["outputs"])
    assert 0.0 <= result["accuracy"] <= 1.0 and result["trials_total"] == 12
    assert result["map"] == SHARING_MAP and result["rate"] == 0.5
    (share_map, calls), = sharing_spy
    assert share_map == SHARING_MAP and min(calls) >= 6  # at least one forward per cell, all under the policy


def test_longctx_length_beyond_the_window_is_refused_before_loading(tiny_model_dir, heldout, tmp_path, caplog,
                                                                    no_model_load):
    argv = ["evaluate-longctx", "--model", str(tiny_model_dir), "--text", str(heldout), "--lengths", "200,600",
            "--depths", "0.5", "--out", str(tmp_path / "x.json")]
    assert cli(argv) == 2
    assert not no_model_load and not (tmp_path / "x.json").exists()
    assert any("600" in r.getMessage() and "512" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")


def test_harness_scores_a_group_by_its_aggregate_and_a_tag_by_its_tasks(tiny_model_dir, task_dir, tmp_path):
    """A real lm-eval group (local YAML with an aggregate) and a tag: the result holds one score per requested
    name, the group's being lm-eval's size-weighted aggregate of its subtasks, not the subtasks themselves."""
    import shutil

    import yaml

    local = tmp_path / "tasks"
    shutil.copytree(task_dir, local)
    (local / "kvs_both.yaml").write_text(yaml.safe_dump({
        "group": "kvs_both", "task": ["kvs_next_sentence", "kvs_cloze"],
        "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}]}))
    out = tmp_path / "harness.json"
    argv = ["evaluate-harness", "--model", str(tiny_model_dir), "--tasks", "kvs_both", "--task-dir", str(local),
            "--limit", "6", "--batch-size", "8", "--out", str(out)]
    assert cli(argv) == 0
    result = read(out)
    scores = result["scores"]
    assert set(scores) == {"kvs_both"}
    group = scores["kvs_both"]
    assert (group["kind"], group["metric"], group["label"], group["subtasks"]) == ("group", "acc", "acc", 2)
    subtasks = [result["tasks"][t]["acc"] for t in ("kvs_next_sentence", "kvs_cloze")]
    assert group["value"] == pytest.approx(sum(subtasks) / 2)  # 6 samples each: equal weights
    out2 = tmp_path / "tag.json"
    argv[argv.index("kvs_both")] = "kvsharer_demo"
    assert cli(argv[:-1] + [str(out2)]) == 0
    tag = read(out2)["scores"]
    assert set(tag) == {"kvs_next_sentence", "kvs_cloze", "kvs_passage_word", "kvs_passage_sentence"}
    assert {s["kind"] for s in tag.values()} == {"subtask of kvsharer_demo"}


def test_one_token_answers_follow_the_tokenizer(heldout, task_dir, tmp_path):
    """--single-token-words: every kvs_passage_word choice is one token of that tokenizer (so lm-eval scores an
    item's four choices from one forward); without it the same text yields multi-token choices too."""
    from conftest import make_tokenizer

    tokenizer = make_tokenizer(2000)
    tokenizer.save_pretrained(tmp_path / "tok")
    out = tmp_path / "one-token"
    assert cli(["make-tasks", "--text", str(heldout), "--out-dir", str(out),
                "--single-token-words", str(tmp_path / "tok")]) == 0

    def tokens(word):
        return len(tokenizer(" " + word, add_special_tokens=False)["input_ids"])

    items = load_items(out, "kvs_passage_word")
    assert len(items) >= 20 and all(tokens(c) == 1 for item in items for c in item["choices"])
    assert any(tokens(c) > 1 for item in load_items(task_dir, "kvs_passage_word") for c in item["choices"])
    assert read(out / "tasks.json")["single_token_words"] == str(tmp_path / "tok")
    # the other tasks do not depend on the tokenizer
    assert (out / "kvs_cloze.jsonl").read_text() == (task_dir / "kvs_cloze.jsonl").read_text()
    assert cli(["make-tasks", "--text", str(heldout), "--out-dir", str(tmp_path / "x"),
                "--single-token-words", str(tmp_path / "nowhere")]) == 2
