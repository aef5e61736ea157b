"""Stage ``make-tasks``: local multiple-choice lm-eval tasks built from held-out text (offline, seeded).

Writes, into one folder, JSONL data and an lm-eval YAML config per task (``data_files`` is an absolute
path, so the folder works as ``TaskManager(include_path=...)`` from anywhere) and ``tasks.json``:

* ``kvs_next_sentence`` — given one to three consecutive sentences, pick the sentence that really follows
  among four (three distractors are sentences from other paragraphs). HellaSwag-like.
* ``kvs_cloze`` — given a sentence (and the one before it) without its final word, pick that word among
  four (three distractors are final words of other sentences). LAMBADA-like, as multiple choice.

Their contexts are short (about 25 tokens): they fit inside one streamed chunk, so they measure what
sharing costs in plain language modelling, and no cache method can move them. The long-context tasks
(:mod:`kvsharer.evaluate.passages`) ask about a passage of several hundred tokens:

* ``kvs_passage_sentence`` — which of four sentences appears in the passage.
* ``kvs_passage_word`` — which word followed a quoted phrase of the passage.

All carry the tag ``kvsharer_demo`` (``evaluate-harness --tasks kvsharer_demo`` runs them all). An item is
``{"context": str, "choices": [4 str], "label": int}`` (passage items add ``answer_at``, the answer's
character offset in the context); lm-eval scores ``context + " " + choice``.
Items are shuffled, so ``--limit N`` takes a sample spread over the whole text.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import random
import re
from pathlib import Path

from ..atomic import atomic_write_text
from ..data import check_text_source, load_corpus, sha256_text

log = logging.getLogger("kvsharer")

TAG = "kvsharer_demo"
CHOICES = 4
CONTEXT_SENTENCES = 3  # at most this many sentences before the one to predict

# a sentence ends at . ! or ? (possibly followed by a closing quote) before whitespace and a capital
SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"'’”)]))\s+(?=[A-Z])")
FINAL_WORD = re.compile(r"^(.*\S)\s+([A-Za-z]{3,})\.$")


def is_prose(sentence: str) -> bool:
    """A plain English sentence: 5-40 words, capitalised, ends with '.', mostly letters (no code)."""
    words = sentence.split()
    if not 5 <= len(words) <= 40 or not sentence[0].isupper() or not sentence.endswith("."):
        return False
    letters = sum(ch.isalpha() or ch == " " for ch in sentence)
    return letters / len(sentence) >= 0.85


def paragraphs(text: str) -> list[list[tuple[str, bool]]]:
    """Paragraphs (blank-line separated, whitespace collapsed) as lists of (sentence, is_prose)."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        flat = " ".join(block.split())
        if flat:
            out.append([(s, is_prose(s)) for s in SENTENCE_END.split(flat)])
    return out


def pick_distractors(rng: random.Random, pool: list[str], exclude: set[str], k: int) -> list[str]:
    """``k`` distinct entries of ``pool``, none in ``exclude`` (all compared case-insensitively)."""
    seen = {e.lower() for e in exclude}
    picked = []
    for candidate in rng.sample(pool, len(pool)):
        if candidate.lower() not in seen:
            picked.append(candidate)
            seen.add(candidate.lower())
            if len(picked) == k:
                return picked
    raise ValueError(f"the text is too small: fewer than {k} distinct distractors available")


def make_item(rng: random.Random, context: str, answer: str, distractors: list[str]) -> dict:
    label = rng.randrange(len(distractors) + 1)
    choices = list(distractors)
    choices.insert(label, answer)
    return {"context": context, "choices": choices, "label": label}


def next_sentence_items(text: str, seed: int) -> list[dict]:
    """One item per prose sentence that follows prose sentences of its paragraph (shuffled)."""
    rng = random.Random(f"{seed}:kvs_next_sentence")
    paras = paragraphs(text)
    pool = sorted({s for sentences in paras for s, prose in sentences if prose})
    items = []
    for sentences in paras:
        paragraph = {s for s, _ in sentences}
        for i, (target, prose) in enumerate(sentences):
            context = []
            for s, p in reversed(sentences[max(0, i - CONTEXT_SENTENCES) : i]):
                if not p:
                    break
                context.insert(0, s)
            if prose and context:
                distractors = pick_distractors(rng, pool, paragraph, CHOICES - 1)
                items.append(make_item(rng, " ".join(context), target, distractors))
    rng.shuffle(items)
    return items


def cloze_items(text: str, seed: int) -> list[dict]:
    """One item per prose sentence ending in a plain word (shuffled): the context is the previous prose
    sentence of the paragraph (when there is one) and the sentence up to that word; the answer is the word."""
    rng = random.Random(f"{seed}:kvs_cloze")
    candidates = []
    for sentences in paragraphs(text):
        for i, (sentence, prose) in enumerate(sentences):
            match = FINAL_WORD.match(sentence) if prose else None
            if match:
                previous = sentences[i - 1][0] + " " if i > 0 and sentences[i - 1][1] else ""
                candidates.append((previous + match.group(1), match.group(2)))
    pool = sorted({word for _, word in candidates})
    items = [make_item(rng, context, word, pick_distractors(rng, pool, {word}, CHOICES - 1))
             for context, word in candidates]
    rng.shuffle(items)
    return items


