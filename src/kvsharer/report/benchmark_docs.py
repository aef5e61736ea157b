"""``docs/benchmarks.md``, generated from one JSON per benchmark so that no measurement on it is copied by hand
(``python -m kvsharer docs benchmarks``; ``tests/test_benchmark_docs.py`` fails when page and folder differ).

The folder (``docs/benchmarks-snapshot/``) holds what each script under ``benchmarks/`` writes (by default under
``results/benchmarks/``), copied as is. Per benchmark the page gives how to run it, what it compares (the words
of :data:`BENCHMARKS`, without numbers) and what its JSON holds: the ratios first, then both sides' times or
bytes, then the setting, and when, from which commit, by which command and on what machine the JSON was
written (``benchmarks/run_facts.py``). A benchmark without a JSON in the folder is listed as not run; a JSON
that belongs to no benchmark is refused. Standard library only: torch-free, like the whole report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .collect import read_json
from .docs import GENERATED

COMMAND = "python -m kvsharer docs benchmarks"
SNAPSHOT = Path("docs/benchmarks-snapshot")  # the committed folder the page is generated from
NOT_RUN = "not run for this snapshot"
MIB = 1 << 20


def ratio(value: float) -> str:
    """A ratio as the page prints it (4 significant digits)."""
    return f"{value:.4g}"


def seconds(value: float) -> str:
    return f"{value:.1f} s" if value >= 10 else f"{value:.2f} s" if value >= 1 else f"{value:.3f} s"


def _all_seconds(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def _bold(name: str, value: float, note: str = "") -> str:
    """A ratio's bullet: ``- **name: 0.7333**`` and an optional note after it."""
    return f"- **{name}: {ratio(value)}**" + (f" {note}" if note else "")


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"
    return ["| " + " | ".join(headers) + " |", rule, *("| " + " | ".join(row) + " |" for row in rows)]


def _percent(rate: float) -> str:
    return f"{rate * 100:.3g} %"


# ------------------------------------------------------------------------------------------------
# what each benchmark's JSON holds, as Markdown lines (ratios first)
# ------------------------------------------------------------------------------------------------


def _sharing_cost(r: dict) -> list[str]:
    shared = r["shared_layers"]
    return [
        _bold("KV bytes ratio (shared / plain)", r["kv_bytes_ratio"],
              f"(the model's shape predicts {ratio(r['kv_bytes_ratio_expected'])})"),
        _bold("prefill time ratio (shared / plain)", r["prefill_time_ratio"],
              f"(medians of {len(r['prefill_s_plain'])} interleaved prefills)"),
        f"- plain: {r['kv_bytes_plain']:,} bytes of KV, prefill {seconds(r['prefill_s_plain_median'])} "
        f"({_all_seconds(r['prefill_s_plain'])})",
        f"- shared: {r['kv_bytes_shared']:,} bytes of KV, prefill {seconds(r['prefill_s_shared_median'])} "
        f"({_all_seconds(r['prefill_s_shared'])})",
        f"- `{r['model']}`, {r['n_layers']} layers of which {len(shared)} share ({_percent(r['rate_effective'])}: "
        f"layers {', '.join(map(str, shared))}), batch {r['batch']} × {r['tokens']} tokens, {r['device']}, "
        f"{r['threads']} torch threads",
    ]


def _search_speed(r: dict) -> list[str]:
    arms = {"official": "the authors' procedure", "fast": "ours",
            "started": "ours, started from the plain run"}
    return [
        _bold("time ratio official / fast", r["speedup"]),
        _bold("time ratio fast started from the plain run / fast", r["started_over_fast"],
              f"(the plain run itself, once per calibration file: {seconds(r['plain_run_seconds'])})"),
        f"- the same policy from all three: {'yes' if r['same_policy'] else 'no'}; similarities within "
        f"{r['max_similarity_difference']:.1e} (official vs fast), identical when started from the plain run",
        *(f"- {arm} ({words}): {seconds(r[f'{arm}_seconds'])}, {r[f'{arm}_candidates_evaluated']} candidates, "
          f"{seconds(r[f'{arm}_seconds_per_candidate'])} per candidate" for arm, words in arms.items()),
        f"- `{r['model']}`, {r['n_layers']} layers, calibration {r['samples']} × {r['tokens']} tokens, rate "
        f"{_percent(r['rate'])} ({r['target']} layers), T = {r['threshold']}, {r['threads']} torch threads",
    ]


