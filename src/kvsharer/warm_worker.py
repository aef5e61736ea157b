"""A warm worker: one long-lived process that has imported torch, transformers, lm-eval and every stage,
and forks a child for each ``python -m kvsharer <stage>`` job, so that a DAG of many small jobs on one
machine does not pay a fresh interpreter and ~7 s of imports per job.

    python -m kvsharer warm-worker -- snakemake --cores all     # what `make demo` runs

``warm-worker`` starts the server on a Unix socket, runs the command with ``KVSHARER_WORKER=<socket>`` in its
environment, and stops the server when the command ends (its exit status is the command's). A job started
while that variable is set (``python -m kvsharer ...``, see ``__main__``) sends the server its arguments,
working directory, environment and its stdin/stdout/stderr file descriptors; the server forks, the child
runs the stage exactly as ``python -m kvsharer`` would (same ``cli.main``, output to the job's own log files,
its exit status back to the job). Every job is still one Snakemake job with its own output files, so the
DAG's rerun-only-what-changed behaviour is untouched. If the job process dies (killed by Snakemake, Ctrl-C)
the server kills its child. If no server answers, the job runs in its own process as usual.

Only for local runs: on a cluster, jobs run on other nodes under the scheduler's limits, so the Slurm profile
never starts one. The server never runs torch itself (forking after thread pools or CUDA start is unsafe):
it only imports; state read at import time (e.g. ``OMP_NUM_THREADS``) is the server's, and stages set
their threads with ``--threads``.

Standard library only: ``python -m kvsharer`` imports this module before it knows whether it forwards.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ENV = "KVSHARER_WORKER"  # the socket jobs forward to
IN_WORKER = "KVSHARER_IN_WORKER"  # set in a forked child: the stage logs that it ran warm
PRELOAD = (  # transformers imports a model's modules lazily, on first use: these are the ones every job pays
    "torch", "transformers", "transformers.models.auto.modeling_auto", "transformers.models.auto.tokenization_auto",
    "transformers.utils.type_validators", "transformers.integrations.hub_kernels",
    "transformers.models.llama.modeling_llama", "transformers.models.mistral.modeling_mistral",
    "transformers.models.qwen2.modeling_qwen2", "transformers.tokenization_utils_tokenizers",
    "lm_eval", "lm_eval.models.huggingface",
)
HEADER = struct.Struct("!I")  # the request's length; the reply is one signed exit status
STATUS = struct.Struct("!i")


# ---------------------------------------------------------------- the job side


def forward(path: str, argv: list[str]) -> int | None:
    """Run ``argv`` in the warm worker at ``path``; its exit status, or None if no worker answers."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(path)
    except OSError as err:
        print(f"kvsharer: no warm worker at {path} ({err.strerror}): running in this process", file=sys.stderr)
        client.close()
        return None
    request = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
    with client:
        socket.send_fds(client, [HEADER.pack(len(request))], [0, 1, 2])
        client.sendall(request)
        reply = _recv_exactly(client, STATUS.size)
    if reply is None:  # the server went away mid-job
        print(f"kvsharer: the warm worker at {path} closed the connection before the job ended", file=sys.stderr)
        return 1
    return STATUS.unpack(reply)[0]


