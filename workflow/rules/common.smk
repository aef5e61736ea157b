# Path helpers only: which policies and evaluations the config asks for. No computation here.
import json
import os
from itertools import product

from kvsharer import jobs, method_registry, names
from kvsharer.report.code_version import code_version
from snakemake.settings.types import DeploymentMethod


def fmt(x):
    """Numbers as they appear in file names: 0.25 -> '0.25', 0.5 -> '0.5'."""
    return f"{x:g}"


def policy_name(rate, order, metric, threshold, seed):
    return f"r{fmt(rate)}_{order}_{metric}_T{fmt(threshold)}_s{seed}"


S = config["search"]
MAIN_METRIC, MAIN_T = S["metric"], S["threshold"]


def main_policies(order=None):
    """(rate, order, seed) grid at the main metric and threshold; seeds only for the random order."""
    orders = [order] if order else S["orders"]
    return [
        policy_name(rate, o, MAIN_METRIC, MAIN_T, seed)
        for rate, o in product(S["rates"], orders)
        for seed in (S["seeds"] if o == "random" else [0])
    ]


def all_policies():
    names = main_policies()
    for rate in S["ablation_rates"]:
        names += [policy_name(rate, "dissimilar", m, MAIN_T, 0) for m in S["metrics"]]
        names += [policy_name(rate, "dissimilar", MAIN_METRIC, t, 0) for t in S["thresholds"]]
    return list(dict.fromkeys(names))  # ordered, no duplicates


def policy_matches(name, order=None, metric=None, threshold=None):
    """A policy ('r0.25_measured-kl_euclidean_T0.5_s0') of this order / metric / threshold (None: any); never the
    plain model."""
    if name == "plain" or "+" in name:  # the plain model, a setting with a cache method
        return False
    _rate, *fields, _seed = name.split("_")  # order, metric, T<threshold>
    wanted = (order, metric, None if threshold is None else f"T{fmt(threshold)}")
    return all(want is None or got == want for got, want in zip(fields, wanted))


# The headline figure and table (ppl_vs_rate: PPL vs rate of the paper's order and ours, names.HEADLINE_ORDERS, at
# the main metric and threshold, report.smk) and the jobs they need run before the rest: Snakemake does not pass a
# job's priority on to the jobs of its inputs, so each rule of their chain states its own. Calibration 20 (every
# search waits for it), the measured searches 10 (the longest chain), the other headline searches and the PPL of
# every policy the headline reads HEADLINE_PRIORITY, then the controls of the order ablation (similar, random: their
# searches and PPL) ABLATION_PRIORITY, the task jobs 5, the rest (profile, other ablations, corpora) 0.
HEADLINE = {"figure": names.HEADLINE, "table": names.HEADLINE}
HEADLINE_PRIORITY = 8
ABLATION_PRIORITY = 6


def main_priority(order):
    """The priority of a search or PPL job of `order` at the main metric and threshold."""
    return HEADLINE_PRIORITY if order in names.HEADLINE_ORDERS else ABLATION_PRIORITY


def ppl_priority(policy):
    """The plain model's and the headline policies' PPL first, then the order ablation's; the rest after the tasks."""
    if policy == "plain":
        return HEADLINE_PRIORITY
    if not policy_matches(policy, metric=MAIN_METRIC, threshold=MAIN_T):  # an ablation or a cache method
        return 0
    return main_priority(policy.split("_")[1])


def search_priority(wildcards):
    """A measured search first (the DAG's longest chain: each rate starts from the smaller rate's journal), then the
    other searches at the main metric and threshold (the headline's, then the order ablation's), then the other
    ablations'."""
    if wildcards.order.startswith("measured"):
        return 10
    if (wildcards.metric, wildcards.threshold) != (MAIN_METRIC, fmt(MAIN_T)):
        return 0
    return main_priority(wildcards.order)


def table1_policies(orders=None):
    """Plain model, the paper's method (dissimilar order), the measured and the fitted orders at every rate (the
    tasks and passkey score what those searches found on calibration text, not only its PPL); `orders`
    (evaluation.<kind>.orders) keeps only those orders' policies."""
    scored = ["dissimilar"] + [o for o in S["orders"] if o in names.HEADLINE_ORDERS and o != "dissimilar"]
    missing = [o for o in orders or [] if o not in scored]
    if missing:
        raise ValueError(f"evaluation.*.orders names {', '.join(missing)}, which search.orders does not search "
                         f"(scored orders: {', '.join(scored)})")
    return ["plain"] + [p for o in scored if not orders or o in orders for p in main_policies(o)]


