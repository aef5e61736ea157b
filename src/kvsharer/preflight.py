"""Checks of a pipeline config that need more than its schema, run before any job is submitted.

The Snakefile calls ``preflight(config, overrides)`` in Snakemake's main process (never inside jobs),
with the Slurm profile's per-rule ``set-resources`` as ``overrides``. It collects every problem and
raises one ``PreflightError`` listing them all, in two groups:

**Config problems** (the run would fail or measure the wrong thing, on any host):

* a model source that is neither a folder, a hub id nor an embedded model; an architecture the sharing
  mechanism cannot handle; a sharing rate no policy can reach for the model's depth; a MiniCache rate that
  needs more adjacent layer pairs than the model has; a token-level method (kvsharer.methods.intra) for a model
  whose attention is remote code (it would compress nothing);
* every length a stage runs against the model's window: passkey lengths (up to ``models.<m>.max_length``)
  plus the answer tokens, profile contexts plus the new tokens, the perplexity window, the calibration
  tokens; RULER lengths too short for ``ruler_cwe``/``ruler_fwe``/``ruler_vt``'s prompt with the model's own tokenizer;
* resources, as the rules and the Slurm profile request them: a model's ``mem_mb`` against its weights in
  the config's dtype (every job loads them through host memory; prepare-model converts them on CPU); its
  GPUs against weights + K/V + activations of the largest forward of each rule; a profile without a GPU
  (Table 2 on CPU), a prepare_model with one (it never uses it); search_scaling's memory against its grid;
* lm-eval task names unknown to lm-eval, and groups/tags without an aggregate metric (the paper reports
  one number per benchmark).

Architectures come from ``kvsharer.models.shapes.ARCHITECTURES`` (every paper model, offline, without torch),
from a folder's config.json, or from a cached hub config (built on the ``meta`` device: no weights).

**Environment problems** (this host): Python packages a model's remote code or a task needs; models and
datasets neither in the local Hugging Face cache nor reachable on the hub, gated repos without an HF
token. A dry run (``environment="warn"``) logs them instead of raising; so does a real run with
``KVSHARER_PREFLIGHT_ENVIRONMENT=warn`` (when the compute nodes have what the submit host lacks).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from . import jobs, method_registry
from .cache import footprint
from .models.layer_kinds import shareable_layers, unsupported
from .models.shapes import Shape, architecture_of, shape_from_config
from .models.sources import EMBEDDED_PREFIX, ModelError, check_source
from .names import FITTED_ORDERS, MAP_FAMILIES

log = logging.getLogger("kvsharer")

TOKEN_METHOD_NAMES = method_registry.names("intra")  # kvsharer.methods.intra.METHODS, without importing torch


class PreflightError(ValueError):
    """The config (or this host) would make jobs fail: every problem, in one message."""


@dataclass
class Findings:
    problems: list[str] = field(default_factory=list)  # the config's
    environment: list[str] = field(default_factory=list)  # this host's
    notes: list[str] = field(default_factory=list)  # worth knowing, not wrong

    def message(self, environment: bool = True) -> str:
        parts = []
        if self.problems:
            parts.append("config check failed before any job was submitted:\n  - " + "\n  - ".join(self.problems))
        if environment and self.environment:
            parts.append("environment of this host (packages, hub access; KVSHARER_PREFLIGHT_ENVIRONMENT=warn "
                         "when the compute nodes have them):\n  - " + "\n  - ".join(self.environment))
        return "\n".join(parts)


# ------------------------------------------------------------------------------------------------
# what a model is
# ------------------------------------------------------------------------------------------------


@dataclass
class ModelInfo:
    shape: Shape | None = None
    native_attention: bool = True  # transformers' own attention (token-level methods plug into it)
    kinds: list | None = None  # each layer's attention kind, when read from the model's config (else the shape's)
    hub_id: str | None = None  # fetched from the hub by prepare-model
    problems: list[str] = field(default_factory=list)
    environment: list[str] = field(default_factory=list)


def _model_config(source: str, trust_remote_code: bool = False):
    """The model's transformers config from a folder or the local HF cache, or None when unavailable."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as err:  # not cached, remote code, ...
        log.warning("preflight: config of %s is not available offline (%s)", source, str(err).splitlines()[0][:120])
        return None


