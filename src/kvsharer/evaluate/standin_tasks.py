"""Local stand-ins of lm-eval benchmarks, of the same structure, built from held-out text (offline, seeded).

A rehearsal of the paper run (:mod:`kvsharer.rehearsal`) replaces each lm-eval name of the config by
``standin_<name>``, of the kind the real benchmark is in lm-eval's registry (:func:`kind_of`):

* ``group`` (mmlu, cmmlu: a group reported by its aggregate): a group ``standin_<name>`` of
  ``GROUP_SUBTASKS`` multiple-choice subtasks ``standin_<name>_<i>`` and an ``aggregate_metric_list``
  (``acc``, mean weighted by subtask size), as lm-eval's mmlu has: the table shows the group's aggregate;
* ``generation`` (xsum: generate a text, scored by ROUGE): a ``generate_until`` task whose context is three
  consecutive sentences and whose reference is the sentence that follows; scored by ``rougeL`` (F1,
  ``rouge_score``) through a ``process_results`` function written next to the YAML;
* ``generation_group`` (longbench: a group of long-context generation tasks whose aggregate is their own
  ``score``): a group of ``GROUP_SUBTASKS`` ``generate_until`` subtasks, each item a passage of at least
  ``LONG_CONTEXT_WORDS`` words followed by a question about a sentence inside it (the sentence that follows a
  quoted one), scored by ``rougeL`` under the name ``score``, aggregated like LongBench's (unweighted mean);
* ``multiple_choice`` (every other benchmark): four choices, ``acc``; items of the next-sentence and cloze
  kinds of :mod:`kvsharer.evaluate.tasks`, each stand-in from its own seed.

``make-tasks --standins hellaswag=multiple_choice,mmlu=group,xsum=generation`` writes them next to the
``kvs_*`` tasks.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

from ..atomic import atomic_write_text
from .tasks import cloze_items, next_sentence_items, paragraphs, task_config

PREFIX = "standin_"
KINDS = ("multiple_choice", "group", "generation", "generation_group")
GROUP_SUBTASKS = 4  # subtasks of a group stand-in (mmlu has 57 subjects: the structure, not the count)
CONTEXT_SENTENCES = 3  # sentences before the one a generation item asks for
MAX_GEN_TOKENS = 32
LONG_CONTEXT_WORDS = 300  # words of a generation_group item's passage at least (LongBench's are thousands)

# the process_results function of the generation stand-ins (lm-eval imports it from the task folder)
ROUGE_MODULE = "standin_rouge"
ROUGE_SOURCE = '''"""rougeL of a generation stand-in (written by python -m kvsharer make-tasks --standins)."""
from kvsharer.evaluate.standin_tasks import rouge_results as process_results  # noqa: F401
'''
# ... and of a generation_group subtask, under LongBench's metric name
SCORE_MODULE = "standin_score"
SCORE_SOURCE = '''"""rougeL as `score` of a generation_group stand-in (written by python -m kvsharer make-tasks --standins)."""
from kvsharer.evaluate.standin_tasks import score_results as process_results  # noqa: F401
'''


def kind_of(needs) -> str:
    """The stand-in kind of an lm-eval name from its ``lm_tasks.TaskNeeds``: a group with an ``acc`` aggregate is
    a ``group``, one with another aggregate (LongBench's ``score``) a ``generation_group``; a task reported by ``acc`` is ``multiple_choice``; any other task (a generation metric) is
    ``generation``."""
    if needs.kind == "group":
        return "group" if needs.metric == "acc" else "generation_group"
    if needs.kind != "task":
        raise ValueError(f"lm-eval name {needs.name!r} is a {needs.kind}: no single score to stand in for")
    return "multiple_choice" if needs.metric == "acc" else "generation"


def parse_standins(text: str) -> dict[str, str]:
    """``"hellaswag=multiple_choice,mmlu=group"`` -> ``{"hellaswag": "multiple_choice", "mmlu": "group"}``."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, kind = part.partition("=")
        if not name or kind not in KINDS:
            raise ValueError(f"--standins entry {part!r} is not NAME=KIND with KIND one of {', '.join(KINDS)}")
        out[name] = kind
    return out


def rouge_l(target: str, answer: str) -> float:
    """rougeL F1 of a generated text vs the reference."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False).score(target, answer.strip())["rougeL"].fmeasure


def rouge_results(doc: dict, results: list[str]) -> dict:
    """lm-eval ``process_results`` of a generation stand-in: ``rougeL``."""
    return {"rougeL": rouge_l(doc["target"], results[0])}


def score_results(doc: dict, results: list[str]) -> dict:
    """lm-eval ``process_results`` of a generation_group subtask: rougeL under LongBench's metric name ``score``."""
    return {"score": rouge_l(doc["target"], results[0])}


def generation_items(text: str, seed: int) -> list[dict]:
    """``{"context", "target"}``: three consecutive prose sentences, and the prose sentence after them."""
    items = []
    for sentences in paragraphs(text):
        for i in range(CONTEXT_SENTENCES, len(sentences)):
            window = sentences[i - CONTEXT_SENTENCES : i + 1]
            if all(prose for _, prose in window):
                context = " ".join(s for s, _ in window[:-1])
                items.append({"context": f"{context}\nNext sentence:", "target": window[-1][0]})
    random.Random(f"{seed}:generation").shuffle(items)
    return items


def long_generation_items(text: str, seed: int) -> list[dict]:
    """``{"context", "target"}``: a passage of consecutive paragraphs (``LONG_CONTEXT_WORDS`` words at least),
    then a question quoting one of its prose sentences; the target is the sentence that follows it there."""
    rng, items, passage = random.Random(f"{seed}:long_generation"), [], []
    for paragraph in paragraphs(text):
        passage.append(paragraph)
        sentences = [s for p in passage for s in p]
        if sum(len(s.split()) for s, _ in sentences) < LONG_CONTEXT_WORDS:
            continue
        pairs = [i for i in range(len(sentences) - 1) if sentences[i][1] and sentences[i + 1][1]]
        if pairs:
            i = rng.choice(pairs)
            body = "\n\n".join(" ".join(s for s, _ in p) for p in passage)
            items.append({"context": f"{body}\n\nIn the text above, which sentence follows \"{sentences[i][0]}\"?\n"
                                     "Answer:", "target": sentences[i + 1][0]})
        passage = []
    rng.shuffle(items)
    return items


def generation_config(name: str, data_file: Path, metric: str = "rougeL", module: str = ROUGE_MODULE) -> str:
    """lm-eval YAML of a generation stand-in (text: the ``!function`` tag is not plain YAML)."""
    config = {
        "task": name, "dataset_path": "json", "dataset_name": None,
        "dataset_kwargs": {"data_files": {"test": str(data_file)}}, "test_split": "test",
        "output_type": "generate_until", "doc_to_text": "{{context}}", "doc_to_target": "{{target}}",
        "generation_kwargs": {"until": ["\n"], "do_sample": False, "max_gen_toks": MAX_GEN_TOKENS},
        "metric_list": [{"metric": metric, "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    return (yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
            + f"process_results: !function {module}.process_results\n")


def group_config(name: str, subtasks: list[str], metric: str = "acc", weight_by_size: bool = True) -> dict:
    return {"group": name, "task": subtasks,
            "aggregate_metric_list": [{"metric": metric, "aggregation": "mean", "weight_by_size": weight_by_size}],
            "metadata": {"version": 1.0}}


def mc_config(name: str, data_file: Path) -> str:
    """lm-eval YAML of a multiple-choice stand-in: a ``make-tasks`` task without the demo tag."""
    config = task_config(name, data_file)
    del config["tag"]
    return yaml.safe_dump(config, sort_keys=False, allow_unicode=True)


def _mc_items(text: str, seed: int, which: int) -> list[dict]:
    return (next_sentence_items if which % 2 == 0 else cloze_items)(text, seed)


def write_standins(standins: dict[str, str], text: str, seed: int, max_items: int, out_dir: Path) -> dict:
    """Write every stand-in's data and YAML into ``out_dir``; ``{standin name: manifest entry}``."""
    manifest = {}

    def write_task(name: str, items: list[dict], config_text: str, description: str) -> None:
        if not items:
            raise ValueError(f"the held-out text yields no items for {name} (too little prose)")
        data_file = out_dir / f"{name}.jsonl"
        atomic_write_text(data_file, "".join(json.dumps(item) + "\n" for item in items))
        atomic_write_text(out_dir / f"{name}.yaml", f"# {name}: {description} (make-tasks --standins)\n" + config_text)
        manifest[name] = {"items": len(items), "data": str(data_file), "config": str(out_dir / f"{name}.yaml"),
                          "description": description}

    for index, (real, kind) in enumerate(sorted(standins.items())):
        name, task_seed = PREFIX + real, seed + 1000 * (index + 1)
        if kind == "multiple_choice":
            items = _mc_items(text, task_seed, index)[:max_items]
            write_task(name, items, mc_config(name, out_dir / f"{name}.jsonl"), f"multiple choice standing in for {real}")
        elif kind in ("group", "generation_group"):
            subtasks = [f"{name}_{i}" for i in range(GROUP_SUBTASKS)]
            long = kind == "generation_group"
            # cloze items, or long-passage questions, dealt out to the subtasks
            pool = long_generation_items(text, task_seed) if long else _mc_items(text, task_seed, 1)
            size = min(max_items, len(pool) // GROUP_SUBTASKS)
            for i, sub in enumerate(subtasks):
                data = out_dir / f"{sub}.jsonl"
                write_task(sub, pool[i * size : (i + 1) * size],
                           generation_config(sub, data, "score", SCORE_MODULE) if long else mc_config(sub, data),
                           f"subtask {i} of the {real} stand-in")
            config = group_config(name, subtasks, "score", False) if long else group_config(name, subtasks)
            atomic_write_text(out_dir / f"{name}.yaml", f"# {name}: group standing in for {real}\n"
                              + yaml.safe_dump(config, sort_keys=False))
            if long:
                atomic_write_text(out_dir / f"{SCORE_MODULE}.py", SCORE_SOURCE)
            manifest[name] = {"items": size * GROUP_SUBTASKS, "subtasks": subtasks,
                              "config": str(out_dir / f"{name}.yaml"), "description": f"group standing in for {real}"}
        else:
            items = generation_items(text, task_seed)[:max_items]
            write_task(name, items, generation_config(name, out_dir / f"{name}.jsonl"),
                       f"generation scored by rougeL standing in for {real}")
            atomic_write_text(out_dir / f"{ROUGE_MODULE}.py", ROUGE_SOURCE)
    return manifest
