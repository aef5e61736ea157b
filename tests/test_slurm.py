"""The repository's Slurm profile (slurm/config.yaml), and the tiny DAG of test_dag.py through a real Slurm.

The tests marked `slurm` need a running Slurm controller (`sudo .ci/start-slurm.sh` starts a one-node
cluster on this machine; CI does it) and are skipped when none answers; the profile's dry run needs none.
Every job of the Slurm run is submitted with sbatch by snakemake-executor-plugin-slurm; the sbatch lines
are printed and written to <tmp>/slurm_dag*/sbatch_calls.txt (the whole log: snakemake_slurm.log). A second
run of the same DAG is killed mid-way, its Slurm jobs cancelled, and resumed through the profile.
"""

from __future__ import annotations

import csv
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import save_tiny_model
from test_dag import tiny_config

REPO = Path(__file__).resolve().parents[1]
PROFILE = yaml.safe_load((REPO / "slurm" / "config.yaml").read_text())
# the rules that load a model: models.<m>.gpus GPUs each (the config's, not the profile's); every other rule
# runs on CPUs only: prepare_model converts the weights on CPU, search_scaling is a CPU measurement
GPU_RULES = {"calibrate", "calibration_states", "search", "search_fitted", "evaluate_ppl", "evaluate_ppl_corpus",
             "evaluate_harness", "evaluate_longctx", "evaluate_ruler", "evaluate_longbench", "profile", "serving"}
# the one-node cluster of .ci/start-slurm.sh has partition `debug` with one (dummy) GPU
PARTITION = os.environ.get("KVSHARER_SLURM_PARTITION", "debug")