def _build(name: str, source: str, info: ModelInfo) -> None:
    """Build the model on the ``meta`` device (no weights) and find the parts sharing touches."""
    import torch
    from transformers import AutoModelForCausalLM

    from .models.loading import UnsupportedArchitecture, find_parts, text_config, trusts_remote_code

    remote = trusts_remote_code(source, local_files_only=True)
    config = _model_config(source, remote)
    if config is None:
        info.environment.append(f"model {name!r}: {source} is not in the table of known architectures "
                                "(kvsharer.models.shapes) and its config is not available here: not checked")
        return
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=remote)
        parts = find_parts(model)
    except UnsupportedArchitecture as err:
        info.problems.append(f"model {name!r}: {err}")
        return
    except Exception as err:  # an architecture transformers cannot build
        info.problems.append(f"model {name!r}: cannot build {type(config).__name__} ({err})")
        return
    info.native_attention = parts.native_attention
    info.kinds = parts.kinds
    if info.shape is None or info.shape.layers != parts.n_layers:
        window = getattr(text_config(config), "max_position_embeddings", None) or 0
        shape = info.shape or Shape(parts.n_layers, 0, 0, 1, 1, 0, window)
        info.shape = Shape(**{**shape.__dict__, "layers": parts.n_layers})


def model_info(name: str, settings: dict) -> ModelInfo:
    source = settings["source"]
    info = ModelInfo()
    try:
        check_source(source)
    except ModelError as err:
        info.problems.append(f"model {name!r}: {err}")
        return info
    known = architecture_of(source)
    if known is not None:  # the table: every paper model, offline, no torch
        info.shape, info.native_attention = known, not known.remote_code
        if not source.startswith(("random:", "standin:", EMBEDDED_PREFIX)):  # built here, not fetched
            info.hub_id = source
        for package in known.packages:
            if importlib.util.find_spec(package) is None:
                info.environment.append(f"model {name!r} ({source}) needs the Python package {package!r} (its "
                                        f"remote code or tokenizer imports it): pip install {package}")
        return info
    if source.startswith(EMBEDDED_PREFIX):
        return info
    folder = Path(source)
    if folder.is_dir():
        try:
            info.shape = shape_from_config(json.loads((folder / "config.json").read_text()))
        except (OSError, ValueError):
            info.problems.append(f"model {name!r}: {folder / 'config.json'} is not readable JSON")
            return info
    else:  # a hub id outside the table: its cached config.json, if any
        info.hub_id = source
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, "config.json")
        if isinstance(cached, str):
            info.shape = shape_from_config(json.loads(Path(cached).read_text()))
    _build(name, source, info)
    return info


# ------------------------------------------------------------------------------------------------
# checks of one model
# ------------------------------------------------------------------------------------------------


def _token_methods(methods) -> list[str]:
    return [m for m in methods if method_registry.is_token_method(m)]


def check_cache_specs(specs, token_specs=()) -> tuple[list[str], list[str]]:
    """(problems, the specs that parse): a spec the registry does not know or whose number is out of
    range, and a ``compose.intra`` spec that is not a token-level method, are problems."""
    problems, good = [], []
    for spec in specs:
        try:
            method_registry.CacheSpec.parse(spec)
        except ValueError as err:
            problems.append(str(err))
        else:
            good.append(spec)
    problems += [f"compose.intra: {spec!r} is not a token-level method ({method_registry.known_names()})"
                 for spec in token_specs if spec in good and not method_registry.is_token_method(spec)]
    return problems, good


