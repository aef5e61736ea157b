"""Every default has one home, the config schema: the rules read the values `validate` filled in from it, and
the stages' own argparse defaults (what `python -m kvsharer <stage>` does without the DAG) agree with it."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import pytest
import yaml

from kvsharer.cli import STAGES

REPO = Path(__file__).resolve().parents[1]
SCHEMA = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())

# config key (path in the schema) -> the stage options that take its value in the DAG's rules
OPTIONS = {
    "models.*.dtype": [("prepare-model", "dtype"), ("calibrate", "dtype"), ("calibration-states", "dtype"), ("search", "dtype"), ("profile", "dtype"),
                       ("evaluate-ppl", "dtype"), ("evaluate-harness", "dtype"), ("evaluate-longctx", "dtype")],
    "models.*.batch_size": [("evaluate-ppl", "batch_size"), ("evaluate-harness", "batch_size")],
    "calibration.eval_fraction": [("prepare-text", "eval_fraction")],
    "calibration.samples": [("calibrate", "samples")],
    "calibration.tokens": [("calibrate", "tokens")],
    "search.procedure": [("search", "procedure")],
    "search.metric": [("search", "metric"), ("distances", "metric")],
    "search.threshold": [("search", "threshold")],
    "search.measured.sources": [("search", "sources")],
    "search.measured.refresh": [("search", "refresh")],
    "profile.rates": [("profile", "rates")],
    "profile.methods": [("profile", "cache")],
    "profile.batch_sizes": [("profile", "batch_sizes")],
    "profile.contexts": [("profile", "contexts")],
    "profile.new_tokens": [("profile", "new_tokens")],
    "profile.repeats": [("profile", "repeats")],
    "scaling.layers": [("search-scaling", "layers")],
    "scaling.hidden": [("search-scaling", "hidden")],
    "scaling.samples": [("search-scaling", "samples")],
    "scaling.tokens": [("search-scaling", "tokens")],
    "scaling.rate": [("search-scaling", "rate")],
    "compose.chunk": [("evaluate-ppl", "chunk"), ("evaluate-harness", "chunk")],
    "evaluation.ppl.window": [("evaluate-ppl", "window")],
    "evaluation.harness.passage_words": [("make-tasks", "passage_words")],
    "evaluation.harness.limit": [("evaluate-harness", "limit")],
    "evaluation.harness.num_fewshot": [("evaluate-harness", "num_fewshot")],
    "evaluation.longctx.depths": [("evaluate-longctx", "depths")],
    "evaluation.longctx.trials": [("evaluate-longctx", "trials")],
    "evaluation.longctx.seed": [("evaluate-longctx", "seed")],
    "evaluation.longctx.answer_tokens": [("evaluate-longctx", "max_new_tokens")],
    "serving.kv_cache_mib": [("serving", "kv_cache_mib")],
    "serving.block_size": [("serving", "block_size")],
    "serving.requests": [("serving", "requests")],
    "serving.prompt_tokens": [("serving", "prompt_tokens")],
    "serving.new_tokens": [("serving", "new_tokens")],
    "serving.max_num_seqs": [("serving", "max_num_seqs")],
    "serving.repeats": [("serving", "repeats")],
    "serving.eager": [("serving", "eager")],
    "serving.interleave": [("serving", "interleave")],
}
# the one deliberate difference: a stage run by hand scores the whole text unless told otherwise
DIFFERENT = {"evaluation.ppl.max_tokens": ("evaluate-ppl", "max_tokens", None)}


def schema_default(path: str):
    node = SCHEMA
    for key in path.split("."):
        node = node["properties"][key] if key != "*" else node["additionalProperties"]
    return node["default"]


def stage_default(stage: str, dest: str):
    parser = argparse.ArgumentParser()
    importlib.import_module(STAGES[stage][0]).add_arguments(parser)
    return next(a.default for a in parser._actions if a.dest == dest)


def as_value(default, like):
    """A comma-separated option default as the list the config would hold (when the config holds a list)."""
    if isinstance(like, list) and isinstance(default, str):
        return [yaml.safe_load(v) for v in default.split(",")]
    return default


@pytest.mark.parametrize("path", sorted(OPTIONS))
def test_stage_defaults_are_the_schema_defaults(path):
    expected = schema_default(path)
    for stage, dest in OPTIONS[path]:
        got = as_value(stage_default(stage, dest), expected)
        assert got == expected, f"{stage} --{dest.replace('_', '-')} defaults to {got!r}, the schema's {path} to {expected!r}"


def test_the_deliberate_difference_is_still_one():
    for path, (stage, dest, value) in DIFFERENT.items():
        assert stage_default(stage, dest) == value and schema_default(path) != value


def test_rules_hold_no_default_of_their_own():
    """The rules read config values through `setting(path)` / `model_setting`, never `.get(key, <value>)`
    (an empty container stands for a section the config leaves out)."""
    import re

    for smk in (REPO / "workflow" / "rules").glob("*.smk"):
        for number, line in enumerate(smk.read_text().splitlines(), 1):
            assert not re.search(r"\.get\(\s*['\"][a-z_]+['\"]\s*,\s*([-0-9\"']|\[[^\]])", line), f"{smk.name}:{number}: {line}"
