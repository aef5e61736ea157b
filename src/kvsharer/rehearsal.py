"""The paper config as a rehearsal that runs on CPUs through a small Slurm (stage ``rehearsal-config``,
:mod:`kvsharer.stages.rehearsal_config`).

``python -m kvsharer rehearsal-config --paper config/paper.yaml --cut local --out <dir>/config.yaml``
reads the paper config and writes one in which only these things differ:

**Substitutions** (always):

* every model's ``source`` becomes ``standin:<hub id>`` (:mod:`kvsharer.models.standins`): the model's own
  architecture from ``kvsharer.models.shapes`` (layers, heads, KV heads, window, RoPE, vocabulary, biases) with
  heads ``HEAD_DIM`` wide, random weights, a BPE tokenizer trained on the embedded corpus;
* every lm-eval name of ``evaluation.harness.tasks`` and ``evaluation.longbench.tasks`` becomes
  ``standin_<name>``, a local task of the same structure as the real one in lm-eval's registry
  (:mod:`kvsharer.evaluate.standin_tasks`: a group with an aggregate for mmlu/cmmlu, a group of long-passage
  generation tasks with LongBench's ``score`` aggregate for longbench, a ROUGE-scored generation task for
  xsum, multiple choice for the rest); RULER's offline tasks stay themselves (lm-eval generates their data
  from the stand-in's tokenizer);
* the calibration text (a hub dataset) becomes ``embedded:pydoc`` (offline);
* ``serving`` (vLLM) is left out: the stand-ins' attention heads (``HEAD_DIM`` wide) are narrower than any
  vLLM attention kernel takes, and the nodes have no vLLM environment;

**what a CPU node of the local test cluster cannot give** (``CPU_OVERRIDES``, always): ``dtype``
float32 (half-precision matmuls are 2x slower than float32 on CPU), one thread and ``--gpus`` GPUs per
model job (default 0: the test cluster has 2 CPUs and one dummy GPU, which would run the model jobs one at
a time; Llama-2-70B asks for 4), ``batch_size`` 1 (the logits of
a 2048-token window of a 152k vocabulary are 1.2 GB a sequence in float32) and ``mem_mb`` what preflight
computes such a job needs (the paper's 64-160 GB exceed the node's 24 GB); the scaling grid (a 39 GB fp32
measurement) at two small depths and widths on one thread.

**The cut** (``CUTS``): ``paper`` keeps the paper's grid; ``local`` (``make rehearsal``) and ``ci`` (the
slurm-marked test) cut it for CPU time as each entry of ``CUTS`` says. Everything else — windows, depths,
profile contexts within the cut lengths, rates, orders, metrics, thresholds, compositions, measured-search
settings, calibration sizes, retries and wall times of the Slurm profile — is the paper config's.
"""

from __future__ import annotations

import copy
import math

from . import jobs
from .models.standins import HEAD_DIM, STANDIN_PREFIX, hub_id_of, standin_shape


REHEARSAL_TEXT = "embedded:pydoc"
REHEARSAL_DTYPE = "float32"
MEMORY_MARGIN = 1.5  # preflight's footprint is a lower bound: log-softmax and its copies need more

# Cuts of the paper's grid for CPU time. Keys are config paths; each value replaces the paper's.
# search.max_candidates: random weights put most candidates' output similarity just under the paper's
# T = 0.5, so its unbudgeted loop walks hundreds of candidates (a Qwen2.5 stand-in: 236 in 4 minutes for
# 5 of its 7 layers); the cuts give the ranked orders the demo's budget of 40 (measured orders have none)
# The local cut leaves the measured orders out for CPU time: they have no budget, and each candidate is
# a forward over the calibration set (measured-kl on Mistral-7B's stand-in: 152 candidates, 184 s, where
# the ranked search's 40 took 37 s). CUT=paper and the demo run them.
CUTS: dict[str, dict] = {
    "paper": {},
    # make rehearsal: every model, every table and figure, one rate of each kind, the short lengths
    "local": {
        "search.max_candidates": 40, "search.rates": [0.25], "search.orders": ["dissimilar", "similar", "random"],
        "search.seeds": [0],
        "search.ablation_rates": [0.25], "search.metrics": ["euclidean", "cosine"], "search.thresholds": [0.5, 0.9],
        "compose.rates": [0.25], "compose.intra": ["h2o:0.5"], "compose.quant_bits": [4],
        "compose.minicache_rates": [0.25], "compose.niah": ["h2o:0.5"],
        "profile.rates": [0, 0.25], "profile.methods": ["none", "h2o:0.5", "int4", "minicache:0.25"],
        "profile.batch_sizes": [1], "profile.contexts": [256], "profile.new_tokens": 8, "profile.repeats": 1,
        "evaluation.ppl.max_tokens": 4096, "evaluation.ppl.corpus_max_tokens": 2048,
        "evaluation.harness.limit": 10,
        "evaluation.longctx.lengths": [256, 512], "evaluation.longctx.trials": 2,
        "evaluation.ruler.lengths": [1536], "evaluation.ruler.limit": 2, "evaluation.longbench.limit": 2,
    },
    # the slurm-marked test (about 4-7 minutes on 2 cores): one model, Mistral-7B (GQA 32/8 heads, its own
    # transformers class, a 32k vocabulary: Qwen2.5's 152k makes every forward's logits 5x dearer), the
    # paper's method at one rate, no compositions (a streamed harness job takes 90 s on CPU), a one-point
    # profile, the shortest passkey grid
    "ci": {
        "models": ["mistral-7b-instruct"],
        "search.max_candidates": 40, "search.rates": [0.25], "search.orders": ["dissimilar"], "search.seeds": [0], "search.ablation_rates": [],
        "search.metrics": [], "search.thresholds": [],
        "compose.rates": [], "compose.intra": [], "compose.quant_bits": [], "compose.minicache_rates": [],
        "compose.niah": [],
        "profile.rates": [0, 0.25], "profile.methods": ["none"], "profile.batch_sizes": [1],
        "profile.contexts": [128], "profile.new_tokens": 4, "profile.repeats": 1,
        "evaluation.ppl.max_tokens": 2048, "evaluation.ppl.corpora": {},
        "evaluation.harness.limit": 2,
        "evaluation.longctx.lengths": [256], "evaluation.longctx.depths": [0.0, 1.0], "evaluation.longctx.trials": 1,
        "evaluation.ruler.tasks": ["niah_single_1"], "evaluation.ruler.lengths": [256], "evaluation.ruler.limit": 1,
        "evaluation.longbench.limit": 1,
    },
}
SCALING = {"layers": [8, 16], "hidden": [64, 128], "threads": 1}