def check_depth(name: str, n_layers: int, rates, minicache_rates=(), kinds=None) -> list[str]:
    """Rates the model's depth allows: round(rate × L) layers must be able to share (with ``kinds``, each
    layer's attention kind: only layers with an earlier layer of their own kind can)."""
    problems = []
    shareable = n_layers - 1 if kinds is None else len(shareable_layers(kinds))
    for rate in rates:
        if rate > (n_layers - 1) / n_layers or math.floor(rate * n_layers + 0.5) > n_layers - 1:
            problems.append(f"model {name!r}: sharing rate {rate} is impossible for its {n_layers} layers")
        elif math.floor(rate * n_layers + 0.5) > shareable:
            problems.append(f"model {name!r}: sharing rate {rate} needs {math.floor(rate * n_layers + 0.5)} sharing "
                            f"layers, but only {shareable} of its {n_layers} layers have an earlier layer of the same "
                            "attention kind (layers share only within full, sliding or chunked attention)")
    if minicache_rates:
        from .methods.minicache import pairs_for_rate

        for rate in minicache_rates:
            try:
                pairs_for_rate(rate, n_layers, kinds)
            except ValueError as err:
                problems.append(f"model {name!r}: {err}")
    return problems


def check_maps(name: str, shape: Shape, settings: dict, orders) -> list[str]:
    """The fitted order needs keys its maps can un-rotate (kvsharer.cache.kv_maps): refused for other families
    unless the model opts out (``kv_maps: false``)."""
    if not any(o in FITTED_ORDERS for o in orders) or not settings.get("kv_maps", True) or shape.family in MAP_FAMILIES:
        return []
    return [f"model {name!r}: the fitted order's K/V maps support the {', '.join(MAP_FAMILIES)} families, not "
            f"{shape.family or shape.architecture} (set models.{name}.kv_maps: false to search it on the other models only)"]


def check_kinds(name: str, shape: Shape, kinds) -> list[str]:
    """A model none of whose layers can share (latent attention, unknown layer types, no K/V): one line, why."""
    reason = unsupported(kinds) if kinds else None
    family = shape.architecture or shape.family
    return [f"model {name!r} ({family}) cannot share KV: {reason}"] if reason else []


def check_windows(name: str, window: int, config: dict) -> list[str]:
    """Every length a stage runs on this model, against its window (max_position_embeddings)."""
    problems = []
    evaluation = config.get("evaluation") or {}
    answer = jobs.answer_tokens(config)
    cap = config["models"][name].get("max_length")
    if cap is not None and cap + answer > window:
        problems.append(f"model {name!r}: max_length {cap} + {answer} answer tokens = {cap + answer} exceeds its "
                        f"window of {window} tokens (set max_length to at most {window - answer})")
    if "longctx" in evaluation:
        for n in jobs.longctx_lengths(config, name):
            if n + answer > window and (cap is None or cap + answer <= window):
                problems.append(
                    f"model {name!r}: passkey length {n} + {answer} answer tokens = {n + answer} exceeds its window "
                    f"of {window} tokens (evaluate-longctx would fail): use lengths up to {window - answer}, or cap "
                    f"this model with models.{name}.max_length")
    profile = config.get("profile")
    if profile is not None:
        new = profile.get("new_tokens", 16)
        for context in profile.get("contexts", [512]):
            if context + new > window:
                problems.append(
                    f"model {name!r}: profile context {context} + {new} new tokens = {context + new} exceeds its "
                    f"window of {window} tokens (profile would fail): use contexts up to {window - new}")
    too_long = [n for n in jobs.ruler_lengths(config, name) if n > window]
    if too_long:  # a RULER sample of length L holds its prompt and its answer
        problems.append(f"model {name!r}: RULER lengths {', '.join(map(str, too_long))} exceed its window of {window} "
                        f"tokens (evaluate_ruler would fail): use evaluation.ruler.lengths up to {window}, or cap them "
                        f"with models.{name}.max_length")
    cap = jobs.longbench_max_length(config, name) if "longbench" in evaluation else None
    if cap is not None and cap > window:
        problems.append(f"model {name!r}: LongBench max_length {cap} exceeds its window of {window} tokens "
                        f"(evaluate_longbench would fail): lower evaluation.longbench.max_length or "
                        f"models.{name}.max_length")
    if "ppl" in evaluation and evaluation["ppl"].get("window", 512) > window:
        problems.append(f"model {name!r}: perplexity window {evaluation['ppl'].get('window', 512)} exceeds its "
                        f"window of {window} tokens")
    tokens = config["calibration"].get("tokens", 64)
    if tokens > window:
        problems.append(f"model {name!r}: calibration.tokens {tokens} exceeds its window of {window} tokens")
    return problems