def _recv_exactly(conn: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


# ---------------------------------------------------------------- the server side


def run_stage(argv: list[str]) -> int:
    from .cli import main

    return main(argv)


def preload() -> list[str]:
    """Import the heavy libraries and every stage module (their torch, transformers, lm-eval imports)."""
    from .cli import STAGES

    loaded = []
    for name in (*PRELOAD, *dict.fromkeys(module for module, _ in STAGES.values())):
        try:
            importlib.import_module(name)
            loaded.append(name)
        except ImportError:  # an optional extra that is not installed: the stage imports (and fails) itself
            pass
    return loaded


def _child(conn: socket.socket, listener: socket.socket, fds: list[int], request: dict, run) -> None:
    """In the forked child: become the job (its directory, environment, standard streams), run, exit."""
    try:
        os.setsid()  # its own process group: the server kills the whole group if the job dies
        listener.close()
        conn.close()
        for target, fd in enumerate(fds[:3]):
            os.dup2(fd, target)
            os.close(fd)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ.pop(ENV, None)  # a stage that starts `python -m kvsharer` itself runs it in-process
        os.environ[IN_WORKER] = str(os.getppid())
        sys.argv = ["python -m kvsharer", *request["argv"]]
        status = run(request["argv"])
    except SystemExit as exc:  # argparse and sys.exit
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - the job's traceback goes to the job's stderr, as it would in-process
        traceback.print_exc()
        status = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    os._exit(status or 0)


class Server:
    """Single-threaded (forking a threaded process is unsafe): a selector over the listening socket and one
    connection per running job; finished children are reaped every ``tick`` seconds."""

    def __init__(self, path: str, run=run_stage, tick: float = 0.1):
        self.path, self.run, self.tick = path, run, tick
        self.jobs: dict[int, socket.socket] = {}  # child pid -> its job's connection
        self.stopping = False

    def serve(self, ready=None) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.path)
        listener.listen(64)  # jobs that connect while the modules load wait in the backlog
        loaded = preload() if self.run is run_stage else []
        if ready:
            ready(loaded)
        signal.signal(signal.SIGTERM, self._stop)
        selector = selectors.DefaultSelector()
        selector.register(listener, selectors.EVENT_READ)
        try:
            while not self.stopping:
                for key, _ in selector.select(self.tick):
                    if key.fileobj is listener:
                        self._accept(listener, selector)
                    else:  # a job's connection is readable: its process died (EOF), kill the child
                        pid = key.data
                        if pid in self.jobs and not key.fileobj.recv(1):
                            _kill_group(pid)
                self._reap(selector)
        finally:
            for pid in list(self.jobs):
                _kill_group(pid)
            self._reap(selector, wait=True)
            listener.close()
            Path(self.path).unlink(missing_ok=True)

    def _stop(self, *_):
        self.stopping = True

    def _accept(self, listener: socket.socket, selector) -> None:
        conn, _ = listener.accept()
        try:
            msg, fds, _, _ = socket.recv_fds(conn, HEADER.size, 3)
            body = _recv_exactly(conn, HEADER.unpack(msg)[0]) if len(msg) == HEADER.size else None
            if body is None or len(fds) != 3:
                raise ValueError("malformed request")
            request = json.loads(body)
        except (OSError, ValueError):
            conn.close()
            return
        pid = os.fork()
        if pid == 0:
            _child(conn, listener, fds, request, self.run)
        for fd in fds:
            os.close(fd)
        self.jobs[pid] = conn
        selector.register(conn, selectors.EVENT_READ, data=pid)

    def _reap(self, selector, wait: bool = False) -> None:
        for pid in list(self.jobs):
            done, status = os.waitpid(pid, 0 if wait else os.WNOHANG)
            if not done:
                continue
            conn = self.jobs.pop(pid)
            code = os.waitstatus_to_exitcode(status)
            try:
                conn.sendall(STATUS.pack(code if code >= 0 else 128 - code))  # killed by signal N: 128 + N
            except OSError:
                pass  # the job already died
            selector.unregister(conn)
            conn.close()


def _kill_group(pid: int, grace: float = 5.0) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return
        time.sleep(0.05)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# ---------------------------------------------------------------- the stage: start, run a command, stop


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="the command to run with the worker (after --), e.g. -- snakemake --cores all")


def main(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise ValueError("give the command to run after --, e.g. warm-worker -- snakemake --cores all")
    with tempfile.TemporaryDirectory(prefix="kvsharer-worker-") as tmp:
        path = os.path.join(tmp, "worker.sock")  # short: a Unix socket path has at most ~100 characters
        server = subprocess.Popen([sys.executable, "-m", "kvsharer.warm_worker", path])
        try:
            deadline = time.monotonic() + 60
            while not os.path.exists(path):  # bound before it preloads; jobs queue until it is ready
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the warm worker did not start (exit {server.poll()})")
                time.sleep(0.05)
            print(f"kvsharer: warm worker (pid {server.pid}) at {path}; running: {' '.join(command)}",
                  file=sys.stderr, flush=True)
            return run_annotated(command, {**os.environ, ENV: path})
        finally:
            server.terminate()
            server.wait(timeout=30)


# Snakemake's progress line, "12 of 94 steps (13%) done", gets what is left and where the finished results are
PROGRESS = re.compile(r"^(\d+) of (\d+) steps \(\d+%\) done$")


def progress_note(line: str, tables: str = "results/tables") -> str | None:
    """What to print after a Snakemake progress line (None after any other line): the jobs left and how many
    tables are finished, and where."""
    match = PROGRESS.match(line.strip())
    if match is None:
        return None
    done, total = int(match.group(1)), int(match.group(2))
    finished = len([name for name in os.listdir(tables) if name.endswith(".md")]) if os.path.isdir(tables) else 0
    left = total - done
    return (f"kvsharer: {left} job{'' if left == 1 else 's'} left; {finished} table{'' if finished == 1 else 's'} "
            f"finished in {tables}/ (figures in results/figures/)")


def run_annotated(command: list[str], env: dict) -> int:
    """Run ``command``, passing its output through (stderr, where Snakemake writes its log) with a note after every
    progress line; its exit status."""
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True, bufsize=1)
    while True:
        try:
            for line in process.stderr:
                sys.stderr.write(line)
                note = progress_note(line)
                if note is not None:
                    sys.stderr.write(note + "\n")
                sys.stderr.flush()
            return process.wait()
        except KeyboardInterrupt:  # the command got the same Ctrl-C: keep passing its shutdown messages through
            continue


def serve_main(path: str) -> None:
    start = time.perf_counter()

    def ready(loaded):
        print(f"kvsharer: warm worker ready in {time.perf_counter() - start:.1f} s ({len(loaded)} modules "
              "preloaded)", file=sys.stderr, flush=True)

    Server(path).serve(ready)


if __name__ == "__main__":
    serve_main(sys.argv[1])
