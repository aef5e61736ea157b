"""The Snakemake DAG, run for real on a tiny config (tiny random model, a few hundred tokens)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import save_tiny_model

REPO = Path(__file__).resolve().parents[1]


def tiny_config(model_dir: Path) -> dict:
    return {
        "models": {"tiny": {"source": str(model_dir), "dtype": "float32", "batch_size": 4, "threads": 1}},
        "calibration": {"text": "embedded:pydoc", "eval_fraction": 0.5, "samples": 8, "tokens": 16,
                        "states": True},
        "search": {
            "procedure": "fast", "rates": [0.25, 0.5], "orders": ["dissimilar", "similar", "random", "measured-kl"],
            "measured": {"sources": 2, "refresh": 2},
            "metric": "euclidean", "threshold": 0.5, "seeds": [0, 1], "ablation_rates": [0.25],
            "metrics": ["euclidean", "cosine"], "thresholds": [0.5, 0.9],
        },
        "scaling": {"layers": [4, 8], "hidden": [64], "samples": 4, "tokens": 8},
        "profile": {"rates": [0, 0.5], "methods": ["none", "h2o:0.5"], "batch_sizes": [1], "contexts": [32],
                    "new_tokens": 2},
        "compose": {"rates": [0.5], "intra": ["h2o:0.5"], "quant_bits": [4], "minicache_rates": [0.25],
                    "niah": ["h2o:0.5"], "chunk": 16},
        "evaluation": {
            "ppl": {"max_tokens": 256, "window": 64, "corpora": {"docstrings": "embedded:docstrings"}},
            "harness": {"tasks": ["kvs_next_sentence"], "local_tasks": True, "limit": 4},
            "longctx": {"lengths": [256, 384], "depths": [0.0, 1.0], "trials": 1, "seed": 0},
        },
    }


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(workdir / "config.yaml"), "--cores", "2", *args]
    # `python` in the rules must be this interpreter (CI runs .venv/bin/python without activating the venv)
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    if check and proc.returncode != 0:
        logs = "\n".join(f"--- {p}\n{p.read_text()[-2000:]}" for p in (workdir / "logs").rglob("*.log"))
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stderr[-4000:]}\n{logs[-6000:]}")
    return proc


@pytest.fixture(scope="module")
def dag_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("dag")
    model_dir = save_tiny_model(workdir / "tiny-model", n_layers=8)
    (workdir / "config.yaml").write_text(yaml.safe_dump(tiny_config(model_dir)))
    snakemake(workdir)
    return workdir


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_dag_produces_every_result(dag_run):
    res = dag_run / "results" / "tiny"
    policies = sorted((res / "policies").glob("*.json"))
    # 2 rates x (dissimilar + similar + 2 random seeds + measured-kl) + cosine + T=0.9 ablations at 25 %
    assert len(policies) == 12
    for path in policies:
        data = _load(path)
        assert len(data["map"]) == 8 and data["target"] == round(data["rate_requested"] * 8)
    plain = _load(res / "eval" / "plain" / "ppl.json")
    assert plain["num_shared"] == 0 and plain["ppl"] > 1
    shared = _load(res / "eval" / "r0.5_dissimilar_euclidean_T0.5_s0" / "ppl.json")
    policy = _load(res / "policies" / "r0.5_dissimilar_euclidean_T0.5_s0.json")
    assert shared["map"] == policy["map"]
    measured = _load(res / "policies" / "r0.5_measured-kl_euclidean_T0.5_s0.json")
    assert measured["settings"]["sources"] == 2 and measured["forwards"] > 0 and measured["num_shared"] >= 1
    # a random tiny model's similarities are low: the search may stop where no candidate clears T = 0.5
    if not measured["complete"]:
        last = max(k for k, t in enumerate(measured["trace"]) if t["accepted"])
        assert measured["stopped"] == "threshold" and measured["trace"][last + 1:]
        assert all(t["similarity"] <= 0.5 for t in measured["trace"][last + 1:])
    second = _load(res / "eval" / "r0.5_measured-kl_euclidean_T0.5_s0" / "ppl_docstrings.json")
    assert second["corpus"] == "docstrings" and second["map"] == measured["map"] and second["ppl"] > 1
    harness = _load(res / "eval" / "r0.25_dissimilar_euclidean_T0.5_s0" / "harness.json")
    assert 0 <= harness["tasks"]["kvs_next_sentence"]["acc"] <= 1
    longctx = _load(res / "eval" / "plain" / "longctx.json")
    assert {(c["length"], c["depth"]) for c in longctx["cells"]} == {(256, 0.0), (256, 1.0), (384, 0.0), (384, 1.0)}
    assert (dag_run / "logs" / "tiny" / "calibrate.log").read_text().count("written to") == 1
    scaling = _load(dag_run / "results" / "scaling" / "search_scaling.json")
    assert scaling["factors"]["policies"] == 2  # the real dissimilar searches of both rates
    meta = _load(res / "run_meta.json")
    assert meta["model"] == "tiny" and len(meta["config_sha256"]) == 64 and meta["versions"]["torch"]
    # compositions: each cache method alone and with the 50 % policy, streamed in chunks of 16 tokens
    both = _load(res / "eval" / "r0.5_dissimilar_euclidean_T0.5_s0+h2o-0.5" / "ppl.json")
    assert (both["cache"], both["chunk"], both["map"]) == ("h2o:0.5", 16, policy["map"])
    stored = 8 - shared["num_shared"]
    assert plain["kv_fraction"] == 1.0 and shared["kv_fraction"] == stored / 8  # what the policy leaves storing
    assert both["kv_fraction"] == shared["kv_fraction"] * 0.5  # and H2O keeps half of that
    quant = _load(res / "eval" / "plain+int4" / "harness.json")
    assert quant["cache_family"] == "quant" and 0 <= quant["tasks"]["kvs_next_sentence"]["acc"] <= 1
    mini = _load(res / "eval" / "plain+minicache-0.25" / "ppl.json")
    assert mini["cache"] == "minicache:0.25" and 0.75 < mini["kv_fraction"] < 1
    niah = _load(res / "eval" / "r0.5_dissimilar_euclidean_T0.5_s0+h2o-0.5" / "longctx.json")
    assert len(niah["cells"]) == 4 and niah["cache"] == "h2o:0.5"


def both_fraction(res: Path) -> float:
    return _load(res / "tiny" / "eval" / "r0.5_dissimilar_euclidean_T0.5_s0+h2o-0.5" / "ppl.json")["kv_fraction"]


def test_tables_hold_the_numbers_the_stages_computed(dag_run):
    import csv

    res = dag_run / "results"
    with open(res / "tables" / "table1.csv") as fh:
        rows = list(csv.DictReader(fh))
    plain = _load(res / "tiny" / "eval" / "plain" / "ppl.json")["ppl"]
    half = _load(res / "tiny" / "eval" / "r0.5_dissimilar_euclidean_T0.5_s0" / "ppl.json")["ppl"]
    by_rate = {float(r["rate_pct"]): r for r in rows}
    assert float(by_rate[0.0]["ppl"]) == pytest.approx(plain)
    assert float(by_rate[50.0]["ppl"]) == pytest.approx(half)
    harness = _load(res / "tiny" / "eval" / "r0.25_dissimilar_euclidean_T0.5_s0" / "harness.json")
    assert float(by_rate[25.0]["kvs_next_sentence (acc)"]) == pytest.approx(harness["tasks"]["kvs_next_sentence"]["acc"])
    with open(res / "tiny" / "profile.csv") as fh:
        profile = list(csv.DictReader(fh))
    assert len(profile) == 4 and all(r["kv_bytes"] == r["expected_kv_bytes"] for r in profile)
    with open(res / "tables" / "table2_compose.csv") as fh:
        table2 = list(csv.DictReader(fh))
    assert [(float(r["rate_pct"]), r["cache"]) for r in table2] == [(0, "none"), (0, "h2o:0.5"), (50, "none"),
                                                                    (50, "h2o:0.5")]
    assert float(table2[3]["kv_pct"]) == 100 * both_fraction(res) and float(table2[3]["decode_tok_s"]) > 0
    with open(res / "tables" / "quantization.csv") as fh:
        assert [(float(r["rate_pct"]), int(r["kv_bits"])) for r in csv.DictReader(fh)] == [(0, 16), (0, 4), (50, 16),
                                                                                           (50, 4)]
    with open(res / "tables" / "minicache.csv") as fh:
        assert {r["method"] for r in csv.DictReader(fh)} == {"plain", "KVSharer", "MiniCache"}
    with open(res / "tables" / "search_procedures.csv") as fh:
        procedures = {(float(r["rate_pct"]), r["method"]): r for r in csv.DictReader(fh)}
    measured = procedures[(50.0, "measured-kl")]
    second = _load(res / "tiny" / "eval" / "r0.5_measured-kl_euclidean_T0.5_s0" / "ppl_docstrings.json")
    assert float(measured["ppl:docstrings"]) == pytest.approx(second["ppl"])
    assert {m for r, m in procedures if r == 50.0} == {"dissimilar", "similar", "random (mean of 2)", "measured-kl"}
    assert float(procedures[(25.0, "MiniCache")]["kv_pct"]) > 75
    for name in ("ppl_vs_rate", "distance_heatmap", "acceptance_vs_rank", "threshold_ablation", "metric_ablation",
                 "passkey", "search_scaling", "profile_memory", "profile_throughput", "compose", "quantization",
                 "minicache", "niah"):
        for ext in ("png", "pdf"):
            assert (res / "figures" / f"{name}.{ext}").stat().st_size > 1000



def test_each_table_and_figure_reads_exactly_the_results_it_shows(dag_run, tmp_path):
    """A table or figure job is given only the results it reads (REPORT_INPUTS, workflow/rules/common.smk), so that
    it runs as soon as they exist: built from every result of the DAG instead, every table and figure is the same
    file."""
    from kvsharer.names import FIGURES, TABLES

    res = dag_run / "results"
    files = lambda pattern: sorted(str(p.relative_to(dag_run)) for p in res.glob(pattern))
    every = ["--policies", *files("tiny/policies/*.json"), "--evals", *files("tiny/eval/*/*.json"),
             "--profile", *files("tiny/profile.csv"), "--main-metric", "euclidean", "--main-threshold", "0.5"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    for stage, extra in (("tables", []), ("figures", ["--distances", *files("tiny/distances/*.json"),
                                                      "--scaling", "results/scaling/search_scaling.json"])):
        subprocess.run([sys.executable, "-m", "kvsharer", stage, *every, *extra, "--out-dir", str(tmp_path / stage)],
                       cwd=dag_run, env=env, check=True, capture_output=True)
    for folder, names, exts in (("tables", TABLES, ("csv", "md")), ("figures", FIGURES, ("png", "pdf"))):
        for name in names:
            for ext in exts:
                built = (tmp_path / folder / f"{name}.{ext}").read_bytes()
                assert built == (res / folder / f"{name}.{ext}").read_bytes(), f"{folder}/{name}.{ext}"


def _dry_run_jobs(out: str) -> tuple[dict[str, int], list[tuple[str, str, int]]]:
    """A dry run's "Job stats" ({rule: jobs}) and its jobs: (rule, output, priority)."""
    stats = out.split("Job stats:")[1].split("total")[0]
    jobs = [(rule, (re.findall(r"output: (.*)", body) or [""])[0], int((re.findall(r"priority: (\d+)", body) or [0])[0]))
            for rule, body in re.findall(r"^(?:local)?rule (\w+):\n((?:    .*\n)*)", out, re.M)]
    return {rule: int(n) for rule, n in re.findall(r"^(\w+)\s+(\d+)$", stats, re.M)}, jobs