def check_ruler_prompts(name: str, source: str, config: dict) -> list[str]:
    """RULER tasks whose prompt does not fit the lengths run on this model, with the tokenizer its jobs load
    (lm-eval's ``ruler_cwe``/``ruler_fwe``/``ruler_vt``; :mod:`kvsharer.evaluate.ruler_samples`). Checked for model folders,
    stand-ins and embedded models (a tokenizer here, in a second); a hub model's job checks it before loading."""
    import tempfile

    from .evaluate.ruler_samples import FLOORED, too_short
    from .models.shapes import RANDOM_PREFIX
    from .models.standins import STANDIN_PREFIX

    ruler = (config.get("evaluation") or {}).get("ruler") or {}
    names = [task for task in ruler.get("tasks", []) if task in FLOORED]
    lengths = jobs.ruler_lengths(config, name)
    local = Path(source).is_dir() or source.startswith((STANDIN_PREFIX, EMBEDDED_PREFIX))
    if not (names and lengths and local) or source.startswith(RANDOM_PREFIX):
        return []
    from lm_eval.tasks.ruler.common_utils import get_tokenizer

    from .models.loading import tokenizer_folder  # torch: only for the models checked here

    with tempfile.TemporaryDirectory() as scratch:
        short = too_short(names, lengths, get_tokenizer(tokenizer_folder(source, scratch)))
    if not short:
        return []
    return [f"model {name!r}: RULER {'; '.join(short)}: the prompt leaves no room for the task's content, so every "
            "sample would expect no answer (lm-eval's score divides by zero after the run) or its generator would "
            "never end: use longer evaluation.ruler.lengths or leave the task out"]


def effective(config: dict, rule: str, model: str | None, overrides: dict) -> dict:
    """A rule's resources for ``model`` after the Slurm profile's ``set-resources`` (which win)."""
    res = {**jobs.rule_resources(config, rule, model), **(overrides.get(rule) or {})}
    if "gres" in (overrides.get(rule) or {}):  # gres: "gpu:2" / "gpu:a100:2" instead of gpu: 2
        gres = str(overrides[rule]["gres"]).split(":")
        res["gpu"] = int(gres[-1]) if gres[0] == "gpu" and gres[-1].isdigit() else res.get("gpu", 0)
    return res


def forwards(config: dict, name: str, window: int) -> dict[str, list[tuple[str, int, int, bool]]]:
    """rule -> [(what, batch, tokens, logits of every position)]: the largest forwards each model rule
    runs (the profile's grid is left out: a point that does not fit is an out-of-memory row by design)."""
    evaluation = config.get("evaluation") or {}
    batch = jobs.model_setting(config, name, "batch_size")
    calibration = config["calibration"]
    samples, tokens = calibration.get("samples", 30), calibration.get("tokens", 64)
    out = {rule: [("calibration", samples, tokens, True)] for rule in ("calibrate", "search")}
    if calibration.get("states"):  # the same forward, every layer's output and K/V kept
        out["calibration_states"] = [("calibration", samples, tokens, True)]
    if "ppl" in evaluation:
        out["evaluate_ppl"] = [("perplexity windows", batch, evaluation["ppl"].get("window", 512), True)]
    lengths = jobs.longctx_lengths(config, name) if "longctx" in evaluation else []
    if lengths:  # a whole (length, depth) cell per generate call: trials sequences
        out["evaluate_longctx"] = [("passkey cells", evaluation["longctx"].get("trials", 2),
                                    max(lengths) + jobs.answer_tokens(config), False)]
    lengths = jobs.ruler_lengths(config, name) if "ruler" in evaluation else []
    if lengths:  # lm-eval generates for a batch of prompts of (up to) the longest length
        out["evaluate_ruler"] = [("RULER samples", jobs.eval_batch(config, name, "ruler"), max(lengths), False)]
    if "longbench" in evaluation:  # prompts of thousands of tokens, truncated to the cap (else the window)
        cap = jobs.longbench_max_length(config, name)
        out["evaluate_longbench"] = [("LongBench prompts", jobs.eval_batch(config, name, "longbench"),
                                      min(window, cap or window), False)]
    profile = config.get("profile")
    if profile is not None:
        out["profile"] = [("profile warm-up", 1, min(profile.get("contexts", [512])) + 2, False)]
    return out