def _forwards(value: float | None) -> str:
    """Decoder layers computed, as full forwards of the model over every calibration sample."""
    return "forwards not counted" if value is None else f"{value:.3g} full forwards"


def _fitted_search(r: dict) -> list[str]:
    lines = []
    for rate, row in r["rates"].items():
        lines.append(_bold(f"time ratio fitted / dissimilar at {_percent(float(rate))}", row["fitted_over_dissimilar"]))
        if "measured_over_dissimilar" in row:
            lines.append(_bold(f"time ratio measured-kl / dissimilar at {_percent(float(rate))}",
                               row["measured_over_dissimilar"]))
    for rate, row in r["rates"].items():
        arms = [key for key, value in row.items() if isinstance(value, dict)]
        lines.append(f"- at {_percent(float(rate))}: " + "; ".join(
            f"{arm} {seconds(row[arm]['seconds'])} (median of {_all_seconds(row[arm]['seconds_all'])}), "
            f"{row[arm]['candidates']} candidates, {_forwards(row[arm]['forwards'])}" for arm in arms))
    return [*lines, f"- both searches start from the same plain run of the model ({seconds(r['plain_run_seconds'])}, "
                    f"once per calibration file)",
            f"- `{r['model']}`, {r['n_layers']} layers, calibration {r['samples']} × {r['tokens']} tokens, "
            f"T = {r['threshold']}, {r['repeats']} repeats, {r['threads']} torch threads"]


def _compose(r: dict) -> list[str]:
    rows = [[f"`{name}`", ratio(arm["kv_bytes_ratio"]), ratio(arm["decode_speed_ratio"]), f"{arm['kv_bytes']:,}",
             f"{arm['decode_tokens_per_s']:.1f}", seconds(arm["prefill_s_median"])] for name, arm in r["arms"].items()]
    return [
        *_table(["arm", "KV bytes × plain", "decode speed × plain", "KV bytes", "decode tokens/s (median)",
                 "prefill (median)"], rows), "",
        f"`{r['model']}` ({r['dtype']}), {r['n_layers']} layers; sharing: {len(r['shared_layers'])} layers "
        f"({_percent(r['rate_effective'])}); `{r['method']}` keeps {_percent(r['budget'])} of the tokens; batch "
        f"{r['batch']} × {r['prompt_tokens']} prompt + {r['new_tokens']} new tokens, medians of {r['repeats']}, "
        f"{r['device']}, {r['threads']} torch threads.",
    ]


def _warm_worker(r: dict) -> list[str]:
    own, warm = r["seconds"]["own_process"], r["seconds"]["warm_worker"]
    return [
        _bold("time ratio warm worker / own process (median job)", r["ratio"]),
        f"- own process: {seconds(r['median_own_process'])} per job ({_all_seconds(own)})",
        f"- forked from the warm worker: {seconds(r['median_warm_worker'])} per job ({_all_seconds(warm)}); the "
        f"worker's start-up, once per DAG: {seconds(r['warm_worker_startup_seconds'])}",
        f"- {r['jobs']} `{r['stage']}` jobs per arm, {r['max_tokens']} tokens in windows of {r['window']}; both arms "
        f"scored PPL {r['ppl']:.4f}",
    ]


def _shared_context(r: dict) -> list[str]:
    median, fed = r["seconds_median"], r["tokens_fed"]
    return [
        _bold("time ratio ours / lm-eval's", r["time_ratio"]),
        _bold("tokens fed ratio ours / lm-eval's", r["tokens_ratio"]),
        f"- lm-eval's `HFLM`: {seconds(median['lm_eval'])} (median of {_all_seconds(r['seconds']['lm_eval'])}), "
        f"{fed['lm_eval']:,} tokens fed",
        f"- ours: {seconds(median['ours'])} (median of {_all_seconds(r['seconds']['ours'])}), {fed['ours']:,} "
        f"tokens fed; log-likelihoods within {r['max_abs_loglikelihood_diff']:.1e} of lm-eval's",
        f"- `{r['model']}`, {r['items']} questions × {r['choices']} choices, {r['context_tokens']}-token contexts, "
        f"{r['choice_tokens']}-token choices, batch 1, {r['device']}, {r['threads']} torch threads",
    ]