def test_the_headline_figure_and_table_need_only_the_searches_and_ppl_they_show(tmp_path, tiny_model_dir):
    """ppl_vs_rate (PPL vs rate of the paper's order and ours at the main metric and T) waits for no control order,
    task, profile, distance, ablation or further-corpus job, and every job it needs outranks those (rule priorities:
    Snakemake does not pass a job's priority on to the jobs of its inputs), so it is written first; the order
    ablation's controls come next, before the task jobs."""
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tiny_config(tiny_model_dir)))
    stats, chain = _dry_run_jobs(snakemake(tmp_path, "-n", "results/figures/ppl_vs_rate.png",
                                           "results/tables/ppl_vs_rate.md").stdout)
    # 2 rates x (dissimilar, measured-kl), their PPL and the plain model's
    assert stats == {"prepare_model": 1, "prepare_text": 1, "calibrate": 1, "calibration_states": 1, "search": 4,
                     "evaluate_ppl": 5, "figure": 1, "table": 1}
    stats, jobs = _dry_run_jobs(snakemake(tmp_path, "-n").stdout)
    assert len(jobs) == sum(stats.values()) and {"profile", "evaluate_harness", "distances"} <= set(stats)
    needed = {output for _, output, _ in chain}
    # the two jobs every job waits for aside, the headline's chain runs before any other job that is ready beside
    # it (make_tasks, a second's work, before the task jobs; a table or figure as soon as its inputs exist)
    first = [priority for rule, output, priority in jobs if output in needed and rule not in ("prepare_model",
                                                                                                "prepare_text")]
    rest = {output: priority for rule, output, priority in jobs
            if output not in needed and rule not in ("make_tasks", "table", "figure")}
    assert len(first) == len(chain) - 2 and min(first) > max(rest.values()), rest
    controls = {output: priority for rule, output, priority in jobs
                if rule in ("search", "evaluate_ppl") and re.search(r"_(similar|random)_euclidean_T0.5_s\d+(/ppl)?\.json", output)}
    assert len(controls) == 2 * 3 * 2  # (similar, 2 random seeds) x 2 rates: search and PPL
    harness = [priority for rule, _, priority in jobs if rule == "evaluate_harness"]
    assert min(controls.values()) > max(harness)