def check_resources(name: str, shape: Shape, config: dict, overrides: dict, gpu_memory_gb: float) -> list[str]:
    settings = config["models"][name]
    dtype = settings.get("dtype", "float32")
    problems = []
    host = footprint.host_mb_to_load(shape, dtype)
    short = [r for r in ("prepare_model", *jobs.MODEL_RULES)
             if effective(config, r, name, overrides).get("mem_mb", 0) < host]
    if short:
        asked = sorted({effective(config, r, name, overrides).get("mem_mb", 0) for r in short})
        problems.append(
            f"model {name!r}: mem_mb {'/'.join(map(str, asked))} is less than the {host} MB needed to load its "
            f"{(shape.params or shape.param_count()) / 1e9:.1f}B parameters in {dtype} through host memory "
            f"(rules {', '.join(short)}; prepare_model converts them on CPU): raise models.{name}.mem_mb")
    prepare = effective(config, "prepare_model", name, overrides)
    if prepare.get("gpu", 0):
        problems.append(f"rule prepare_model for model {name!r} asks for {prepare['gpu']} GPU(s) but converts the "
                        "weights on CPU: the GPU would idle (remove gpu from its set-resources)")
    wanted = jobs.model_gpus(config, name)
    for rule, runs in forwards(config, name, shape.max_positions).items():
        gpus = effective(config, rule, name, overrides).get("gpu", 0)
        if rule == "profile" and wanted and not gpus:
            problems.append(f"rule profile for model {name!r} gets no GPU: Table 2's memory and throughput would "
                            f"be measured on CPU (models.{name}.gpus is {wanted}; remove gpu: 0 from its "
                            "set-resources)")
            continue
        if not gpus:  # a CPU job: weights, K/V and activations all live in its host memory
            mem = effective(config, rule, name, overrides).get("mem_mb", 0)
            for what, batch, tokens, all_logits in runs:
                need = math.ceil(footprint.gpu_bytes(shape, dtype, batch, tokens, all_logits) / 1e6)
                need += footprint.HOST_OVERHEAD_MB
                if mem < need:
                    problems.append(f"model {name!r}: rule {rule} runs on CPU (no GPU) and needs {need} MB for its "
                                    f"{what} ({batch} x {tokens} tokens: weights + K/V + activations) but asks for "
                                    f"{mem} MB")
            continue
        for what, batch, tokens, all_logits in runs:
            need = footprint.gpu_bytes(shape, dtype, batch, tokens, all_logits)
            n = footprint.gpus_needed(need, gpu_memory_gb)
            if n > gpus:
                problems.append(
                    f"model {name!r}: rule {rule} needs {n} GPUs of {gpu_memory_gb:g} GB for its {what} ({batch} x "
                    f"{tokens} tokens: weights + K/V + activations = {footprint.gb(need)}) but gets {gpus} "
                    f"(set models.{name}.gpus: {n})")
    return problems


def check_model(name: str, settings: dict, rates: list[float], lengths: list[int], methods=(), minicache_rates=(),
                config: dict | None = None, overrides: dict | None = None, info: ModelInfo | None = None) -> list[str]:
    """Config problems of one model. ``config``: the whole config, for its windows and resources; without
    it, ``lengths`` are checked as passkey lengths (no answer tokens) and resources are not."""
    info = info or model_info(name, settings)
    problems = list(info.problems)
    if problems or info.shape is None:
        return problems
    shape = info.shape
    kinds = info.kinds or shape.kinds()
    problems += check_kinds(name, shape, kinds)
    if problems:
        return problems
    problems += check_depth(name, shape.layers, rates, minicache_rates, kinds)
    problems += check_maps(name, shape, settings, (config or {}).get("search", {}).get("orders", []))
    own = _token_methods(methods)
    if own and not info.native_attention:
        problems.append(
            f"model {name!r}: token-level methods ({', '.join(own)}) need transformers' attention-function registry, "
            f"which the remote-code attention of {shape.architecture or settings['source']} does not use: they would "
            f"compress nothing (set models.{name}.token_methods: false to run them on the other models only)")
    whole = config or {"models": {name: settings}, "calibration": {},
                       "evaluation": {"longctx": {"lengths": lengths, "answer_tokens": 0}}}
    if shape.max_positions:
        problems += check_windows(name, shape.max_positions, whole)
    if config is not None:
        problems += check_ruler_prompts(name, str(settings["source"]), config)
    if config is not None and shape.hidden and shape.vocab:
        gpu_gb = (config.get("resources") or {}).get("gpu_memory_gb", footprint.GPU_MEMORY_GB)
        problems += check_resources(name, shape, config, overrides or {}, gpu_gb)
    return problems


