"""lm-eval's RULER tasks (``lm_eval/tasks/ruler``) in ``evaluate-harness``: which run offline, their
lengths, their metric.

RULER generates its data from the model's tokenizer, sized to each requested sequence length
(``max_seq_lengths`` in the task metadata; lm-eval's default is 4096 only). The tasks below need nothing
but the tokenizer and local Python packages (``nltk``; ``ruler_cwe`` also ``wonderwords``): their
haystacks are a repeated sentence, distractor needles or random words. The other RULER tasks read the
Paul Graham essays (``niah_single_2/3``, ``niah_multikey_1``, ``niah_multiquery``, ``niah_multivalue``) or
SQuAD/HotpotQA (``ruler_qa_*``) from the hub, so they are refused before any model loads.

Every RULER task is ``generate_until``: the prompt is prefilled in one forward, the answer is decoded
greedily (a cache method compresses the cache after the prefill, as in ``evaluate-longctx``), and the
task's own metric is the fraction of the expected strings found in the answer, reported by lm-eval
under the *length* (``"1024"``, with ``-1`` for lengths without samples). Each length runs as its own
lm-eval evaluation, so ``--limit`` counts samples per length; :func:`ruler_metrics` folds the runs into
``{"score", "samples", "by_length": {"<length>": {"score", "score_stderr", "samples"}}}``.
"""

from __future__ import annotations

# offline RULER task -> what it asks (the haystack never leaves the machine)
OFFLINE = {
    "niah_single_1": "one 7-digit needle in a repeated-sentence haystack",
    "niah_multikey_2": "the needle of one key among distractor needles (numbers)",
    "niah_multikey_3": "the needle of one key among distractor needles (UUIDs; needs about 1000+ tokens)",
    "ruler_vt": "variable tracking: every variable bound to a value through a chain of assignments",
    "ruler_cwe": "common words extraction: the 10 most frequent words of a list",
    "ruler_fwe": "frequent words extraction: the 3 most frequent coded words",
}
# RULER tasks, groups and tags whose data comes from the hub
NEEDS_DOWNLOAD = {
    "niah_single_2": "Paul Graham essays", "niah_single_3": "Paul Graham essays",
    "niah_multikey_1": "Paul Graham essays", "niah_multiquery": "Paul Graham essays",
    "niah_multivalue": "Paul Graham essays", "ruler_qa_squad": "SQuAD", "ruler_qa_hotpot": "HotpotQA",
    "ruler": "the whole group, which includes the essay and QA tasks",
    "longcxt": "the tag of every RULER task, including the essay and QA tasks",
}
METRIC = "string_match_all"  # RULER's score: fraction of the expected strings the answer contains


def split_ruler(names: list[str]) -> tuple[list[str], list[str]]:
    """``(RULER task names, other names)``; ValueError for a RULER name whose data needs a download."""
    refused = [name for name in names if name in NEEDS_DOWNLOAD]
    if refused:
        why = "; ".join(f"{name}: {NEEDS_DOWNLOAD[name]}" for name in refused)
        raise ValueError(f"RULER task(s) that download their data cannot run offline ({why}); the offline RULER "
                         f"tasks are {', '.join(OFFLINE)}")
    return [n for n in names if n in OFFLINE], [n for n in names if n not in OFFLINE]


def parse_lengths(text: str | None, ruler_names: list[str]) -> list[int]:
    """``--max-seq-lengths``: sorted distinct lengths (default 4096, lm-eval's); only with RULER tasks."""
    if text is None:
        return [4096] if ruler_names else []
    if not ruler_names:
        raise ValueError(f"--max-seq-lengths applies to RULER tasks only ({', '.join(OFFLINE)}), none requested")
    try:
        lengths = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise ValueError(f"--max-seq-lengths must be a comma-separated list of token counts, got {text!r}") from None
    if not lengths or lengths[0] < 64:
        raise ValueError(f"--max-seq-lengths must name lengths of at least 64 tokens, got {text!r}")
    return lengths


def check_window(lengths: list[int], window: int | None) -> None:
    """A RULER sample of length L holds prompt and answer, so L must fit the model's window."""
    too_long = [n for n in lengths if window is not None and n > window]
    if too_long:
        raise ValueError(f"--max-seq-lengths {', '.join(map(str, too_long))} exceed the model's window of "
                         f"{window} tokens (max_position_embeddings)")


def ruler_metadata(length: int, tokenizer_dir: str) -> dict:
    """Task metadata of one RULER run: its length and the tokenizer that sizes the samples."""
    return {"max_seq_lengths": [length], "tokenizer": tokenizer_dir, "pretrained": tokenizer_dir}


def ruler_metrics(runs: dict[int, tuple[dict, int | None]]) -> dict:
    """Fold one task's runs ``{length: (flattened lm-eval metrics, samples)}`` into its result."""
    by_length = {}
    for length, (metrics, samples) in sorted(runs.items()):
        score = metrics.get(str(length))
        score = None if score is None or score < 0 else score  # -1: lm-eval saw no sample of this length
        by_length[str(length)] = {"score": score, "score_stderr": metrics.get(f"{length}_stderr"), "samples": samples}
    scored = [(m["score"], m["samples"]) for m in by_length.values() if m["score"] is not None and m["samples"]]
    total = sum(n for _, n in scored)
    return {"metric": METRIC, "score": sum(s * n for s, n in scored) / total if total else None,
            "samples": total, "by_length": by_length}
