"""Stage ``make-tasks``: local lm-eval tasks built from held-out text (:mod:`kvsharer.evaluate.tasks`), one
data file and one YAML config per task, a manifest ``tasks.json``, and stand-ins of lm-eval benchmarks on
request (:mod:`kvsharer.evaluate.standin_tasks`)."""

from __future__ import annotations

import argparse
import functools
import json
import logging
from pathlib import Path

from ..atomic import atomic_write_text
from ..data import check_text_source, load_corpus, sha256_text
from ..evaluate.tasks import BUILDERS, ONE_TOKEN_ANSWERS, PASSAGE_WORDS, TAG, task_config

log = logging.getLogger("kvsharer")


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
                             "multiple_choice, group, generation, generation_group (kvsharer.evaluate.standin_tasks)")


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
    from ..evaluate.standin_tasks import parse_standins, write_standins

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