def _scoring_attention(r: dict) -> list[str]:
    rows = [[f"{p['tokens']:,}", ratio(p["time_ratio"]), ratio(p["peak_ratio"]), seconds(p["reference"]["seconds"]),
             seconds(p["blockwise"]["seconds"]), f"{p['reference']['peak_bytes'] / MIB:.1f}",
             f"{p['blockwise']['peak_bytes'] / MIB:.1f}", f"{p['max_abs_diff']:.1e}"] for p in r["points"]]
    shape = r["shape"]
    method = r["points"][0]["reference"]["peak_method"] if r["points"] else "—"
    return [
        *_table(["T", "time × reference", "peak memory × reference", "reference", "blockwise", "reference MiB",
                 "blockwise MiB", "max abs diff"], rows), "",
        f"Batch {shape['batch']}, {shape['heads']} heads / {shape['kv_heads']} KV heads × {shape['head_dim']}, "
        f"{r['device']}, {r['threads']} torch threads, median of {r['repeats']}; peak memory: {method}, over the "
        f"inputs; blocks of {r['block_bytes'] / MIB:g} MiB.",
    ]


def _serve(r: dict) -> list[str]:
    rows = []
    for name, arm in r["arms"].items():
        if "error" in arm:
            rows.append([f"`{name}`", *["—"] * 9, f"failed: {arm['error']}"])
            continue
        x = arm["ratio_to_plain"]
        rows.append([f"`{name}`", ratio(x["kv_blocks"]), ratio(arm["expected_ratio"]), ratio(x["max_concurrency"]),
                     ratio(x["output_tokens_per_s"]), ratio(x["latency_mean_s"]), str(arm["shared_layers"]),
                     str(arm["kv_blocks"]), str(arm["max_concurrency"]), f"{arm['output_tokens_per_s']:.1f}",
                     f"{arm['latency_mean_s']:.2f}"])
    return [
        *_table(["arm", "KV blocks × plain", "expected L/(L−k)", "max concurrency × plain", "output tok/s × plain",
                 "mean latency × plain", "k", "KV blocks", "max concurrency", "output tok/s", "mean latency (s)"],
                rows), "",
        f"{r['engine']}, `{r['model']}` ({r['layers']} layers, {r['dtype']}), KV cache {r['kv_cache_bytes'] / MIB:g} "
        f"MiB for every arm, blocks of {r['block_size']} tokens; {r['requests']} requests of {r['prompt_tokens']} "
        f"prompt + {r['new_tokens']} new tokens, medians of {r['repeats']} rounds, {r['threads']} engine "
        f"thread(s).{' Policies: ' + r['policies_note'] + '.' if r.get('policies_note') else ''}",
    ]


def _gpu_profile(r: dict) -> list[str]:
    grid = [x for x in r["ratios"] if "kv_bytes_ratio" in x]
    batches = [x for x in r["ratios"] if "max_batch" in x]

    def cell(value):
        return "—" if value is None else ratio(value)

    lines = _table(["model", "batch", "context", "rate", "cache", "KV bytes × plain", "peak × plain",
                    "prefill time × plain", "decode tok/s × plain"],
                   [[x["model"], str(x["batch"]), str(x["context"]), _percent(x["rate"]), x["cache"],
                     cell(x["kv_bytes_ratio"]), cell(x["peak_bytes_ratio"]), cell(x["prefill_s_ratio"]),
                     cell(x["decode_tok_s_ratio"])] for x in grid])
    if batches:
        lines += ["", *_table(["model", "context", "rate", "cache", "largest batch", "× plain"],
                              [[x["model"], str(x["context"]), _percent(x["rate"]), x["cache"], str(x["max_batch"]),
                                ratio(x["max_batch_ratio"])] for x in batches])]
    return [*lines, "", "From " + ", ".join(f"`{p}`" for p in r["inputs"]) + "."]


def _gpu_rehearsal(r: dict) -> list[str]:
    return [f"- wall time: {seconds(r['wall_s'])} on {r['gpu'] or 'the CPU'} (torch {r['torch']})",
            f"- {len(r['results'])} evaluation results; tables: " + ", ".join(f"`{t}`" for t in r["tables"])]


@dataclass(frozen=True)
class Benchmark:
    script: str  # its file under benchmarks/
    run: str  # how to run it for the page's numbers (its JSON records the exact command that wrote it)
    compares: str  # what the two sides are, in words: no measured number
    render: Callable[[dict], list[str]]  # its JSON -> Markdown lines, ratios first
    json: str = ""  # its JSON's name (a glob) in the snapshot folder; default <script stem>.json

    @property
    def pattern(self) -> str:
        return self.json or f"{Path(self.script).stem}.json"


