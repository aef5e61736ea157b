"""Checks of a pipeline config that need more than its schema, run before any job is submitted.

The Snakefile calls ``preflight(config)`` in Snakemake's main process (never inside jobs). It collects
every problem and raises one ``ValueError`` listing them: a model source that is neither a folder, a hub
id nor an embedded model; an architecture the sharing mechanism cannot handle (checked on an empty model
built on the ``meta`` device from the config: no weights are read); a sharing rate no policy can reach
for the model's depth; a long-context length beyond the model's window; an lm-eval task name unknown to
lm-eval's registry; a token-level method of ``kvsharer.intra`` (profile) for a model whose attention is
remote code, which does not go through transformers' attention-function registry those methods plug
into (they would silently compress nothing); a MiniCache rate that needs more adjacent layer pairs than the
model has. Hub models whose config is not in the local Hugging Face
cache (offline dry runs) are not checked for architecture; that is logged, not an error.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

log = logging.getLogger("kvsharer")


def _model_config(source: str, trust_remote_code: bool = False):
    """The model's transformers config from a folder or the local HF cache, or None when unavailable."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as err:  # not cached, remote code, ...
        log.warning("preflight: config of %s is not available offline (%s); architecture not checked",
                    source, str(err).splitlines()[0][:120])
        return None


def check_model(name: str, settings: dict, rates: list[float], lengths: list[int],
                methods: list[str] = (), minicache_rates: list[float] = ()) -> list[str]:
    from .models import (EMBEDDED_PREFIX, ModelError, UnsupportedArchitecture, check_source, find_parts,
                         trusts_remote_code)

    source = settings["source"]
    try:
        check_source(source)
    except ModelError as err:
        return [f"model {name!r}: {err}"]
    if source.startswith(EMBEDDED_PREFIX):
        return []  # a known, supported Llama checkpoint
    import torch
    from transformers import AutoModelForCausalLM

    remote = trusts_remote_code(source, local_files_only=True)
    config = _model_config(source, remote)
    if config is None:
        return []
    problems = []
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=remote)
        parts = find_parts(model)
        n_layers = parts.n_layers
    except UnsupportedArchitecture as err:
        return [f"model {name!r}: {err}"]
    except Exception as err:  # an architecture transformers cannot build
        return [f"model {name!r}: cannot build {type(config).__name__} ({err})"]
    for rate in rates:
        if rate > (n_layers - 1) / n_layers or math.floor(rate * n_layers + 0.5) > n_layers - 1:
            problems.append(f"model {name!r}: sharing rate {rate} is impossible for its {n_layers} layers")
    if minicache_rates:
        from .minicache import pairs_for_rate

        for rate in minicache_rates:
            try:
                pairs_for_rate(rate, n_layers)
            except ValueError as err:
                problems.append(f"model {name!r}: {err}")
    window = getattr(config, "max_position_embeddings", None)
    limit = settings.get("max_length") or window
    for length in lengths:
        if limit and length > limit:
            problems.append(f"model {name!r}: long-context length {length} exceeds its window of {limit} tokens")
    token_methods = _token_methods(methods)
    if token_methods and not parts.native_attention:
        problems.append(
            f"model {name!r}: token-level methods ({', '.join(token_methods)}) need transformers' attention-function "
            f"registry, which the attention of {type(model).__name__} ({type(parts.attentions[0]).__module__}) does "
            f"not use: they would compress nothing (set models.{name}.token_methods: false to run them on the other "
            "models only)"
        )
    return problems


def _token_methods(methods: list[str]) -> list[str]:
    """The entries of a profile's method list that are kvsharer.intra token-level methods (h2o:0.5, ...)."""
    if not any(m != "none" for m in methods):
        return []
    from .intra import METHODS

    return [m for m in methods if m.split(":")[0] in METHODS]


def check_tasks(tasks: list[str]) -> list[str]:
    from lm_eval.tasks import TaskManager

    known = TaskManager().all_tasks
    unknown = [t for t in tasks if t not in known]
    return [f"unknown lm-eval task(s): {', '.join(unknown)}"] if unknown else []


def preflight(config: dict) -> None:
    search, evaluation = config["search"], config.get("evaluation", {})
    compose = config.get("compose", {})
    rates = sorted(set(search["rates"]) | set(search.get("ablation_rates", [])) | set(compose.get("rates", [])))
    lengths = evaluation.get("longctx", {}).get("lengths", [])
    problems = []
    profile = config.get("profile")  # the profile rule's methods (formerly `intra`), with its default
    methods = profile.get("methods", profile.get("intra", ["none", "h2o:0.5"])) if profile is not None else []
    methods = list(dict.fromkeys([*methods, *compose.get("intra", []), *compose.get("niah", [])]))
    minicache_rates = sorted(set(compose.get("minicache_rates", []))
                             | {float(m.split(":")[1]) for m in methods if m.startswith("minicache:")})
    for name, settings in config["models"].items():
        own = methods if settings.get("token_methods", True) else [m for m in methods if m not in _token_methods(methods)]
        problems += check_model(name, settings, rates, lengths, own, minicache_rates)
    text = config["calibration"]["text"]
    if not (text.startswith(("embedded:", "hf:")) or Path(text).is_file()):
        problems.append(f"calibration text {text!r} is not a file, embedded:pydoc, or hf:<dataset>")
    harness = evaluation.get("harness")
    if harness and not harness.get("local_tasks", False):
        problems += check_tasks(harness["tasks"])
    if problems:
        raise ValueError("config check failed before any job was submitted:\n  - " + "\n  - ".join(problems))
