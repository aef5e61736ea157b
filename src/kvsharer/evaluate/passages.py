"""Long-context multiple-choice items: a passage of held-out text, then a question about its first half.

The short tasks (:mod:`kvsharer.evaluate.tasks`) fit inside one streamed chunk, so no cache method can
change their scores. Here every context is a *passage* of several hundred tokens (consecutive paragraphs
of the held-out text, ``--passage-words`` words, about 1.3 tokens a word for prose) followed by a
question whose answer lies in the passage's first half: hundreds of tokens before the scored choice, far
outside a streamed chunk and the quantizer's exact recent window. A method that loses what the early
context said loses accuracy; the plain model answers by reading back (copying) from the passage.

* ``kvs_passage_sentence`` — "Which of these sentences appears in the passage above?": one sentence of
  the passage's first half among three prose sentences of similar length from elsewhere in the text
  (none of them in the passage). Without the passage all four are equally plausible.
* ``kvs_passage_word`` — the passage, then ``In the passage above, the words "<six words>`` taken from
  its first half (they occur once in the passage); pick the word that followed them. The distractors
  are words that follow the phrase's last word elsewhere in the text, so the phrase alone does not
  tell them apart. With ``single_token`` (a predicate, e.g. from the model's tokenizer) the answer and the
  distractors are words the tokenizer writes as one token: lm-eval then scores the four choices from one
  forward over the passage (its one-token-continuation cache), four times cheaper.

Passages do not overlap; each yields at most one item per task. Everything is seeded by ``seed``.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict


def _helpers():
    """The sentence helpers of :mod:`kvsharer.evaluate.tasks` (imported late: tasks lists these builders)."""
    from . import tasks

    return tasks

PASSAGE_WORDS = (220, 360)  # default bounds of a passage, in whitespace-separated words
PHRASE_WORDS = 6  # words quoted by a kvs_passage_word question
WORD = re.compile(r"^[A-Za-z]{3,}$")

SENTENCE_QUESTION = "\n\nQuestion: Which of these sentences appears in the passage above?\nAnswer:"
WORD_QUESTION = "\n\nIn the passage above, the words \"{phrase}"


def passages(text: str, min_words: int, max_words: int) -> list[tuple[str, list[tuple[str, bool, int]]]]:
    """Non-overlapping passages of consecutive paragraphs with ``min_words``..``max_words`` words, as
    ``(passage text, [(sentence, is_prose, offset of the sentence in the passage)])``. Paragraphs are
    joined by a blank line; a run of paragraphs that overshoots ``max_words`` is skipped."""
    if not 1 <= min_words <= max_words:
        raise ValueError(f"passage bounds must satisfy 1 <= min <= max words, got {min_words}, {max_words}")
    out: list = []
    paragraphs = _helpers().paragraphs
    blocks: list[list[tuple[str, bool]]] = []
    words = 0
    for para in paragraphs(text):
        blocks.append(para)
        words += sum(len(s.split()) for s, _ in para)
        if words < min_words:
            continue
        if words <= max_words:
            out.append(_join(blocks))
        blocks, words = [], 0
    return out


def _join(blocks: list[list[tuple[str, bool]]]) -> tuple[str, list[tuple[str, bool, int]]]:
    text, sentences = "", []
    for b, para in enumerate(blocks):
        if b:
            text += "\n\n"
        for k, (sentence, prose) in enumerate(para):
            if k:
                text += " "
            sentences.append((sentence, prose, len(text)))
            text += sentence
    return text, sentences


def early_prose(passage: str, sentences: list[tuple[str, bool, int]]) -> list[str]:
    """Prose sentences that start in the passage's first half and occur in it exactly once."""
    return [s for s, prose, at in sentences if prose and at < len(passage) / 2 and passage.count(s) == 1]


def passage_sentence_items(text: str, seed: int, passage_words: tuple[int, int] = PASSAGE_WORDS) -> list[dict]:
    """One item per passage with an early prose sentence (shuffled); see the module docstring."""
    t = _helpers()
    rng = random.Random(f"{seed}:kvs_passage_sentence")
    pool = sorted({s for para in t.paragraphs(text) for s, prose in para if prose})
    items = []
    for passage, sentences in passages(text, *passage_words):
        candidates = early_prose(passage, sentences)
        if not candidates:
            continue
        answer = rng.choice(candidates)
        n = len(answer.split())
        outside = [s for s in pool if s not in passage]
        similar = [s for s in outside if 0.75 * n <= len(s.split()) <= 1.34 * n]
        distractors = t.pick_distractors(rng, similar if len(similar) >= 3 * t.CHOICES else outside, {answer},
                                         t.CHOICES - 1)
        item = t.make_item(rng, passage + SENTENCE_QUESTION, answer, distractors)
        items.append({**item, "answer_at": passage.index(answer)})
    rng.shuffle(items)
    return items


def followers(text: str) -> dict[str, set[str]]:
    """``word (lower case) -> {plain words that follow it somewhere in the text}``."""
    out: dict[str, set[str]] = defaultdict(set)
    words = text.split()
    for a, b in zip(words, words[1:]):
        if WORD.match(b):
            out[a.lower()].add(b)
    return out


def passage_word_items(text: str, seed: int, passage_words: tuple[int, int] = PASSAGE_WORDS,
                       single_token=None) -> list[dict]:
    """One item per passage with a usable early phrase (shuffled); see the module docstring.
    ``single_token(word)``: whether a word is one token (answers and distractors must be; None: any word)."""
    keep = single_token or (lambda word: True)
    t = _helpers()
    rng = random.Random(f"{seed}:kvs_passage_word")
    after = followers(text)
    items = []
    for passage, sentences in passages(text, *passage_words):
        candidates = []  # (phrase, answer, plausible distractors, the answer's offset)
        for sentence in early_prose(passage, sentences):
            words = sentence.split()
            for j in range(PHRASE_WORDS, len(words)):
                phrase, answer = " ".join(words[j - PHRASE_WORDS : j]), words[j]
                if not WORD.match(answer) or passage.count(phrase) != 1 or not keep(answer):
                    continue
                at = passage.index(f"{phrase} {answer}") + len(phrase) + 1
                if at >= len(passage) / 2:
                    break  # the rest of the sentence lies in the second half
                others = sorted({w for w in after[words[j - 1].lower()] if w.lower() != answer.lower()
                                 and f"{phrase} {w}" not in passage and keep(w)})
                if len({w.lower() for w in others}) >= t.CHOICES - 1:
                    candidates.append((phrase, answer, others, at))
        if not candidates:
            continue
        phrase, answer, others, at = rng.choice(candidates)
        distractors = t.pick_distractors(rng, others, {answer}, t.CHOICES - 1)
        item = t.make_item(rng, passage + WORD_QUESTION.format(phrase=phrase), answer, distractors)
        items.append({**item, "answer_at": at})
    rng.shuffle(items)
    return items