def setting(path, absent=None):
    """A config value by its path ("evaluation/longctx/trials") as `validate` filled it in from
    workflow/schemas/config.schema.yaml, which holds every default; `absent` only stands for an optional
    section the config leaves out (whose rules then run no job)."""
    return lookup(dpath=path, within=config, default=absent)


def model_setting(model, key):
    """models.<model>.<key>, its schema default filled in."""
    return config["models"][model][key]


def retry_batch(default_key=None, kind=None):
    """Batch size for a job's attempt: halved on every retry (a job that ran out of GPU memory is
    resubmitted by `retries:` with a smaller batch). 0 means "the stage's default" on the first attempt.
    `kind` (harness, ruler, longbench): evaluation.<kind>.batch_size when set, else the model's batch_size."""

    def batch(wildcards, attempt):
        if kind is not None:
            first = jobs.eval_batch(config, wildcards.model, kind)
        else:
            first = model_setting(wildcards.model, "batch_size") if default_key else setting("calibration/samples")
        if default_key is None and attempt == 1:
            return 0
        return max(1, first // 2 ** (attempt - 1))

    return batch


def batch_arg(wildcards, resources):
    return f"--batch-size {resources.batch}" if resources.batch else ""


def model_gpus(wildcards):
    """GPUs of a job that loads the model (models.<m>.gpus): the Slurm plugin asks for them (--gpus=N)."""
    return jobs.model_gpus(config, wildcards.model)


def ruler_lengths(wildcards):
    """evaluation.ruler.lengths up to models.<m>.max_length."""
    return ",".join(str(x) for x in jobs.ruler_lengths(config, wildcards.model))


def longbench_length_arg(wildcards):
    """--max-length: LongBench prompts truncated to evaluation.longbench.max_length / models.<m>.max_length."""
    cap = jobs.longbench_max_length(config, wildcards.model)
    return f"--max-length {cap}" if cap else ""


def longctx_lengths(wildcards):
    """evaluation.longctx.lengths up to models.<m>.max_length."""
    return ",".join(str(x) for x in jobs.longctx_lengths(config, wildcards.model))


# Compositions: "<policy>+<label>" settings (kvsharer.cache.compose), evaluated by the same stages.
C = config.get("compose", {})


label = method_registry.label  # a cache spec as it appears in paths: 'h2o:0.5' -> 'h2o-0.5', 'int4' -> 'int4'


def compose_bases():
    """The plain model and the paper's policy at every compose rate."""
    return ["plain"] + [policy_name(r, "dissimilar", MAIN_METRIC, MAIN_T, 0) for r in C.get("rates", [])]


def model_policies(model, policies):
    """`policies` without the fitted orders' for a model whose config says `kv_maps: false`."""
    if model_setting(model, "kv_maps"):
        return list(policies)
    return [p for p in policies if not any(policy_matches(p.split("+")[0], order=o) for o in names.FITTED_ORDERS)]


def model_methods(model, specs):
    """`specs` without the token-level methods for a model whose config says `token_methods: false`."""
    if model_setting(model, "token_methods"):
        return list(specs)
    return [s for s in specs if not method_registry.is_token_method(s)]


def compose_settings(kind, model):
    """Settings evaluated by `kind`: token methods and quantization with and without sharing (by the tasks only with
    compose.tasks), MiniCache alone (scored by ppl and harness); the needle-in-a-haystack methods with and without
    sharing (longctx)."""
    quant = [f"int{b}" for b in C.get("quant_bits", [])]
    if kind == "longctx":
        specs = C.get("niah", [])
    elif kind != "ppl" and not setting("compose/tasks", True):  # compose.tasks: false, scored on PPL only
        specs = []
    elif kind in ("ruler", "longbench"):  # long context is where the token methods and quantization matter
        specs = [s for s in C.get("intra", []) if method_registry.is_token_method(s)] + quant
    else:
        specs = C.get("intra", []) + quant
    specs = model_methods(model, specs)
    # a method that composes with sharing runs on every base; a rival of sharing (MiniCache) on the plain model
    names = [f"{base}+{label(spec)}" for spec in specs
             for base in (compose_bases() if method_registry.CacheSpec.parse(spec).with_sharing else ["plain"])]
    if kind in ("ppl", "harness"):
        names += [f"plain+minicache-{fmt(r)}" for r in C.get("minicache_rates", [])]
    return names


def compose_policies():
    return [p for p in compose_bases() if p != "plain"]


EVAL = config["evaluation"]
EVAL_KINDS = {"ppl": ("ppl" in EVAL, all_policies)} | {
    kind: (kind in EVAL, lambda kind=kind: table1_policies(setting(f"evaluation/{kind}/orders")))
    for kind in ("harness", "longctx", "ruler", "longbench")}


def eval_files(kind):
    enabled, which = EVAL_KINDS[kind]
    if not enabled:
        return []
    names = (["plain"] + which() if kind == "ppl" else which()) + compose_policies()
    return [f"results/{m}/eval/{p}/{kind}.json" for m in config["models"]
            for p in model_policies(m, dict.fromkeys(names + compose_settings(kind, m)))]


def policy_files():
    names = dict.fromkeys(all_policies() + compose_policies())
    return [f"results/{m}/policies/{p}.json" for m in config["models"] for p in model_policies(m, names)]


def distance_files():
    metrics = dict.fromkeys([MAIN_METRIC] + S["metrics"])
    return [f"results/{m}/distances/{metric}.json" for m in config["models"] for metric in metrics]


def previous_policy(wildcards):
    """The same search to the next smaller rate the DAG runs, if any: its journal's candidates are this
    search's first ones (kvsharer search --after), so they are not evaluated twice."""
    same = f"_{wildcards.order}_{wildcards.metric}_T{wildcards.threshold}_s{wildcards.seed}"
    rates = sorted({float(p[1:].split("_", 1)[0]) for p in all_policies() + compose_policies() if p.endswith(same)})
    smaller = [r for r in rates if r < float(wildcards.rate)]
    return f"results/{wildcards.model}/policies/r{fmt(smaller[-1])}{same}.json" if smaller else []


def calibration_states(wildcards):
    """The plain run a fast search starts from (calibration.states), if the config asks for it."""
    if S["procedure"] == "fast" and setting("calibration/states"):
        return f"results/{wildcards.model}/calibration_states.safetensors"
    return []


def after_arg(wildcards, input):
    return f"--after {input.after}" if input.get("after") else ""


def policy_input(wildcards):
    """The policy file of an evaluation setting ('<policy>[+<cache label>]'); nothing for the plain model."""
    base = wildcards.policy.split("+")[0]
    if base == "plain":
        return []
    policy = f"results/{wildcards.model}/policies/{base}.json"
    return [policy, names.maps_file(policy)] if policy_matches(base, order="fitted") else policy


def policy_arg(wildcards, input):
    """'--policy <file>' (a fitted policy's input also lists its K/V maps, which the policy file names)."""
    policy = input.get("policy")
    return f"--policy {policy if isinstance(policy, str) else policy[0]}" if policy else ""


def cache_arg(wildcards):
    """'--cache <spec>' for a composed setting ('plain+h2o-0.5' -> '--cache h2o:0.5'), else nothing."""
    _, _, lab = wildcards.policy.partition("+")
    return f"--cache {method_registry.spec_of_label(lab)}" if lab else ""


def chunk_arg(wildcards):
    return f"{cache_arg(wildcards)} --chunk {setting('compose/chunk')}" if "+" in wildcards.policy else ""


def harness_inputs(w):
    inputs = {"model": f"results/models/{w.model}", "policy": policy_input(w)}
    if setting("evaluation/harness/local_tasks"):
        inputs["tasks"] = "results/text/tasks/tasks.json"
    return inputs


def profile_files():
    return [f"results/{m}/profile.csv" for m in config["models"]] if "profile" in config else []


def profile_arg(wildcards, input):
    return ("--profile " + " ".join(input.profile)) if input.get("profile") else ""


def scaling_files():
    return ["results/scaling/search_scaling.json"] if "scaling" in config else []


def scaling_arg(wildcards, input):
    return f"--scaling {input.scaling}" if input.get("scaling") else ""


# vLLM serving (optional: `serving:` in the config; workflow/rules/serving.smk): Table 1's policies in the engine.
SERVING = "serving" in config


def serving_models():
    """serving.models (null: every model of the config); none without a `serving` section."""
    if not SERVING:
        return []
    served = setting("serving/models") or list(config["models"])
    unknown = [m for m in served if m not in config["models"]]
    if unknown:
        raise ValueError(f"serving.models names {', '.join(unknown)}, which models does not define")
    return served


def serving_policies():
    """Table 1's searched policies that vLLM serves beside the plain model: the paper's order and the measured
    ones at every search rate (serving.orders: only those orders')."""
    orders = setting("serving/orders")
    missing = [o for o in orders or [] if o not in S["orders"]]
    if missing:
        raise ValueError(f"serving.orders names {', '.join(missing)}, which search.orders does not search")
    # a fitted order's policy reads through K/V maps that the vLLM plugin does not apply: never served
    return [p for p in table1_policies(orders) if p != "plain" and not any(policy_matches(p, order=o) for o in names.FITTED_ORDERS)]


def serving_files():
    return [f"results/{m}/serving.json" for m in serving_models()]


def serving_arg(wildcards, input):
    return ("--serving " + " ".join(input.serving)) if input.get("serving") else ""


def serving_python(wildcards):
    """The serving job's interpreter: envs/serving.yaml's python with --use-conda, else serving.python (a relative
    path from the repository root: .venv-serve/bin/python by default, built by `make serve-setup`)."""
    if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method:
        return "python"
    python = setting("serving/python")
    return os.path.join(workflow.basedir, python) if "/" in python and not os.path.isabs(python) else python


def serving_policy_files(wildcards):
    return [f"results/{wildcards.model}/policies/{p}.json" for p in serving_policies()]


def serving_policy_args(wildcards, input):
    """--policy NAME=FILE for every policy served (its name as in the result paths)."""
    return " ".join(f"--policy {os.path.basename(path)[:-5]}={path}" for path in input.policies)


TABLES, FIGURES = names.TABLES, names.FIGURES
# the tables and figures this config writes: the serving ones only when vLLM serving is on
REPORT_TABLES = TABLES + (names.SERVING_TABLES if SERVING else ())
REPORT_FIGURES = FIGURES + (names.SERVING_FIGURES if SERVING else ())


def corpus_eval_files():
    """PPL on every further held-out corpus: the plain model, the main policies of every deterministic order
    (the random order's seeds are left out), MiniCache."""
    corpora = EVAL.get("ppl", {}).get("corpora", {}) if "ppl" in EVAL else {}
    orders = [o for o in S["orders"] if o != "random"]
    names = (["plain"] + [p for o in orders for p in main_policies(o)]
             + [f"plain+minicache-{fmt(r)}" for r in C.get("minicache_rates", [])])
    return [f"results/{m}/eval/{p}/ppl_{c}.json" for m in config["models"] for p in model_policies(m, names) for c in corpora]


def all_evals():
    return (eval_files("ppl") + corpus_eval_files() + eval_files("harness") + eval_files("longctx") + eval_files("ruler")
            + eval_files("longbench"))


# The report: which results each table and figure reads (report.smk gives each job exactly these, so that it runs
# as soon as they exist and reruns when one of them changes).


def _family(label):
    """A setting's cache family from its label ('h2o-0.5': intra, 'minicache-0.25': minicache), 'none' without one."""
    return method_registry.family_of(method_registry.spec_of_label(label)) if label else "none"


def _report_inputs(policies=None, evals=None, profile=False, distances=False, scaling=False, serving=False):
    """{policies, evals, profile, distances, scaling, serving}: the result files a table or figure reads. `policies(name)`
    keeps a policy; `evals(family, file)` an evaluation of the plain model or of a kept policy, by its cache
    method's family ('none' without one) and its file (ppl, ppl_<corpus>, harness, ruler, longbench, longctx)."""
    names = [p for p in dict.fromkeys(all_policies() + compose_policies()) if policies and policies(p)]
    kept = {"plain", *names}
    out = []
    for path in all_evals() if evals else []:
        _, setting, file = path.rsplit("/", 2)  # results/<model>/eval/<policy>[+<label>]/<file>.json
        policy, _, label = setting.partition("+")
        if policy in kept and evals(_family(label), file.removesuffix(".json")):
            out.append(path)
    return {
        "policies": [f"results/{m}/policies/{p}.json" for m in config["models"] for p in model_policies(m, names)],
        "evals": out,
        "profile": profile_files() if profile else [],
        "distances": distance_files() if distances else [],
        "scaling": scaling_files() if scaling else [],
        "serving": serving_files() if serving else [],
    }


_MAIN_ORDERS = lambda p: policy_matches(p, metric=MAIN_METRIC, threshold=MAIN_T)  # every order at the main metric and T
_HEADLINE = lambda p: _MAIN_ORDERS(p) and p.split("_")[1] in names.HEADLINE_ORDERS  # the paper's order and ours
_PAPER = lambda p: policy_matches(p, "dissimilar", MAIN_METRIC, MAIN_T)  # the paper's policies
_METRICS = lambda p: policy_matches(p, "dissimilar", threshold=MAIN_T)  # the metric ablation's (and the main one)
_THRESHOLDS = lambda p: policy_matches(p, "dissimilar", metric=MAIN_METRIC)  # the threshold ablation's
_PPL = lambda family, file: family == "none" and file == "ppl"  # PPL on the held-out text, no cache method
_TASKS = ("ppl", "harness", "ruler", "longbench", "longctx")  # every evaluation but PPL on the further corpora
# sharing x cache methods: the plain model and the paper's policies with every cache method, and without
_COMPOSED = dict(policies=_PAPER, evals=lambda family, file: file in _TASKS)

REPORT_INPUTS = {
    "table": {
        "ppl_vs_rate": dict(policies=_HEADLINE, evals=_PPL),
        "table1": dict(policies=_PAPER, evals=lambda family, file: family == "none" and file in _TASKS),
        "order_ablation": dict(policies=_MAIN_ORDERS, evals=_PPL),
        "metric_ablation": dict(policies=_METRICS, evals=_PPL),
        "threshold_ablation": dict(policies=_THRESHOLDS, evals=_PPL),
        "acceptance_by_rank": dict(policies=lambda p: policy_matches(p, "dissimilar")),
        "search_cost": dict(policies=lambda p: True),
        "table2_compose": dict(_COMPOSED, profile=True),
        "quantization": _COMPOSED,
        "minicache": _COMPOSED,
        # every order and MiniCache: PPL on every corpus, the tasks, what the search cost
        "search_procedures": dict(policies=_MAIN_ORDERS, evals=lambda family, file: family in ("none", "minicache")),
        "serving": dict(serving=True),  # the vLLM runs alone: each records its policies' order and rate
    },
    "figure": {
        "ppl_vs_rate": dict(policies=_HEADLINE, evals=_PPL),
        "order_ablation": dict(policies=_MAIN_ORDERS, evals=_PPL),
        "distance_heatmap": dict(policies=_METRICS, distances=True),  # marks a paper's policy per metric
        "acceptance_vs_rank": dict(policies=_THRESHOLDS),
        "threshold_ablation": dict(policies=_THRESHOLDS, evals=_PPL),
        "metric_ablation": dict(policies=_METRICS, evals=_PPL),
        "passkey": dict(policies=_PAPER, evals=lambda family, file: family == "none" and file == "longctx"),
        "niah": dict(policies=_PAPER, evals=lambda family, file: file == "longctx"),
        "serving": dict(serving=True),
        "search_scaling": dict(scaling=True),
        "profile_memory": dict(profile=True),
        "profile_throughput": dict(profile=True),
        "compose": dict(_COMPOSED, profile=True),
        "quantization": _COMPOSED,
        "minicache": _COMPOSED,
    },
}
assert (REPORT_INPUTS["table"].keys() == set(TABLES + names.SERVING_TABLES)
        and REPORT_INPUTS["figure"].keys() == set(FIGURES + names.SERVING_FIGURES))


def report_inputs(kind):
    """The input function of the `table` or `figure` rule."""
    return lambda w: _report_inputs(**REPORT_INPUTS[kind][getattr(w, kind)])

def final_outputs():
    return [f"results/{m}/run_meta.json" for m in config["models"]] + expand("results/tables/{table}.{ext}", table=REPORT_TABLES, ext=["csv", "md"]) + expand(
        "results/figures/{figure}.{ext}", figure=REPORT_FIGURES, ext=["png", "pdf"]
    )


wildcard_constraints:
    model="|".join(map(lambda m: m.replace(".", r"\."), config["models"])),
    rate=r"[0-9.e-]+",
    threshold=r"-?[0-9.e-]+",
    seed=r"\d+",
    order="|".join(names.ORDERS),
    corpus=r"[a-z0-9_]+",
    metric="|".join(names.METRICS),
    table="|".join(names.TABLES + names.SERVING_TABLES),
    figure="|".join(names.FIGURES + names.SERVING_FIGURES),
    policy=r"(plain|r[^/+]+)(\+[a-z0-9.-]+)?",