from .passages import PASSAGE_WORDS, passage_sentence_items, passage_word_items  # noqa: E402

# name -> (builder, description, whether it builds passages: takes passage_words=(min, max))
BUILDERS = {
    "kvs_next_sentence": (next_sentence_items, "pick the true next sentence among four", False),
    "kvs_cloze": (cloze_items, "pick the true final word of a sentence among four", False),
    "kvs_passage_sentence": (passage_sentence_items, "pick the sentence that appears in a passage of several "
                             "hundred tokens among four", True),
    "kvs_passage_word": (passage_word_items, "pick the word that followed a phrase of the passage's first half "
                         "among four", True),
}


ONE_TOKEN_ANSWERS = ("kvs_passage_word",)  # builders whose answers can be held to one token (--single-token-words)


def task_config(name: str, data_file: Path) -> dict:
    """lm-eval config of a local multiple-choice task reading ``data_file`` (an absolute path)."""
    return {
        "task": name,
        "tag": [TAG],
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_target": "label",
        "doc_to_choice": "choices",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
    }


# ------------------------------------------------------------------------------------------------
# stage make-tasks
# ------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text", required=True, help="held-out evaluation text: a file (or embedded:pydoc, hf:...)")
    parser.add_argument("--out-dir", required=True, type=Path, help="task folder (give it to evaluate-harness --task-dir)")
    parser.add_argument("--seed", type=int, default=0, help="seeds distractors, answer positions and item order")
    parser.add_argument("--max-items", type=int, default=1000, help="items per task at most")
    parser.add_argument("--passage-words", default=f"{PASSAGE_WORDS[0]},{PASSAGE_WORDS[1]}",
                        help="MIN,MAX words of a passage of the long-context tasks (default %(default)s: "
                             "about 330-640 SmolLM2 tokens)")
    parser.add_argument("--single-token-words", default=None, metavar="TOKENIZER",
                        help="a model folder: kvs_passage_word's answers and distractors are words this tokenizer "
                             "writes as one token, so lm-eval scores an item's four choices from one forward")
    parser.add_argument("--standins", default="",
                        help="NAME=KIND,...: also write stand-ins standin_NAME of lm-eval benchmarks, KIND one of "
                             "multiple_choice, group, generation (kvsharer.evaluate.standin_tasks)")


def one_token_words(model: str):
    """``word -> whether the model's tokenizer writes " word" (after a space, as a choice follows its
    question) as one token``."""
    from transformers import AutoTokenizer

    if not Path(model).is_dir():
        raise ValueError(f"--single-token-words {model} is not a model folder (prepare-model writes one)")
    tokenizer = AutoTokenizer.from_pretrained(model)

    @functools.lru_cache(maxsize=None)
    def one_token(word: str) -> bool:
        return len(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) == 1

    return one_token


def parse_passage_words(text: str) -> tuple[int, int]:
    try:
        low, high = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--passage-words must be MIN,MAX (two whole numbers), got {text!r}") from None
    if not 1 <= low <= high:
        raise ValueError(f"--passage-words must satisfy 1 <= MIN <= MAX, got {text!r}")
    return low, high


def main(args: argparse.Namespace) -> int:
    import yaml

    check_text_source(args.text)
    if args.max_items < 1:
        raise ValueError(f"--max-items must be at least 1, got {args.max_items}")
    passage_words = parse_passage_words(args.passage_words)
    from .standin_tasks import parse_standins, write_standins

    standins = parse_standins(args.standins)
    single_token = one_token_words(args.single_token_words) if args.single_token_words else None
    text = load_corpus(args.text)
    out_dir = args.out_dir.resolve()
    manifest = {"stage": "make-tasks", "text": args.text, "text_sha256": sha256_text(text), "seed": args.seed,
                "max_items": args.max_items, "passage_words": list(passage_words),
                "single_token_words": args.single_token_words, "tag": TAG,
                "task_dir": str(out_dir), "tasks": {}}
    for name, (build, description, long) in BUILDERS.items():
        options = {"single_token": single_token} if single_token and name in ONE_TOKEN_ANSWERS else {}
        items = (build(text, args.seed, passage_words, **options) if long else build(text, args.seed))[: args.max_items]
        if not items:
            raise ValueError(f"the text {args.text} yields no {name} items (too little prose)")
        data_file = out_dir / f"{name}.jsonl"
        config_file = out_dir / f"{name}.yaml"
        atomic_write_text(data_file, "".join(json.dumps(item) + "\n" for item in items))
        header = f"# {name}: {description} (python -m kvsharer make-tasks, seed {args.seed})\n"
        config = yaml.safe_dump(task_config(name, data_file), sort_keys=False, allow_unicode=True)
        atomic_write_text(config_file, header + config)
        manifest["tasks"][name] = {"items": len(items), "data": str(data_file), "config": str(config_file),
                                   "description": description}
        log.info("%s: %d items -> %s", name, len(items), config_file)
    if standins:
        manifest["standins"] = write_standins(standins, text, args.seed, args.max_items, out_dir)
        log.info("stand-ins of %s -> %s", ", ".join(standins), out_dir)
    atomic_write_text(out_dir / "tasks.json", json.dumps(manifest, indent=2) + "\n")
    return 0