def task_kinds(names: list[str]) -> dict[str, str]:
    """``{lm-eval name: stand-in kind}`` from lm-eval's registry (offline: its task index)."""
    from .evaluate.lm_tasks import task_needs
    from .evaluate.standin_tasks import kind_of
    from .preflight import task_manager

    manager = task_manager()
    unknown = [n for n in names if n not in manager.task_index]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) in the paper config: {', '.join(unknown)}")
    return {name: kind_of(needs) for name, needs in task_needs(names, manager).items()}


def _set(config: dict, path: str, value) -> None:
    """Cut ``path`` to ``value``; a section the config does not have (no job runs it) stays absent."""
    *parents, key = path.split(".")
    node = config
    for part in parents:
        if not isinstance(node.get(part), dict):
            return
        node = node[part]
    node[key] = copy.deepcopy(value)


def apply_cut(config: dict, cut: str) -> dict:
    if cut not in CUTS:
        raise ValueError(f"unknown cut {cut!r}; known: {', '.join(CUTS)}")
    out = copy.deepcopy(config)
    for path, value in CUTS[cut].items():
        if path == "models":
            missing = [m for m in value if m not in out["models"]]
            if missing:
                raise ValueError(f"cut {cut!r} keeps models the paper config lacks: {', '.join(missing)}")
            out["models"] = {m: out["models"][m] for m in value}
        else:
            _set(out, path, value)
    return out


def job_mem_mb(config: dict, name: str) -> int:
    """What preflight computes a CPU job of ``name`` needs (weights + K/V + activations of its largest
    forward + host overhead), with ``MEMORY_MARGIN``, in MB."""
    from .cache import footprint
    from .preflight import forwards

    shape = standin_shape(config["models"][name]["source"])
    dtype = config["models"][name]["dtype"]
    need = footprint.host_mb_to_load(shape, dtype)
    for runs in forwards(config, name, shape.max_positions).values():
        for _, batch, tokens, all_logits in runs:
            need = max(need, math.ceil(footprint.gpu_bytes(shape, dtype, batch, tokens, all_logits) / 1e6)
                       + footprint.HOST_OVERHEAD_MB)
    return int(math.ceil(need * MEMORY_MARGIN / 100) * 100)


def rehearsal_config(paper: dict, cut: str = "local", gpus: int = 0, kinds: dict[str, str] | None = None,
                     head_dim: int = HEAD_DIM, dtype: str = REHEARSAL_DTYPE, models: list[str] | None = None,
                     threads: int = 1) -> dict:
    """The rehearsal config of ``paper`` (see the module docstring). ``kinds``: the stand-in kind of each
    harness task (default: read from lm-eval's registry). ``head_dim`` 128 and ``dtype`` float16 give
    full-width stand-ins for a GPU (benchmarks/gpu_rehearsal.sh); ``models`` keeps only those models;
    ``threads`` per model job (1: the test cluster's node has 2 CPUs; a GPU machine has CPUs to spare)."""
    if threads < 1:
        raise ValueError(f"threads per model job must be at least 1, got {threads}")
    config = apply_cut(paper, cut)
    if models:  # the paper config's models of these names, whatever the cut keeps
        missing = [m for m in models if m not in paper["models"]]
        if missing:
            raise ValueError(f"--models names models the paper config lacks: {', '.join(missing)}")
        config["models"] = {m: copy.deepcopy(paper["models"][m]) for m in models}
    width = "" if head_dim == HEAD_DIM else f":{head_dim}"
    for name, model in config["models"].items():
        hub_id_of(model["source"])  # a clear error for a source without a stored architecture
        model.update(source=STANDIN_PREFIX + model["source"] + width, dtype=dtype, threads=threads, gpus=gpus,
                     batch_size=1)
    config["calibration"]["text"] = REHEARSAL_TEXT
    config.pop("serving", None)  # vLLM's kernels take no HEAD_DIM-wide heads (see the module docstring)
    if "scaling" in config:
        config["scaling"].update(SCALING)
    evaluation = config.get("evaluation") or {}
    harness, longbench = evaluation.get("harness"), evaluation.get("longbench")
    if longbench and not harness:
        raise ValueError("a rehearsal writes LongBench's stand-ins with the harness tasks': the paper config's "
                         "evaluation.longbench needs an evaluation.harness section")
    if harness:
        names = list(dict.fromkeys(harness["tasks"] + jobs.longbench_tasks(config)))
        kinds = kinds if kinds is not None else task_kinds(names)
        harness.update(tasks=[f"standin_{t}" for t in harness["tasks"]], local_tasks=True,
                       standins={t: kinds[t] for t in names})
        if longbench:
            longbench["tasks"] = [f"standin_{t}" for t in jobs.longbench_tasks(config)]
    for name, model in config["models"].items():
        model["mem_mb"] = job_mem_mb(config, name)
    return config