# ------------------------------------------------------------------------------------------------
# tasks, scaling, hub
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager()  # scans lm-eval's ~15k task configs once per process


def check_tasks(tasks: list[str], findings: Findings) -> dict[str, set[str]]:
    """Unknown names, groups without aggregate, packages; returns {dataset: requested names reading it}."""
    from .evaluate.lm_tasks import task_needs

    manager = task_manager()
    unknown = [t for t in tasks if t not in manager.task_index]
    if unknown:
        findings.problems.append(f"unknown lm-eval task(s): {', '.join(unknown)}")
    datasets: dict[str, set[str]] = {}
    for name, needs in task_needs(tasks, manager).items():
        if needs.kind in ("tag", "group without aggregate"):
            findings.problems.append(
                f"lm-eval task {name!r} is a {'tag' if needs.kind == 'tag' else 'group'} with no aggregate metric: "
                f"lm-eval reports only its {len(needs.leaves)} tasks, not one score for the benchmark (name a group "
                "with an aggregate_metric_list, or the tasks themselves)")
        for package in sorted(needs.packages):
            if importlib.util.find_spec(package) is None:
                findings.environment.append(f"lm-eval task {name!r} needs the Python package {package!r} "
                                            f"(pip install {package}); without it the harness jobs fail")
        for resource in sorted(needs.nltk_data):
            if not _nltk_has(resource):
                findings.environment.append(
                    f"lm-eval task {name!r} scores with NLTK's {resource.split('/')[-1]} data, which is not here and "
                    f"which unitxt downloads at scoring time: python -m nltk.downloader {resource.split('/')[-1]} "
                    "(into NLTK_DATA on a shared file system when the compute nodes have no internet)")
        for dataset in needs.datasets:
            datasets.setdefault(dataset, set()).add(name)
    return datasets


def _nltk_has(resource: str) -> bool:
    if importlib.util.find_spec("nltk") is None:
        return False
    import nltk

    try:
        nltk.data.find(resource)
        return True
    except LookupError:
        return False


def check_scaling(config: dict, overrides: dict) -> list[str]:
    if "scaling" not in config:
        return []
    from .measure.scaling import measure_memory_bytes

    s = jobs.scaling_settings(config)
    need = math.ceil(measure_memory_bytes(s["layers"], s["hidden"], s["samples"], s["tokens"]) / 1e6)
    asked = effective(config, "search_scaling", None, overrides).get("mem_mb", 0)
    if asked < need:
        return [f"rule search_scaling asks for {asked} MB but its grid (layers {max(s['layers'])} x hidden "
                f"{max(s['hidden'])}, random fp32 models, {s['samples']} x {s['tokens']} tokens) needs {need} MB "
                "(kvsharer.measure.scaling.measure_memory_bytes): drop its mem_mb override or shrink scaling.layers/hidden"]
    return []


def hub_problems(config: dict, infos: dict[str, ModelInfo], datasets: dict[str, set[str]]) -> list[str]:
    from .models.hub_access import access_problems

    repos = {}
    for name, info in infos.items():
        if info.hub_id:
            gated = bool(info.shape and info.shape.gated)
            repos.setdefault((info.hub_id, "model"), {"gated": gated, "used_by": f"model {name}"})
    text = config["calibration"]["text"]
    if text.startswith("hf:"):
        repos[(text[3:].split(":")[0], "dataset")] = {"gated": False, "used_by": "calibration text"}
    for dataset, names in sorted(datasets.items()):
        repos.setdefault((dataset, "dataset"), {"gated": False, "used_by": f"lm-eval {', '.join(sorted(names))}"})
    return access_problems(repos)