SMOLLM = "results/models/smollm2-135m"
BENCHMARKS = (
    Benchmark("sharing_cost.py", "python benchmarks/sharing_cost.py",
              "The demo model plain vs with a share of its layers (`--rate`) reading another layer's KV cache "
              "(the spread policy: the cost does not depend on which layers share, only on how many): the KV "
              "cache's bytes after one prefill and the prefill's time, the two arms interleaved.", _sharing_cost),
    Benchmark("compose.py", "python benchmarks/compose.py",
              "Four arms on the same model and prompt: plain, layer sharing, a token method (`--method`) and both "
              "together; the KV bytes held after greedy generation and the decode speed (tokens/s after the "
              "prefill), each as a ratio to plain. The token methods score tokens in a blockwise fp32 attention, "
              "so their speed includes that scoring.", _compose),
    Benchmark("search_speed.py",
              "python benchmarks/search_speed.py --calibration results/smollm2-135m/calibration.safetensors",
              "The policy search on one calibration file: the authors' procedure vs ours (the same candidates, "
              "the same policy), and ours started from the plain model's calibration run (`calibration.states`, "
              "computed once per calibration file, its time reported apart).", _search_speed),
    Benchmark("fitted_search.py",
              "python benchmarks/fitted_search.py --calibration results/smollm2-135m/calibration.safetensors "
              "--rates 0.125,0.25,0.375",
              "The fitted order's search vs the paper's dissimilar one, both from the same plain run of the "
              "demo's calibration file, the arms alternating which goes first: the fitted time includes "
              "everything it adds (un-rotating the keys, least-squares fits of every layer pair, their ranking, "
              "the maps applied in every candidate). No quality here: `search_procedures` in "
              "[results.md](results.md) scores the policies.", _fitted_search),
    Benchmark("warm_worker.py",
              f"python benchmarks/warm_worker.py --model {SMOLLM} --text results/text/evaluation.txt",
              "The DAG's per-job cost: the same `evaluate-ppl` job in its own `python -m kvsharer` process vs "
              "forked from the warm worker (imports done once per DAG), alternating job by job, timed from "
              "process start to exit as Snakemake sees a job.", _warm_worker),
    Benchmark("shared_context.py", "python benchmarks/shared_context.py",
              "Multiple-choice scoring at batch 1 on random token ids: lm-eval's `HFLM` (one forward over context "
              "+ choice per choice) vs the harness stage's scoring (the context prefilled once, each choice "
              "scored from a copy of its cache), alternating; time, tokens fed to the model and the largest "
              "log-likelihood difference.", _shared_context),
    Benchmark("scoring_attention.py", "python benchmarks/scoring_attention.py",
              "The token methods' scoring attention for one layer of the demo model's shape over a prefill of T "
              "tokens: the old full-matrix implementation (it materialises the fp32 [B, H, T, T] probabilities) "
              "vs the blockwise one, each arm in a fresh process so that its peak memory is its own.",
              _scoring_attention),
    Benchmark("serve.py", ".venv-serve/bin/python benchmarks/serve.py",
              "Plain vLLM vs vLLM serving spread sharing policies (and plain and 25 % again with an fp8 KV "
              "cache), every engine at the same KV-cache budget, the same request set through every arm in turn: "
              "KV blocks allocated, requests that fit at once, output tokens/s and latency "
              "([serving.md](serving.md)).", _serve),
    Benchmark("gpu_profile.sh", "bash benchmarks/gpu_profile.sh",
              "On a CUDA GPU: the `profile` stage on random-initialised models of real shapes in fp16 "
              "(`random:llama-2-7b`, `random:llama-3.1-8b`: weights do not change the cost, nothing is "
              "downloaded), sharing rates × none/H2O/PyramidInfer/int8/int4/MiniCache; every setting's KV bytes, "
              "peak memory, prefill time, decode speed and largest batch as ratios to the plain model of the same "
              "run, computed by `benchmarks/profile_ratios.py` (its `ratios.json` is this benchmark's JSON). "
              "`--smoke` runs the same pipeline at toy size on the CPU (tested).", _gpu_profile),
    Benchmark("gpu_serve.sh", "PYTHON=/path/to/venv-with-vllm/bin/python bash benchmarks/gpu_serve.sh",
              "`benchmarks/serve.py` on a CUDA GPU with random-weight models of real 7B/8B shapes: plain vs "
              "spread sharing policies at one KV-cache budget, one JSON per model (`<model>.json`, kept here as "
              "`gpu_serve.<model>.json`).", _serve, json="gpu_serve.*.json"),
    Benchmark("gpu_rehearsal.sh", "bash benchmarks/gpu_rehearsal.sh",
              "Not a comparison: the rehearsal of `config/paper.yaml` at full width (7B stand-ins with random "
              "fp16 weights) on one CUDA GPU without Slurm, its wall time and the tables it wrote "
              "(`gpu_rehearsal.json`).", _gpu_rehearsal),
)
HELPERS = {  # files of benchmarks/ that are no benchmark of their own
    "profile_ratios.py": "the ratios of `gpu_profile.sh`",
    "run_facts.py": "when, from which commit, by which command and on what machine a benchmark's JSON was written",
}


