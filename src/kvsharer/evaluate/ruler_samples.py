"""RULER's samples, generated once per length from the model's tokenizer and checked before the model loads.

lm-eval's RULER generators size every sample to ``max_seq_lengths`` with the tokenizer they load from the
model folder (``AutoTokenizer``, remote code trusted). Two of them fail on a length too short for their
prompt with that tokenizer, and neither says so:

- ``ruler_cwe`` lists at least 10 words x 6 repeats plus a worked example. When that does not fit beside
  its 120 answer tokens it falls back to zero words: every sample's ``outputs`` is empty and lm-eval's
  ``string_match_all`` divides by zero after the whole run. When even the bare prompt does not fit, its
  sampler loops for ever.
- ``ruler_fwe`` shrinks its coded text until the prompt fits and loops for ever when its bare template
  is longer than the length.
- ``ruler_vt`` puts a worked example (sized to 500 tokens) before each sample of at least 10 noise lines
  and loops for ever when they do not fit; when the worked example alone does not fit its 500 tokens
  (a tokenizer that spends many tokens a word), it loops for ever at any length.

:func:`build_ruler_tasks` probes the three with lm-eval's own templates (milliseconds), then builds every
length's tasks (the generation itself: seconds to minutes) and checks that every sample has an expected
answer, raising one ValueError that names each task and length. The built tasks are what
``simple_evaluate`` then runs, so the data is generated once per job.
"""

from __future__ import annotations

import contextlib
import random

from .ruler import ruler_metadata

CWE_MIN_WORDS = 10  # ruler_cwe's first step (and the 10 common words it asks for)
CWE_DRAWS = 8  # seeded draws of ruler_cwe's words (their token counts differ by ~10 %)
SEEDS = {"random": 0, "numpy": 1234}  # what lm-eval's simple_evaluate seeds before it builds a task's data
VT_EXAMPLE_LENGTH, VT_EXAMPLE_NOISES, VT_MIN_NOISES = 500, 5, 10  # ruler_vt's worked example, its samples' first step
NEVER = 1 << 40  # a floor no length reaches (the generator's own worked example does not fit)
FLOORED = ("ruler_cwe", "ruler_fwe", "ruler_vt")  # the tasks :func:`prompt_floor` knows a floor of


def missing_answers(docs: list[dict]) -> int:
    """Samples without an expected string (RULER's score divides by their count)."""
    return sum(1 for doc in docs if not doc.get("outputs"))


@contextlib.contextmanager
def _random_state_kept(*generators):
    """Leave Python's global ``random`` and ``generators`` as they were (the probes draw words from them; the
    samples built after must be those lm-eval builds without a probe)."""
    states = [random.getstate(), *(g.getstate() for g in generators)]
    try:
        yield
    finally:
        random.setstate(states[0])
        for generator, state in zip(generators, states[1:]):
            generator.setstate(state)


def prompt_floor(name: str, tokenizer) -> int | None:
    """Tokens ``name``'s shortest answerable sample needs with ``tokenizer`` (None: no known floor). For
    ruler_cwe, the largest of ``CWE_DRAWS`` seeded draws of its words (lm-eval draws them at random)."""
    if name == "ruler_cwe":
        from lm_eval.tasks.ruler import cwe_utils

        def measured(seed: int) -> int:  # what its sizing loop measures: worked example, list and answer
            random.seed(seed)
            example, text, answer = cwe_utils.generate_input_output(CWE_MIN_WORDS, 1024)
            answers = " ".join(f"{i + 1}. {word}" for i, word in enumerate(answer))
            return len(tokenizer(example + "\n" + text + " " + answers).input_ids)

        with _random_state_kept(cwe_utils.RNG):
            return max(measured(seed) for seed in range(CWE_DRAWS)) + cwe_utils.CONFIG["tokens_to_generate"]
    if name == "ruler_vt":
        from lm_eval.tasks.ruler import vt_utils

        answer_tokens = vt_utils.CONFIG["variable_tracking"]["tokens_to_generate"]
        with _random_state_kept():
            random.seed(0)
            example, value = vt_utils.generate_input_output(VT_EXAMPLE_NOISES, 1, 4, is_icl=True)
            text, _ = vt_utils.generate_input_output(VT_MIN_NOISES, 1, 4)
        example_tokens = len(tokenizer(example + f" {value}").input_ids)
        if example_tokens + answer_tokens > VT_EXAMPLE_LENGTH:  # its worked example never fits: it loops
            return NEVER
        return len(tokenizer(text).input_ids) + answer_tokens + example_tokens
    if name == "ruler_fwe":
        from lm_eval.tasks.ruler import fwe_utils

        return len(tokenizer(fwe_utils.TEMPLATE.format(context="", query="")).input_ids) + 1
    return None


def too_short(names: list[str], lengths: list[int], tokenizer) -> list[str]:
    """``"<task> at <length> tokens (needs about N ...)"`` for every task and length whose prompt does not fit
    with ``tokenizer`` (lm-eval would give its samples no answer, or never finish generating them)."""
    floors = {name: prompt_floor(name, tokenizer) for name in names}

    def needs(name: str) -> str:
        if floors[name] == NEVER:
            return f"its worked example does not fit its {VT_EXAMPLE_LENGTH} tokens with this tokenizer: any length"
        return f"needs about {floors[name]} with this tokenizer"

    return [f"{name} at {length} tokens ({needs(name)})"
            for length in lengths for name in names if floors[name] is not None and length < floors[name]]


def build_ruler_tasks(names: list[str], lengths: list[int], tokenizer_dir: str) -> dict[int, tuple]:
    """``{length: (TaskManager, {name: lm-eval Task})}`` with every sample generated, or ValueError naming
    each task and length whose samples would have no expected answer (or whose generator would never end)."""
    import numpy
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks.ruler.common_utils import get_tokenizer

    short = too_short(names, lengths, get_tokenizer(tokenizer_dir))
    if short:
        raise ValueError(f"RULER length(s) too short for the task's prompt with the tokenizer of {tokenizer_dir}: "
                         f"{'; '.join(short)}. Give longer --max-seq-lengths (evaluation.ruler.lengths) or leave "
                         f"the task out")
    built, empty = {}, []
    for length in lengths:
        manager = TaskManager(metadata=ruler_metadata(length, tokenizer_dir))
        random.seed(SEEDS["random"])  # as simple_evaluate does before building: the same samples as lm-eval's run
        numpy.random.seed(SEEDS["numpy"])
        built[length] = manager, manager.load(names)["tasks"]
        for name, task in built[length][1].items():
            docs = list(task.test_docs() if task.has_test_docs() else task.validation_docs())
            if missing := missing_answers(docs):
                empty.append(f"{name} at {length} tokens ({missing} of {len(docs)} samples)")
    if empty:
        raise ValueError(f"RULER samples without an expected answer (the prompt leaves no room for the task's "
                         f"content with the tokenizer of {tokenizer_dir}): {'; '.join(empty)}. Give longer "
                         f"--max-seq-lengths (evaluation.ruler.lengths) or leave the task out")
    return built
