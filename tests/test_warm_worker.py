"""The warm worker (kvsharer.warm_worker): a job forwarded to it gives what the job gives in its own process
(outputs, log lines, exit status), a job whose process dies takes its forked child with it, and a job with no
worker to talk to runs in its own process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kvsharer.warm_worker import ENV

REPO = Path(__file__).resolve().parents[1]
PY_ENV = {**os.environ, "PYTHONPATH": str(REPO / "src")}


def _wait_for(predicate, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _start(code: str, sock: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=PY_ENV, stderr=subprocess.PIPE,
                            text=True)
    _wait_for(lambda: sock.exists() or proc.poll() is not None, what="the worker's socket")
    assert proc.poll() is None, proc.stderr.read()
    return proc


def _stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    _, err = proc.communicate(timeout=30)
    return err


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """The real server (every stage preloaded), as `warm-worker` starts it."""
    sock = tmp_path_factory.mktemp("worker") / "w.sock"
    proc = _start(f"from kvsharer.warm_worker import serve_main; serve_main({str(sock)!r})", sock)
    yield sock
    assert "ready" in _stop(proc)
    assert not sock.exists()  # the server removes its socket


def kvsharer(args, tmp_path, worker=None, **kw):
    """`python -m kvsharer ARGS` as a Snakemake shell job runs it: output and errors into a log file."""
    log = tmp_path / f"job-{time.monotonic_ns()}.log"
    env = {**PY_ENV, ENV: str(worker)} if worker else {k: v for k, v in PY_ENV.items() if k != ENV}
    with log.open("w") as out:
        rc = subprocess.run([sys.executable, "-m", "kvsharer", *args], stdout=out, stderr=subprocess.STDOUT,
                            env=env, cwd=tmp_path, **kw).returncode
    return rc, log.read_text()


def test_a_forwarded_job_gives_what_it_gives_in_its_own_process(worker, tiny_model_dir, tmp_path):
    text = ["prepare-text", "--eval-fraction", "0.5"]
    rc, log = kvsharer([*text, "--calibration-out", "own/cal.txt", "--evaluation-out", "own/eval.txt"], tmp_path)
    assert rc == 0 and "warm worker" not in log
    rc, log = kvsharer([*text, "--calibration-out", "warm/cal.txt", "--evaluation-out", "warm/eval.txt"], tmp_path,
                       worker)  # relative paths: the child works in the job's directory
    assert rc == 0 and "forked from the warm worker" in log and "stage prepare-text finished" in log, log
    for name in ("cal.txt", "eval.txt"):
        assert (tmp_path / "warm" / name).read_bytes() == (tmp_path / "own" / name).read_bytes()

    ppl = ["--threads", "1", "evaluate-ppl", "--model", str(tiny_model_dir), "--text", "own/eval.txt",
           "--window", "32", "--max-tokens", "128", "--batch-size", "2"]
    assert kvsharer([*ppl, "--out", "own.json"], tmp_path)[0] == 0
    rc, log = kvsharer([*ppl, "--out", "warm.json"], tmp_path, worker)
    assert rc == 0, log
    own, warm = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("own", "warm"))
    assert warm["ppl"] == own["ppl"] and warm["nll_sum"] == own["nll_sum"] and warm["kv_bytes"] == own["kv_bytes"]


def test_a_failing_job_reports_its_error_and_status(worker, tmp_path):
    rc, log = kvsharer(["evaluate-ppl", "--model", "no/such/model", "--text", "missing.txt", "--out", "x.json"],
                       tmp_path, worker)
    assert rc == 2 and "ERROR evaluate-ppl: model source 'no/such/model'" in log, log  # a clear error, in the log
    rc, log = kvsharer(["evaluate-ppl", "--no-such-flag"], tmp_path, worker)
    assert rc == 2 and "the following arguments are required: --model" in log and not (tmp_path / "x.json").exists()


def test_a_killed_job_takes_its_child_with_it(tmp_path):
    """Snakemake kills a job's process (Ctrl-C, a timeout): the stage running for it in the worker stops too."""
    sock = tmp_path / "w.sock"
    server = _start(f"""
        import os, time
        from kvsharer.warm_worker import Server
        def run(argv):  # a stage that writes its pid and runs for argv[0] seconds
            open(argv[1], "w").write(str(os.getpid()))
            time.sleep(float(argv[0]))
            return 0
        Server({str(sock)!r}, run=run).serve()
        """, sock)
    pidfile = tmp_path / "child.pid"
    job = subprocess.Popen([sys.executable, "-c", "import sys; from kvsharer.warm_worker import forward; "
                            f"sys.exit(forward({str(sock)!r}, ['600', {str(pidfile)!r}]))"], env=PY_ENV)
    _wait_for(lambda: pidfile.exists() and pidfile.read_text(), what="the child's pid")
    child = int(pidfile.read_text())
    os.kill(child, 0)  # running
    job.send_signal(signal.SIGKILL)
    job.wait()

    def gone():
        try:
            os.kill(child, 0)
            return Path(f"/proc/{child}/stat").read_text().split()[2] == "Z"  # a zombie until reaped
        except (ProcessLookupError, FileNotFoundError):  # gone (reaped between the two calls)
            return True

    _wait_for(gone, timeout=15, what="the child to stop")
    _stop(server)