# ------------------------------------------------------------------------------------------------
# the whole config
# ------------------------------------------------------------------------------------------------


def check_config(config: dict, overrides: dict | None = None) -> Findings:
    """Every problem of ``config`` (with the Slurm profile's per-rule ``overrides``), without raising."""
    overrides = {rule: dict(res) for rule, res in (overrides or {}).items()}
    search, evaluation = config["search"], config.get("evaluation") or {}
    compose = config.get("compose") or {}
    rates = sorted(set(search["rates"]) | set(search.get("ablation_rates", [])) | set(compose.get("rates", [])))
    profile = config.get("profile")
    methods = profile.get("methods", ["none", "h2o:0.5"]) if profile is not None else []
    methods = list(dict.fromkeys([*methods, *compose.get("intra", []), *compose.get("niah", [])]))
    spec_problems, methods = check_cache_specs(methods, compose.get("intra", []))
    minicache_rates = sorted(set(compose.get("minicache_rates", []))
                             | {float(m.split(":")[1]) for m in methods if str(m).startswith("minicache:")})
    findings = Findings()
    findings.problems += spec_problems
    infos = {}
    for name, settings in config["models"].items():
        own = methods if settings.get("token_methods", True) else [m for m in methods if m not in _token_methods(methods)]
        info = infos[name] = model_info(name, settings)
        findings.environment += info.environment
        findings.problems += check_model(name, settings, rates, [], own, minicache_rates, config, overrides, info)
    findings.problems += check_scaling(config, overrides)
    text = config["calibration"]["text"]
    if not (text.startswith(("embedded:", "hf:")) or Path(text).is_file()):
        findings.problems.append(f"calibration text {text!r} is not a file, embedded:pydoc, or hf:<dataset>")
    datasets: dict[str, set[str]] = {}
    harness = evaluation.get("harness")
    if harness and not harness.get("local_tasks", False):
        datasets = check_tasks(harness["tasks"], findings)
    longbench = jobs.longbench_tasks(config)
    if longbench and not (harness or {}).get("local_tasks", False):
        for dataset, names in check_tasks(longbench, findings).items():
            datasets.setdefault(dataset, set()).update(names)
    findings.environment += hub_problems(config, infos, datasets)
    findings.problems = list(dict.fromkeys(findings.problems))
    findings.environment = list(dict.fromkeys(findings.environment))
    return findings


def preflight(config: dict, overrides: dict | None = None, environment: str = "raise") -> Findings:
    """Raise ``PreflightError`` with every problem; environment problems only warn when ``environment`` is
    ``"warn"`` (dry runs) or ``KVSHARER_PREFLIGHT_ENVIRONMENT=warn``."""
    import os

    findings = check_config(config, overrides)
    strict = environment == "raise" and os.environ.get("KVSHARER_PREFLIGHT_ENVIRONMENT", "raise") != "warn"
    if findings.problems or (strict and findings.environment):
        raise PreflightError(findings.message(environment=True))
    for line in findings.environment:
        log.warning("preflight (environment): %s", line)
    return findings


# ------------------------------------------------------------------------------------------------
# from the Snakefile
# ------------------------------------------------------------------------------------------------


def snakemake_overrides(workflow) -> dict:
    """The per-rule resources of the profile's ``set-resources`` (and ``--set-resources``), as
    ``{rule: {name: value}}``."""
    out = {}
    for rule, resources in dict(workflow.resource_settings.overwrite_resources).items():
        items = resources.items() if hasattr(resources, "items") else resources._data.items()
        out[rule] = {k: getattr(v, "value", v) for k, v in items}
    return out


def dry_run(argv: list[str]) -> bool:
    """Whether Snakemake was started with ``-n`` (the executor is chosen after the Snakefile is read)."""
    import re

    return any(a in ("--dry-run", "--dryrun", "--dry") or re.fullmatch(r"-[a-zA-Z]*n[a-zA-Z]*", a) for a in argv)