def test_compose_tasks_false_scores_the_cache_methods_on_ppl_only(tmp_path, tiny_model_dir):
    """compose.tasks: false (the demo) drops the token methods' and quantization's task jobs, not their PPL nor
    MiniCache's task jobs."""
    def evals(config):
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
        _, jobs = _dry_run_jobs(snakemake(tmp_path, "-n").stdout)
        return {output.split("/eval/")[1] for rule, output, _ in jobs if rule.startswith("evaluate") and "+" in output}

    config = tiny_config(tiny_model_dir)
    both = evals(config)
    config["compose"]["tasks"] = False
    ppl_only = evals(config)
    assert {"plain+h2o-0.5/harness.json", "r0.5_dissimilar_euclidean_T0.5_s0+int4/harness.json"} <= both - ppl_only
    assert not any(e.endswith("harness.json") and "minicache" not in e for e in ppl_only)
    assert {"plain+h2o-0.5/ppl.json", "plain+minicache-0.25/harness.json", "plain+h2o-0.5/longctx.json"} <= ppl_only

def test_results_notebook_runs_headless_on_the_dag_results(dag_run):
    """notebooks/results.ipynb, executed by a Jupyter kernel in the DAG's folder (as if opened there): no
    cell fails, every table of results/tables is shown under its name, every figure PNG is embedded."""
    import base64

    import nbformat
    from nbclient import NotebookClient

    from kvsharer.names import FIGURES

    notebook = nbformat.read(REPO / "notebooks" / "results.ipynb", as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(dag_run)}}).execute()  # raises on a failing cell
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    shown = "\n".join(out.get("data", {}).get("text/markdown", "") for out in outputs)
    tables = sorted(p.stem for p in (dag_run / "results" / "tables").glob("*.csv"))
    assert "table1" in tables and all(f"### {name}" in shown for name in tables)
    pngs = [base64.b64decode(out["data"]["image/png"]) for out in outputs if "image/png" in out.get("data", {})]
    figures = sorted((dag_run / "results" / "figures").glob("*.png"))
    assert len(figures) == len(FIGURES) and sorted(pngs) == sorted(p.read_bytes() for p in figures)


