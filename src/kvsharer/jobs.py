"""What each rule asks the scheduler for and which lengths it runs, from the config alone (torch-free).

The Snakemake rules (workflow/rules/*.smk) take their resources from here, and preflight checks the same
numbers (after the Slurm profile's per-rule overrides) against what the models need, so the two never
disagree.

* model rules (``MODEL_RULES``): ``mem_mb`` and ``gpu`` from ``models.<m>.mem_mb`` / ``models.<m>.gpus``:
  ``gpus > 1`` loads the model across that many GPUs (``device_map="auto"``, kvsharer.models.loading.load_model);
* ``prepare_model`` converts the weights on CPU: the model's ``mem_mb``, no GPU;
* ``search_scaling``: memory and wall time from its grid (kvsharer.measure.scaling), ``scaling.threads`` CPUs.
"""

from __future__ import annotations

# rules that load a model onto its GPUs
MODEL_RULES = ("calibrate", "calibration_states", "search", "search_fitted", "evaluate_ppl", "evaluate_harness",
               "evaluate_longctx", "evaluate_ruler", "evaluate_longbench", "profile", "serving")
DEFAULTS = {"mem_mb": 4000, "gpus": 1, "batch_size": 8}  # as in workflow/schemas/config.schema.yaml
LONGBENCH_TASKS = ["longbench"]  # evaluation.longbench.tasks default, as in the schema
ANSWER_TOKENS = 8  # evaluation.longctx.answer_tokens default: greedy answer tokens after a passkey prompt
SCALING_DEFAULTS = {"layers": [8, 16, 32], "hidden": [256, 512], "samples": 30, "tokens": 64, "rate": 0.25,
                    "threads": 2}


def model_setting(config: dict, model: str, key: str):
    return config["models"][model].get(key, DEFAULTS.get(key))


def model_gpus(config: dict, model: str) -> int:
    return int(model_setting(config, model, "gpus"))


def model_mem_mb(config: dict, model: str) -> int:
    return int(model_setting(config, model, "mem_mb"))


def rule_resources(config: dict, rule: str, model: str | None = None) -> dict:
    """``{"mem_mb": .., "gpu": ..}`` a rule declares for ``model`` (before any profile override)."""
    if rule == "prepare_model":
        return {"mem_mb": model_mem_mb(config, model), "gpu": 0}
    if rule in MODEL_RULES:
        return {"mem_mb": model_mem_mb(config, model), "gpu": model_gpus(config, model)}
    if rule == "search_scaling":
        s = scaling_settings(config)
        from .measure.scaling import measure_memory_bytes, measure_minutes

        return {"mem_mb": int(measure_memory_bytes(s["layers"], s["hidden"], s["samples"], s["tokens"]) // 1e6) + 1,
                "runtime": measure_minutes(s["layers"], s["hidden"], s["samples"], s["tokens"], s["rate"],
                                           s["threads"]),
                "gpu": 0}
    return {}


def scaling_settings(config: dict) -> dict:
    return {**SCALING_DEFAULTS, **(config.get("scaling") or {})}


def answer_tokens(config: dict) -> int:
    return int(((config.get("evaluation") or {}).get("longctx") or {}).get("answer_tokens", ANSWER_TOKENS))


def _capped(lengths: list[int], config: dict, model: str) -> list[int]:
    cap = config["models"][model].get("max_length")
    return [n for n in lengths if cap is None or n <= cap]


def longctx_lengths(config: dict, model: str) -> list[int]:
    """The passkey lengths run on ``model``: ``evaluation.longctx.lengths`` up to ``models.<m>.max_length``
    (all of them when it is not set)."""
    return _capped(((config.get("evaluation") or {}).get("longctx") or {}).get("lengths", []), config, model)


def known_window(source: str) -> int | None:
    """A model's window (max_position_embeddings) known without loading anything: a stored architecture
    (hub id, ``standin:``, ``random:``, ``embedded:``) or a local folder's ``config.json``; None otherwise."""
    import json
    from pathlib import Path

    from .models.shapes import architecture_of, shape_from_config

    shape = architecture_of(source)
    config_file = Path(source) / "config.json"
    if shape is None and config_file.is_file():
        try:
            shape = shape_from_config(json.loads(config_file.read_text()))
        except (OSError, ValueError):
            shape = None
    return shape.max_positions if shape is not None and shape.max_positions else None


def ruler_lengths(config: dict, model: str) -> list[int]:
    """The RULER lengths run on ``model``: ``evaluation.ruler.lengths`` up to its window (when known from
    its architecture, :func:`known_window`) and up to ``models.<m>.max_length``: RULER at each model's window."""
    window = known_window(str(config["models"][model]["source"]))
    lengths = ((config.get("evaluation") or {}).get("ruler") or {}).get("lengths", [])
    return _capped([n for n in lengths if window is None or n <= window], config, model)


def longbench_max_length(config: dict, model: str) -> int | None:
    """The LongBench truncation length of ``model``: the smallest of ``evaluation.longbench.max_length``,
    ``models.<m>.max_length`` and its window when known (:func:`known_window`); None: the model's window."""
    caps = [((config.get("evaluation") or {}).get("longbench") or {}).get("max_length"),
            config["models"][model].get("max_length"), known_window(str(config["models"][model]["source"]))]
    caps = [c for c in caps if c is not None]
    return min(caps) if caps else None


def longbench_tasks(config: dict) -> list[str]:
    """The lm-eval names ``evaluation.longbench`` runs (none without that section)."""
    longbench = (config.get("evaluation") or {}).get("longbench")
    return list(longbench.get("tasks", LONGBENCH_TASKS)) if longbench is not None else []


def eval_batch(config: dict, model: str, kind: str) -> int:
    """Prompts per batch of an evaluation kind: ``evaluation.<kind>.batch_size``, else the model's."""
    own = ((config.get("evaluation") or {}).get(kind) or {}).get("batch_size")
    return int(own) if own is not None else int(model_setting(config, model, "batch_size"))
