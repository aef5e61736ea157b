"""Local multiple-choice lm-eval tasks built from held-out text (offline, seeded) (stage ``make-tasks``,
:mod:`kvsharer.stages.make_tasks`).

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

import json
import random
import re
from pathlib import Path

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