def _env() -> dict:
    # `python` in the rules must be this interpreter: local jobs and Slurm jobs (sbatch --export=ALL)
    # inherit this PATH
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    env.update(PATH=path, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return env


def _jobs(log: str) -> list[dict]:
    """Snakemake's job blocks ("rule X:" / "localrule X:" and their indented lines) in a (dry) run's log."""
    jobs = []
    for m in re.finditer(r"^(local)?rule (\w+):\n((?:    .*\n?)*)", log, re.M):
        body = m.group(3)
        threads = re.search(r"^    threads: (\d+)", body, re.M)
        res = re.search(r"^    resources: (.*)$", body, re.M)
        output = re.search(r"^    output: (.*)$", body, re.M)
        reason = re.search(r"^    reason: (.*)$", body, re.M)
        jobs.append({
            "rule": m.group(2), "local": bool(m.group(1)), "threads": int(threads.group(1)) if threads else 1,
            "resources": dict(kv.split("=", 1) for kv in res.group(1).split(", ")) if res else {},
            "output": output.group(1).split(", ") if output else [], "reason": reason.group(1) if reason else "",
        })
    return jobs


def test_profile_requests_the_models_gpus_for_the_model_rules_only(tmp_path):
    """Without a cluster: a dry run of test_dag's whole tiny DAG with the profile shows every job's resources:
    the model's GPUs (here 2) for the rules that load it, the profile (Table 2) included, none for the others."""
    assert set(PROFILE["set-resources"]) == GPU_RULES | {"prepare_model"}  # their wall times
    assert not any({"gpu", "gres", "mem_mb"} & set(r) for r in PROFILE["set-resources"].values())  # the config's
    model_dir = save_tiny_model(tmp_path / "tiny-model", n_layers=8)  # the config check reads its config.json
    config = tiny_config(model_dir)
    config["models"]["tiny"]["gpus"] = 2
    config["evaluation"]["ruler"] = {"tasks": ["niah_single_1"], "lengths": [256]}  # evaluate_ruler jobs too
    config["evaluation"]["longbench"] = {"tasks": ["kvs_passage_word"]}  # and evaluate_longbench
    config["search"]["orders"] = config["search"]["orders"] + ["fitted"]  # search_fitted
    config["serving"] = {"kv_cache_mib": [48]}  # and the vLLM serving job
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
           "--configfile", str(tmp_path / "config.yaml"), "--profile", str(REPO / "slurm"), "-n", "--cores", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    jobs = [j for j in _jobs(out) if not j["local"]]
    assert GPU_RULES | {"prepare_model", "search_scaling", "prepare_text", "make_tasks", "distances", "table",
                        "figure"} <= {j["rule"] for j in jobs}
    for job in jobs:
        res, rule = job["resources"], job["rule"]
        assert res.get("gpu", "0") == ("2" if rule in GPU_RULES else "0"), job
        runtime = PROFILE["set-resources"].get(rule, PROFILE["default-resources"])["runtime"]
        if rule == "search_scaling":  # memory and wall time from its grid (kvsharer.measure.scaling), not the profile
            from kvsharer.jobs import rule_resources

            runtime = rule_resources(config, rule)["runtime"]
            assert res["mem_mb"] == str(rule_resources(config, rule)["mem_mb"]), job
        assert res["runtime"] == str(runtime) and res["slurm_partition"] == "" and res["slurm_account"] == "", job
        assert res["cpus_per_task"] == str(job["threads"]), job  # `cpus_per_task: threads`


# --- through a real Slurm ------------------------------------------------------------------------------


def _slurm(*args: str) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return None


def _cluster_problem() -> str | None:
    """Why the Slurm tests cannot run here (None: a controller answers and the partition has an idle node)."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "no Slurm client (sinfo/sbatch) on PATH; start a local cluster with `sudo .ci/start-slurm.sh`"
    proc = _slurm("sinfo", "-h", "-p", PARTITION, "-o", "%T")
    if proc is None or proc.returncode != 0:
        err = "timed out" if proc is None else proc.stderr.strip()
        return f"no Slurm controller answers (sinfo: {err}); start one with `sudo .ci/start-slurm.sh`"
    states = proc.stdout.split()
    if not states:
        return f"Slurm has no partition {PARTITION!r} (set KVSHARER_SLURM_PARTITION)"
    if not any(s.rstrip("*~#") in {"idle", "mixed"} for s in states):
        return f"no idle node in Slurm partition {PARTITION!r} (node states: {', '.join(states)})"
    return None


def _partition_has_gpu() -> bool:
    proc = _slurm("sinfo", "-h", "-p", PARTITION, "-o", "%G")
    return proc is not None and "gpu" in proc.stdout


def _slurm_workdir(workdir: Path) -> Path:
    """Skip without a cluster; else `workdir` with the tiny model and the Slurm test config."""
    problem = _cluster_problem()
    if problem:
        pytest.skip(problem)
    model_dir = save_tiny_model(workdir / "tiny-model", n_layers=8)
    (workdir / "config.yaml").write_text(yaml.safe_dump(slurm_config(model_dir, _partition_has_gpu())))
    return workdir


def _failed(workdir: Path, what: str, returncode: int, log: str) -> AssertionError:
    """The error for a failed Snakemake run: its log's end and the end of every job log."""
    logs = "\n".join(f"--- {p}\n{p.read_text()[-1500:]}" for p in sorted(workdir.rglob("*.log"))
                     if ".snakemake" in p.parts or "logs" in p.parts)
    return AssertionError(f"{what} failed (rc {returncode}):\n{log[-6000:]}\n{logs[-6000:]}")


MODEL_MEM_MB = 2500  # a model job's memory: preflight wants >= the weights + 2000 MB host overhead


def slurm_config(model_dir: Path, gpu: bool) -> dict:
    """test_dag's tiny config, smaller: one policy (25 %, dissimilar), no ablations or compositions, perplexity
    only; one GPU per model job where the partition has GPUs, none (CPU) where it has not."""
    config = tiny_config(model_dir)
    config.pop("compose", None)
    config["models"]["tiny"]["mem_mb"] = MODEL_MEM_MB
    config["models"]["tiny"]["gpus"] = 1 if gpu else 0
    config["search"].update(rates=[0.25], orders=["dissimilar"], seeds=[0], ablation_rates=[], metrics=[],
                            thresholds=[])
    config["evaluation"] = {"ppl": config["evaluation"]["ppl"]}
    return config


def snakemake_slurm_cmd(workdir: Path, *args: str) -> list[str]:
    """Snakemake with the repository's profile from `workdir`, plus this test cluster's overrides."""
    cmd = [
        sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
        "--configfile", str(workdir / "config.yaml"),
        "--profile", str(REPO / "slurm"),
        # the test cluster: partition debug, no account, small jobs (this restates the profile's whole key)
        "--default-resources", f"slurm_partition={PARTITION}", "runtime=10", "mem_mb=500", "cpus_per_task=threads",
        # no accounting on the test cluster: sacct reports nothing, squeue does; poll every few seconds
        "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "3",
        "--slurm-keep-successful-logs",
        "--retries", "0", "--latency-wait", "10", "--jobs", "4",
        "--verbose",  # the plugin logs each `sbatch call: ...` at debug level
        *args,
    ]
    return cmd  # a partition without GPUs: the config says gpus: 0 (slurm_config)


def snakemake_slurm(workdir: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `snakemake_slurm_cmd` to its end (on a timeout, its Slurm jobs are cancelled)."""
    cmd = snakemake_slurm_cmd(workdir, *args)
    try:
        return subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=workdir, timeout=timeout)
    except subprocess.TimeoutExpired as e:  # leave no job behind in the queue
        log = "".join(x.decode() if isinstance(x, bytes) else x for x in (e.stdout or "", e.stderr or ""))
        jobs = re.findall(r"submitted with SLURM jobid (\d+)", log)
        if jobs:
            subprocess.run(["scancel", *jobs], capture_output=True, timeout=30)
        raise AssertionError(f"snakemake --profile slurm ran past {timeout} s (cancelled Slurm jobs {jobs}):\n"
                             f"{log[-4000:]}") from None


def _sbatch_calls(log: str) -> list[str]:
    return [m.group(1).strip() for m in re.finditer(r"sbatch call: (sbatch .*)", log)]


def _short(call: str) -> str:
    """An sbatch line without its --wrap payload (the jobstep's snakemake command, thousands of chars)."""
    return re.sub(r' --wrap=".*', ' --wrap="<snakemake jobstep command>"', call)


@pytest.fixture(scope="module")
def slurm_run(tmp_path_factory):
    workdir = _slurm_workdir(tmp_path_factory.mktemp("slurm_dag"))
    gpu = _partition_has_gpu()
    start = time.monotonic()
    proc = snakemake_slurm(workdir)
    wall = time.monotonic() - start
    log = proc.stdout + proc.stderr
    (workdir / "snakemake_slurm.log").write_text(log)
    calls = _sbatch_calls(log)
    (workdir / "sbatch_calls.txt").write_text("\n".join(calls) + "\n")
    if proc.returncode != 0:
        raise _failed(workdir, "snakemake --profile slurm", proc.returncode, log)
    return {"workdir": workdir, "log": log, "calls": calls, "gpu": gpu, "wall": wall}


@pytest.mark.slurm
def test_tiny_dag_runs_through_slurm(slurm_run, capsys):
    workdir, log, calls = slurm_run["workdir"], slurm_run["log"], slurm_run["calls"]
    with capsys.disabled():
        print(f"\n[slurm] {len(calls)} jobs submitted with sbatch; the DAG took {slurm_run['wall']:.0f} s "
              f"(full lines: {workdir / 'sbatch_calls.txt'}):")
        for call in calls:
            print("  " + _short(call))

    # the results, from the jobs' own outputs
    for table in ("table1", "order_ablation", "search_cost"):
        assert (workdir / "results" / "tables" / f"{table}.csv").stat().st_size > 0
        assert (workdir / "results" / "tables" / f"{table}.md").exists()
    assert (workdir / "results" / "figures" / "ppl_vs_rate.png").stat().st_size > 0
    res = workdir / "results" / "tiny"
    assert [p.name for p in (res / "policies").glob("*.json")] == ["r0.25_dissimilar_euclidean_T0.5_s0.json"]
    assert {p.parent.name for p in (res / "eval").glob("*/ppl.json")} == {"plain", "r0.25_dissimilar_euclidean_T0.5_s0"}
    assert not list(res.glob("eval/*/harness.json")) and not list(res.glob("eval/*/longctx.json"))

    # ... and every job but the local `all` went through Slurm: one sbatch each, a Slurm job id
    # reported back for each, and a per-job Slurm log written by slurmd
    jobs = _jobs(log)
    remote = [j for j in jobs if not j["local"]]
    assert [j["rule"] for j in jobs if j["local"]] == ["all"]
    submitted = re.findall(r"Job \d+ has been submitted with SLURM jobid (\d+)", log)
    assert len(calls) == len(submitted) == len(remote), log[-3000:]
    rules = [re.search(r"--comment '?rule_(\w+?)(?:_wildcards_|'| )", c).group(1) for c in calls]
    assert sorted(rules) == sorted(j["rule"] for j in remote)
    assert {"prepare_model", "prepare_text", "calibrate", "distances", "search", "table", "figure"} <= set(rules)
    assert rules.count("evaluate_ppl") == 2
    slurm_logs = workdir / ".snakemake" / "slurm_logs"
    assert {p.name for p in slurm_logs.iterdir()} == {f"rule_{r}" for r in rules}
    assert sorted(p.stem for p in slurm_logs.rglob("*.log")) == sorted(submitted)

    # the requests: partition, no account, memory, wall time, one CPU per thread, a GPU for model rules only
    threads = {j["rule"]: j["threads"] for j in remote}
    for rule, call in zip(rules, calls):
        assert f" -p {PARTITION} " in call and " -A " not in call, call
        assert re.search(r" --mem \d+ ", call) and re.search(r" -t \d+ ", call), call
        assert f" --cpus-per-task={threads[rule]} " in call, call
        assert ("--gpus=1" in call) == (slurm_run["gpu"] and rule in GPU_RULES), call
    search_call = calls[rules.index("search")]  # the profile's runtime, the config's mem_mb
    assert f" -t {PROFILE['set-resources']['search']['runtime']} " in search_call and f" --mem {MODEL_MEM_MB} " in search_call
    assert " -t 10 " in calls[rules.index("table")]  # the test's default runtime for a CPU rule


@pytest.mark.slurm
def test_rerun_through_slurm_submits_nothing(slurm_run):
    proc = snakemake_slurm(slurm_run["workdir"], "-n", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Nothing to be done" in proc.stdout + proc.stderr


# --- killed mid-run, resumed through Slurm --------------------------------------------------------------

ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED"}  # squeue states of a live job


def _queue(run_id: str) -> list[str]:
    """States of this run's jobs (`squeue -h -u $(id -un) --name <SLURM run ID>`; finished ones linger)."""
    proc = _slurm("squeue", "-h", "-u", pwd.getpwuid(os.getuid()).pw_name, "--name", run_id, "-o", "%T")
    return proc.stdout.split() if proc is not None and proc.returncode == 0 else []


def _files(workdir: Path) -> dict[str, int]:
    """mtime (ns) of every result file under results/ (not the searches' journals), by path from `workdir`."""
    return {str(p.relative_to(workdir)): p.stat().st_mtime_ns for p in (workdir / "results").rglob("*")
            if p.is_file() and not p.name.endswith(".journal.jsonl")}


def _journal(journal: Path) -> list[str]:
    """Whole lines of a search journal (from a line cut by a kill on, nothing counts, as in search.Journal)."""
    lines = []
    for line in journal.read_text().splitlines() if journal.exists() else []:
        try:
            json.loads(line)
        except json.JSONDecodeError:
            break
        lines.append(line)
    return lines


@pytest.mark.slurm
def test_killed_slurm_dag_resumes_without_redoing_finished_jobs(slurm_run, tmp_path, capsys):
    """SIGKILL Snakemake while a job of the run is RUNNING in Slurm (after the search has evaluated a
    candidate), `scancel` the run's jobs, `--unlock`, rerun with `--rerun-incomplete` through the profile:
    every result Snakemake had booked keeps its file, only jobs it had not booked are redone (the search
    from its journal, evaluating nothing twice), nothing is half-written, and the results are those of the
    uninterrupted run of `slurm_run`."""
    workdir = _slurm_workdir(tmp_path)
    res = workdir / "results" / "tiny"
    policy = res / "policies" / "r0.25_dissimilar_euclidean_T0.5_s0.json"
    journal = policy.with_name(policy.name + ".journal.jsonl")
    log_path = workdir / "snakemake_killed.log"
    start = time.monotonic()
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(snakemake_slurm_cmd(workdir), cwd=workdir, env=_env(), stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)
    run_id, states = None, []
    try:
        while time.monotonic() - start < 400 and proc.poll() is None:
            run_id = run_id or next(iter(re.findall(r"SLURM run ID: (\S+)", log_path.read_text())), None)
            if run_id and (policy.exists() or len(_journal(journal)) > 1):
                states = _queue(run_id)
                if "RUNNING" in states:
                    break
            time.sleep(0.2)
        tail = log_path.read_text()[-3000:]
        assert proc.poll() is None, f"the DAG finished before it could be killed:\n{tail}"
        assert "RUNNING" in states, f"no job of the run ran in Slurm after the search began:\n{tail}"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # Snakemake (and any local job); its Slurm jobs live on
        proc.wait()
        # what a user does next: cancel the run's jobs (`scancel --name <SLURM run ID>`, or `scancel -u $USER`)
        jobs = re.findall(r"submitted with SLURM jobid (\d+)", log_path.read_text())
        subprocess.run(["scancel", *(["--name", run_id] if run_id else jobs)], capture_output=True, timeout=30)
    killed_after = time.monotonic() - start
    deadline = time.monotonic() + 120
    while ACTIVE & set(_queue(run_id)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not ACTIVE & set(_queue(run_id)), f"jobs of the run still live after scancel: {_queue(run_id)}"
    before, journaled = _files(workdir), _journal(journal)  # the journal: a header line, then candidates
    assert before, "no job had finished before the kill"

    unlock = snakemake_slurm(workdir, "--unlock", timeout=120)
    assert unlock.returncode == 0, unlock.stdout[-2000:] + unlock.stderr[-2000:]
    rerun_start = time.monotonic()
    rerun = snakemake_slurm(workdir, "--rerun-incomplete")
    rerun_wall, log = time.monotonic() - rerun_start, rerun.stdout + rerun.stderr
    (workdir / "snakemake_rerun.log").write_text(log)
    if rerun.returncode != 0:
        raise _failed(workdir, "snakemake --profile slurm --rerun-incomplete", rerun.returncode, log)

    # only jobs Snakemake had not booked as finished ran again; every other result kept its file
    redone = [j for j in _jobs(log) if not j["local"]]
    redone_outputs = [o for j in redone for o in j["output"]]
    kept = {p: t for p, t in before.items() if not any(p == o or p.startswith(o + "/") for o in redone_outputs)}
    after = _files(workdir)
    assert redone and kept
    assert {p: after[p] for p in kept} == kept  # not recomputed
    for job in redone:  # a job that had written outputs before the kill was one Snakemake had not booked
        if any(p == o or p.startswith(o + "/") for o in job["output"] for p in before):
            assert job["reason"].startswith("Incomplete output files"), job
    assert len(_sbatch_calls(log)) == len(redone)  # ... each submitted to Slurm again

    # nothing half-written: every result reads whole
    for path in (workdir / "results").rglob("*"):
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".csv":
            rows = list(csv.reader(path.open()))
            assert rows and all(len(row) == len(rows[0]) for row in rows), path  # a header, whole rows
    # the results of the uninterrupted run: the same policy (same candidates, same similarities), same PPL
    ref = slurm_run["workdir"] / "results" / "tiny"
    got, want = json.loads(policy.read_text()), json.loads((ref / policy.relative_to(res)).read_text())
    assert got["map"] == want["map"]
    assert [(t["rank"], t["pair"], t["accepted"]) for t in got["trace"]] == \
           [(t["rank"], t["pair"], t["accepted"]) for t in want["trace"]]
    assert [t["similarity"] for t in got["trace"]] == pytest.approx([t["similarity"] for t in want["trace"]], rel=1e-9)
    for ppl in res.glob("eval/*/ppl.json"):
        uninterrupted = json.loads((ref / ppl.relative_to(res)).read_text())["ppl"]
        assert json.loads(ppl.read_text())["ppl"] == pytest.approx(uninterrupted)
    search_redone = str(policy.relative_to(workdir)) in redone_outputs
    if search_redone:  # a search that ran again took every candidate it had journaled from its journal
        assert _journal(journal)[: len(journaled)] == journaled
        resumed = len(journaled) - 1
        assert got["candidates_resumed"] == resumed and got["candidates_evaluated"] + resumed == len(got["trace"])

    leftovers = sorted(str(p.relative_to(workdir)) for p in (workdir / "results").rglob(".*.tmp-*"))
    with capsys.disabled():
        print(f"\n[slurm kill/resume] killed {killed_after:.0f} s in (Slurm states of the run: {', '.join(states)}); "
              f"{len(kept)} result files kept, {len(redone)} jobs redone in {rerun_wall:.0f} s: "
              + ", ".join(f"{j['rule']} ({j['reason'].split(':')[0]})" for j in redone)
              + (f"; the search resumed {resumed} of {len(got['trace'])} candidates from its journal"
                 if search_redone else "")
              + (f"; temporary files left by killed jobs: {leftovers}" if leftovers else "")
              + f"; total {time.monotonic() - start:.0f} s")
        for call in _sbatch_calls(log):
            print("  " + _short(call))