def test_rerun_does_nothing(dag_run):
    proc = snakemake(dag_run, "-n")
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_changing_one_rate_reruns_only_what_depends_on_it(dag_run):
    config = yaml.safe_load((dag_run / "config.yaml").read_text())
    config["search"]["rates"] = [0.25, 0.375]
    changed = dag_run / "config-changed.yaml"
    changed.write_text(yaml.safe_dump(config))
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(dag_run),
         "--configfile", str(changed), "--cores", "1", "-n", "--quiet", "rules"],
        capture_output=True, text=True, env={**os.environ, "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])},
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "search" in out and "calibrate" not in out and "prepare_model" not in out


def test_bad_config_fails_validation_before_any_job(tmp_path):
    config = tiny_config(tmp_path / "nowhere")
    config["search"]["ratez"] = [0.25]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake(tmp_path, "-n", check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "Error validating config file" in out and "'ratez' was unexpected" in out
    config = tiny_config(tmp_path / "nowhere")
    config["search"]["rates"] = [1.5]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake(tmp_path, "-n", check=False)
    assert proc.returncode != 0 and "1.5 is greater than or equal to the maximum of 1" in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists()


def test_preflight_refuses_bad_models_before_any_job(tmp_path, tiny_model_dir):
    config = tiny_config(tmp_path / "no-such-model")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake(tmp_path, "-n", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "config check failed before any job was submitted" in out
    assert "no-such-model" in out
    config = tiny_config(tiny_model_dir)
    config["search"]["rates"] = [0.25, 0.9]  # 0.9 x 8 layers: 7.2 -> would leave no layer storing KV
    config["evaluation"]["longctx"]["lengths"] = [4096]  # beyond the tiny model's 512-token window
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    out = "".join(snakemake(tmp_path, "-n", check=False).stdout)
    assert "sharing rate 0.9 is impossible for its 8 layers" in out
    assert "passkey length 4096 + 8 answer tokens = 4104 exceeds its window of 512 tokens" in out
    assert not (tmp_path / "results").exists()
    from transformers import ZayaConfig  # fused qkv_proj (a convolutional attention): no adapter, refused by name

    ZayaConfig(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
               vocab_size=300, pad_token_id=0, eos_token_id=2, bos_token_id=1).save_pretrained(tmp_path / "zaya")
    config["models"]["tiny"]["source"] = str(tmp_path / "zaya")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    out = snakemake(tmp_path, "-n", check=False).stdout
    assert "fused projection 'qkv_proj'" in out and "no adapter is registered for ZayaForCausalLM" in out


def test_paper_config_plans_offline():
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--configfile", "config/paper.yaml", "--cores", "1", "--quiet",
         "rules", "--directory", str(REPO)], capture_output=True, text=True, cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "search" in out and "evaluate_harness" in out


def test_lint_is_clean(tmp_path, tiny_model_dir):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tiny_config(tiny_model_dir)))
    proc = snakemake(tmp_path, "--lint", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Lints for" not in proc.stdout + proc.stderr


def test_killed_dag_resumes_without_redoing_finished_jobs(tmp_path, tiny_model_dir):
    """SIGKILL the whole Snakemake process group mid-run, `--unlock`, rerun: finished results keep their
    policy (a search Snakemake had not yet booked as finished is replayed from its journal, evaluating
    nothing again), nothing half-written is ever read, and the run completes."""
    import signal
    import time

    config = tiny_config(tiny_model_dir)
    config["search"].update(rates=[0.25, 0.5], orders=["dissimilar", "similar"], seeds=[0], ablation_rates=[])
    config["evaluation"] = {"ppl": {"max_tokens": 256, "window": 64}}
    config.pop("scaling")
    config.pop("profile")
    config.pop("compose")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
           "--configfile", str(tmp_path / "config.yaml"), "--cores", "2"]
    env = {**os.environ, "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    policies = tmp_path / "results" / "tiny" / "policies"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(list(policies.glob("*.json"))) < 2:
        time.sleep(0.05)
    assert proc.poll() is None, "the DAG finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # snakemake and every job it started
    proc.wait()
    done = {p: (p.stat().st_mtime_ns, json.loads(p.read_text())["map"]) for p in policies.glob("*.json")}
    assert len(done) >= 2
    # what a user does after a kill: release Snakemake's lock, then run again
    subprocess.run(cmd + ["--unlock"], env=env, capture_output=True, text=True, timeout=120, check=True)
    rerun = subprocess.run(cmd + ["--rerun-incomplete"], env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    for path, (mtime, share_map) in done.items():
        data = json.loads(path.read_text())
        assert data["map"] == share_map
        if path.stat().st_mtime_ns != mtime:
            # Snakemake reruns a job killed before it recorded the job as finished; the search's journal
            # then answers every candidate: no candidate is evaluated twice
            assert data["candidates_evaluated"] == 0 and data["candidates_resumed"] == len(data["trace"])
    assert len(list(policies.glob("*.json"))) == 4 and (tmp_path / "results" / "tables" / "table1.csv").exists()
    for path in policies.glob("*.json"):
        json.loads(path.read_text())  # every result is whole


def test_max_length_caps_one_models_passkey_lengths(tmp_path, tiny_model_dir):
    """models.<m>.max_length skips the longer passkey lengths on that model only; every passkey job generates
    evaluation.longctx.answer_tokens answer tokens (what preflight adds to each length against the window)."""
    import re

    config = tiny_config(tiny_model_dir)
    config["models"]["short"] = {**config["models"]["tiny"], "max_length": 256, "gpus": 2}
    config["evaluation"]["longctx"]["answer_tokens"] = 6
    config["profile"]["memory_gb"] = 3
    config.pop("compose")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    out = snakemake(tmp_path, "-n", "-p").stdout
    calls = re.findall(r"evaluate-longctx --model results/models/(\w+) .*?--lengths (\S+) .*?--max-new-tokens (\d+)", out)
    assert {(m, lengths, n) for m, lengths, n in calls} == {("tiny", "256,384", "6"), ("short", "256", "6")}
    # a model on 2 GPUs: loaded across them, and its profile's max-batch rows get both GPUs' memory
    assert set(re.findall(r"kvsharer --threads \d+ --gpus (\d+) \S+ --model results/models/short", out)) == {"2"}
    assert re.findall(r"profile --model results/models/(\w+) .*?--memory-gb (\S+)", out) and \
        dict(re.findall(r"profile --model results/models/(\w+) .*?--memory-gb (\S+)", out)) == {"tiny": "3", "short": "6"}


def test_ruler_runs_through_the_harness_stage_for_policies_and_token_methods(tmp_path, tiny_model_dir):
    """evaluation.ruler plans one evaluate-harness job per setting of Table 1 (plain, the paper's and the measured
    policies) and per token method and quantization, alone and with sharing, at the lengths up to each
    model's max_length."""
    import re

    config = tiny_config(tiny_model_dir)
    config["models"]["short"] = {**config["models"]["tiny"], "max_length": 256}
    config["evaluation"]["ruler"] = {"tasks": ["niah_single_1", "niah_multikey_2"], "lengths": [384, 256], "limit": 3}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    out = snakemake(tmp_path, "-n", "-p").stdout
    calls = re.findall(r"evaluate-harness --model results/models/(\w+) (.*?)--tasks niah_single_1,niah_multikey_2 "
                       r"--max-seq-lengths (\S+) --limit 3 .*?--out results/\w+/eval/(\S+)/ruler.json", out)
    settings = {(model, setting) for model, _, _, setting in calls}
    policies = {s for _, s in settings if "+" not in s and s != "plain"}
    assert policies and all(re.search(r"_(dissimilar|measured-kl)_euclidean_T", p) for p in policies)  # Table 1's
    assert {("tiny", "plain"), ("tiny", "plain+h2o-0.5")} <= settings
    assert any(s.endswith("+h2o-0.5") and not s.startswith("plain") for _, s in settings)  # with sharing
    assert {("tiny", "plain+int4")} <= settings  # quantization too; MiniCache (a rival of sharing) not
    assert not any("minicache" in s for _, s in settings)
    for model, args, lengths, setting in calls:
        assert lengths == ("384,256" if model == "tiny" else "256")
        assert ("--cache h2o:0.5" in args) == setting.endswith("+h2o-0.5")
        assert ("--cache int4" in args) == setting.endswith("+int4")
        assert ("--policy" in args) == (setting.split("+")[0] != "plain")


def test_ruler_lengths_past_a_models_window_are_skipped_for_it(tmp_path, tiny_model_dir):
    """RULER at each model's window: a length longer than the window its folder's config.json gives is not
    planned for that model (the paper config lists 4k..128k for models of 4k, 32k and 128k windows)."""
    import re

    config = tiny_config(tiny_model_dir)
    config["evaluation"]["ruler"] = {"tasks": ["niah_single_1"], "lengths": [256, 512, 4096]}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    out = snakemake(tmp_path, "-n", "-p").stdout
    assert set(re.findall(r"--tasks niah_single_1 --max-seq-lengths (\S+)", out)) == {"256,512"}


def test_a_task_kind_scores_only_the_orders_it_names(tmp_path, tiny_model_dir):
    """evaluation.<kind>.orders: the passkey grid of [dissimilar] drops the measured policies (the tasks, which
    name none, keep them); plain and the compositions stay; an order the search does not run is refused
    before any job."""
    import re

    def planned(config):
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
        out = snakemake(tmp_path, "-n").stdout
        return {kind: set(re.findall(rf"results/tiny/eval/(\S+)/{kind}\.json", out)) for kind in ("longctx", "harness")}

    config = tiny_config(tiny_model_dir)
    before = planned(config)
    measured = {s for s in before["longctx"] if "_measured-kl_" in s}
    assert len(measured) == 2 and measured <= before["harness"]  # both rates, by default

    config["evaluation"]["longctx"]["orders"] = ["dissimilar"]
    after = planned(config)
    assert after["longctx"] == before["longctx"] - measured
    assert {"plain", "plain+h2o-0.5", "r0.5_dissimilar_euclidean_T0.5_s0+h2o-0.5"} <= after["longctx"]
    assert after["harness"] == before["harness"]

    config["evaluation"]["longctx"]["orders"] = ["measured-cosine"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    refused = snakemake(tmp_path, "-n", check=False)
    assert refused.returncode != 0
    assert "measured-cosine, which search.orders does not search" in refused.stdout + refused.stderr


def test_longbench_runs_through_the_harness_stage_truncated_with_its_own_batch(tmp_path, tiny_model_dir):
    """evaluation.longbench plans one evaluate-harness job per setting of Table 1 and per token method and
    quantization, alone and with sharing (long context is where they matter), each with --max-length the
    smallest of evaluation.longbench.max_length, models.<m>.max_length and the window, and its own batch size."""
    import re

    config = tiny_config(tiny_model_dir)
    config["models"]["short"] = {**config["models"]["tiny"], "max_length": 256}
    config["evaluation"]["longbench"] = {"tasks": ["kvs_passage_word"], "max_length": 400, "batch_size": 2,
                                         "limit": 3}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    out = snakemake(tmp_path, "-n", "-p").stdout
    calls = re.findall(r"evaluate-harness --model results/models/(\w+) (.*?)--tasks kvs_passage_word --task-dir "
                       r"results/text/tasks --max-length (\d+) --limit 3 --batch-size (\d+) .*?--out "
                       r"results/\w+/eval/(\S+)/longbench.json", out)
    assert calls
    assert {(model, length) for model, _, length, _, _ in calls} == {("tiny", "400"), ("short", "256")}
    assert {batch for *_, batch, _ in calls} == {"2"}
    settings = {setting for *_, setting in calls}
    assert {"plain", "plain+h2o-0.5", "plain+int4"} <= settings
    assert any(s.endswith("+int4") and not s.startswith("plain") for s in settings)  # quantization with sharing
    assert not any("minicache" in s for s in settings)


def test_serving_is_planned_only_when_the_config_turns_it_on(tmp_path, tiny_model_dir):
    """`serving:` in the config adds one vLLM job per served model, run by serving.python, for Table 1's policies
    (the paper's order and the measured one at every rate; serving.orders keeps some) at every KV budget, and the
    serving table and figure that read its file; without it neither is planned (the demo's config)."""
    def plan(config):
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
        out = snakemake(tmp_path, "-n", "-p").stdout
        stats, jobs = _dry_run_jobs(out)
        return out, stats, {output for _, output, _ in jobs}

    config = tiny_config(tiny_model_dir)
    out, stats, outputs = plan(config)
    assert "serving" not in stats and "results/tiny/serving.json" not in outputs
    assert "serving." not in out and "--serving" not in out

    config["serving"] = {"kv_cache_mib": [48, 96]}
    out, stats, outputs = plan(config)
    assert stats["serving"] == 1 and "results/tiny/serving.json" in outputs
    assert "output: results/tables/serving.csv" in out and "output: results/figures/serving.png" in out
    (command,) = re.findall(r"-m kvsharer --threads 1 serving .*", out)
    assert f"KVSHARER_WORKER= {REPO / '.venv-serve' / 'bin' / 'python'} -m kvsharer" in out  # the schema's default
    served = re.findall(r"--policy (\S+)=results/tiny/policies/(\S+)\.json", command)
    assert all(name == file for name, file in served)
    assert {name for name, _ in served} == {f"r{r}_{o}_euclidean_T0.5_s0" for r in ("0.25", "0.5")
                                            for o in ("dissimilar", "measured-kl")}  # not similar, random
    assert "--kv-cache-mib 48,96 --block-size 32 --requests 48" in command and "--interleave" in command
    assert re.search(r"tables --only serving .* --serving results/tiny/serving.json", out)
    assert not re.search(r"tables --only table1 .*--serving", out)  # the other tables do not read it

    config["serving"].update(orders=["dissimilar"], python="/opt/vllm/bin/python")
    out, _, _ = plan(config)
    (command,) = re.findall(r"-m kvsharer --threads 1 serving .*", out)
    assert set(re.findall(r"--policy (\S+)=", command)) == {"r0.25_dissimilar_euclidean_T0.5_s0",
                                                           "r0.5_dissimilar_euclidean_T0.5_s0"}
    assert "KVSHARER_WORKER= /opt/vllm/bin/python -m kvsharer" in out

    config["serving"]["models"] = ["nope"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    refused = snakemake(tmp_path, "-n", check=False)
    assert refused.returncode != 0 and "serving.models names nope" in refused.stdout + refused.stderr


def test_the_fitted_order_writes_and_declares_its_maps_and_a_model_can_opt_out(tmp_path, tiny_model_dir):
    """A fitted search is its own rule, whose outputs are the policy and its K/V maps; every evaluation of a fitted
    policy takes both as input (a rerun of the search reruns them); `kv_maps: false` leaves the model out of it."""
    config = tiny_config(tiny_model_dir)
    config["search"]["orders"] = config["search"]["orders"] + ["fitted"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    out = snakemake(tmp_path, "-n", "-p").stdout
    stats, _ = _dry_run_jobs(out)
    assert stats["search_fitted"] == 2  # rates 0.25 and 0.5
    fitted_jobs = re.findall(r"^rule search_fitted:\n((?:    .*\n)*)", out, re.M)
    for body in fitted_jobs:
        (outputs,) = re.findall(r"output: (.*)", body)
        policy, maps = outputs.split(", ")
        assert maps == policy.removesuffix(".json") + ".kvmaps.safetensors"
    ppl_inputs = [re.findall(r"input: (.*)", body)[0]
                  for body in re.findall(r"^rule evaluate_ppl:\n((?:    .*\n)*)", out, re.M)]
    fitted_inputs = [i for i in ppl_inputs if "_fitted_" in i]
    assert len(fitted_inputs) == 2 and all("r0.25_fitted_euclidean_T0.5_s0.kvmaps.safetensors" in i
                                           or "r0.5_fitted_euclidean_T0.5_s0.kvmaps.safetensors" in i for i in fitted_inputs)
    assert "--policy results/tiny/policies/r0.25_fitted_euclidean_T0.5_s0.json " in out  # the policy file alone

    config["models"]["tiny"]["kv_maps"] = False
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    out = snakemake(tmp_path, "-n", "-p").stdout
    assert "search_fitted" not in _dry_run_jobs(out)[0] and "_fitted_euclidean" not in out