# ------------------------------------------------------------------------------------------------
# the page
# ------------------------------------------------------------------------------------------------


def facts_line(r: dict) -> str:
    """When, from which commit, by which command and on what machine the JSON was written (what it records)."""
    if "started" not in r:
        return "When, from which commit and on what machine: not recorded in this JSON."
    machine = r.get("machine", {})
    where = ", ".join(str(x) for x in (machine.get("host"), f"{machine.get('cpu_count')} CPUs",
                                        machine.get("gpu") or "no GPU", machine.get("platform")))
    load = machine.get("load_average")
    load = f"; load average at the end {' / '.join(f'{x:.2f}' for x in load)} (1 / 5 / 15 min)" if load else ""
    return (f"Ran {r['started']} for {seconds(r['wall_s'])}, commit `{r.get('commit')}`, on {where}{load}: "
            f"`{r['command']}`.")


def _section(bench: Benchmark, snapshot: Path, label: str) -> list[str]:
    lines = [f"## `benchmarks/{bench.script}`", "", f"Run: `{bench.run}`", "", bench.compares, ""]
    files = sorted(snapshot.glob(bench.pattern))
    if not files:
        return [*lines, f"*{NOT_RUN.capitalize()}* (no `{bench.pattern}` in `{label}`).", ""]
    for path in files:
        result = read_json(path, "benchmark")
        try:
            body = bench.render(result)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path} is not what benchmarks/{bench.script} writes: {err!r}") from None
        lines += [f"Measured (`{label}/{path.name}`):", "", *body, "", facts_line(result), ""]
    return lines


def benchmarks_page(snapshot: Path, label: str | None = None) -> str:
    """``docs/benchmarks.md`` from the JSON files of ``snapshot`` (named on the page as ``label``, default the
    folder as given). Raises FileNotFoundError when ``snapshot`` is no folder, ValueError for a JSON that no
    benchmark writes or that its benchmark cannot read."""
    if not snapshot.is_dir():
        raise FileNotFoundError(f"{snapshot} is not a folder of benchmark JSON (the committed one: {SNAPSHOT})")
    label = label or snapshot.as_posix()
    known = {path for bench in BENCHMARKS for path in snapshot.glob(bench.pattern)}
    stray = sorted(p.name for p in snapshot.glob("*.json") if p not in known)
    if stray:
        raise ValueError(f"{snapshot} holds JSON that no benchmark writes: {', '.join(stray)}")
    lines = [
        GENERATED.format(command=COMMAND),
        "# Benchmarks",
        "",
        "Side-by-side measurements of what the method and the pipeline cost. Each benchmark is one command that "
        "measures both sides in one run on the same machine, prints their ratio and writes it with both sides' "
        "numbers to JSON (by default under `results/benchmarks/`); a ratio of two arms measured together says more "
        "than either arm's time, which moves with the machine's load.",
        "",
        f"This page is generated (`{COMMAND}`) from one such JSON per benchmark, copied as is into `{label}/`: "
        "every number below is read from those files, and `tests/test_benchmark_docs.py` fails when the page "
        "and the folder differ. Each JSON records when it ran, from which commit, by which command and on what "
        "machine (`benchmarks/run_facts.py`). To update a benchmark's numbers, run it, copy its JSON into the "
        "folder and regenerate the page.",
        "",
        "Also in `benchmarks/`: " + "; ".join(f"`benchmarks/{name}`: {what}" for name, what in HELPERS.items()) + ".",
        "",
    ]
    for bench in BENCHMARKS:
        lines += _section(bench, snapshot, label)
    lines += [
        "Where the demo's own time goes (job-seconds per stage, the warm worker's saving, `make demo` and "
        "`make demo-full` wall times): [demo.md](demo.md). Search-time scalability (`search-scaling`): "
        "[findings.md](findings.md).",
    ]
    return "\n".join(lines).rstrip("\n") + "\n"