def test_exit_status_of_a_stage_that_returns_non_zero(tmp_path):
    sock = tmp_path / "w.sock"
    server = _start(f"""
        from kvsharer.warm_worker import Server
        Server({str(sock)!r}, run=lambda argv: int(argv[0])).serve()
        """, sock)
    for status in (0, 3):
        rc = subprocess.run([sys.executable, "-c", "import sys; from kvsharer.warm_worker import forward; "
                             f"sys.exit(forward({str(sock)!r}, [{str(status)!r}]))"], env=PY_ENV).returncode
        assert rc == status
    _stop(server)


def test_no_worker_runs_the_job_in_its_own_process(tmp_path):
    rc, log = kvsharer(["prepare-text", "--calibration-out", "c.txt", "--evaluation-out", "e.txt"], tmp_path,
                       tmp_path / "no-such.sock")
    assert rc == 0 and "no warm worker" in log and "forked from" not in log and (tmp_path / "e.txt").stat().st_size


def test_warm_worker_runs_a_command_and_returns_its_status(tmp_path):
    script = ("import os, subprocess, sys; sock = os.environ['KVSHARER_WORKER']; "
              "r = subprocess.run([sys.executable, '-m', 'kvsharer', 'prepare-text', '--calibration-out', 'c.txt', "
              "'--evaluation-out', 'e.txt'], capture_output=True, text=True); "
              "print(sock, r.returncode, 'forked from the warm worker' in r.stderr); sys.exit(7)")
    proc = subprocess.run([sys.executable, "-m", "kvsharer", "warm-worker", "--", sys.executable, "-c", script],
                          env=PY_ENV, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 7, proc.stderr  # the command's status
    sock, rc, warm = proc.stdout.split()
    assert rc == "0" and warm == "True" and not Path(sock).exists()  # ran warm; the worker is gone after


def test_snakemakes_progress_line_is_followed_by_the_jobs_left_and_where_the_tables_are(tmp_path):
    from kvsharer.warm_worker import progress_note

    (tmp_path / "results" / "tables").mkdir(parents=True)
    for name in ("ppl_vs_rate.md", "ppl_vs_rate.csv", "table1.md"):
        (tmp_path / "results" / "tables" / name).write_text("")
    script = ("import sys; print('Select jobs to execute...', file=sys.stderr); "
              "print('3 of 94 steps (3%) done', file=sys.stderr); print('out'); sys.exit(0)")
    proc = subprocess.run([sys.executable, "-m", "kvsharer", "warm-worker", "--", sys.executable, "-c", script],
                          env=PY_ENV, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout == "out\n"
    lines = proc.stderr.splitlines()
    at = lines.index("3 of 94 steps (3%) done")
    assert lines[at + 1] == "kvsharer: 91 jobs left; 2 tables finished in results/tables/ (figures in results/figures/)"
    assert progress_note("Select jobs to execute...") is None
    assert progress_note("94 of 94 steps (100%) done", str(tmp_path / "none")).startswith("kvsharer: 0 jobs left; 0 ")


def test_bad_warm_worker_call_is_refused(tmp_path):
    rc, log = kvsharer(["warm-worker"], tmp_path)
    assert rc == 2 and "give the command to run" in log
