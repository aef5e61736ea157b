"""Per-job cost of a DAG of small jobs: each job in its own `python -m kvsharer` process (the reference way)
vs forked from the warm worker (kvsharer.warm_worker), side by side on the same jobs.

    python benchmarks/warm_worker.py --model results/models/smollm2-135m --text results/text/evaluation.txt
    python benchmarks/warm_worker.py --model <tiny model folder> --text <file> --smoke --out /tmp/w.json

Each arm runs the same `jobs` evaluate-ppl jobs one after another (alternating arms job by job, so that a
machine that gets busier or quieter affects both alike), timed from process start to exit as Snakemake sees
a job. The warm arm's server is started (and its preloading paid) once, before the first job, as
`warm-worker` does for a whole DAG; its start-up is reported separately. Prints the ratio warm / own process
of the median job and writes both arms' times to JSON. Both arms' results must be equal (checked).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run_facts import run_facts  # benchmarks/ is the script's folder

REPO = Path(__file__).resolve().parents[1]


def run_job(args: list[str], env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "kvsharer", *args], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"job failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return time.perf_counter() - start


def main(argv=None) -> int:
    launched = time.time()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="prepared model folder (e.g. results/models/smollm2-135m)")
    parser.add_argument("--text", required=True, help="held-out text file")
    parser.add_argument("--jobs", type=int, default=4, help="jobs per arm")
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--smoke", action="store_true", help="toy size: 2 jobs of 2 windows of 32 tokens")
    parser.add_argument("--out", default="results/benchmarks/warm_worker.json")
    args = parser.parse_args(argv)
    jobs, window, max_tokens = (2, 32, 64) if args.smoke else (args.jobs, args.window, args.max_tokens)

    from kvsharer.atomic import atomic_write_text
    from kvsharer.warm_worker import ENV

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    env.pop(ENV, None)
    times = {"own_process": [], "warm_worker": []}
    with tempfile.TemporaryDirectory(prefix="kvsharer-bench-") as tmp:
        sock = os.path.join(tmp, "w.sock")
        start = time.perf_counter()
        server = subprocess.Popen([sys.executable, "-m", "kvsharer.warm_worker", sock], env=env,
                                  stderr=subprocess.PIPE, text=True)
        try:
            ready = server.stderr.readline()  # "kvsharer: warm worker ready in ..." once preloaded
            if "ready" not in ready:
                raise RuntimeError(f"the warm worker did not start: {ready}{server.stderr.read()}")
            startup = time.perf_counter() - start
            for i in range(jobs):
                for arm, arm_env in (("own_process", env), ("warm_worker", {**env, ENV: sock})):
                    job = ["--threads", "1", "evaluate-ppl", "--model", args.model, "--text", args.text,
                           "--window", str(window), "--max-tokens", str(max_tokens), "--out", f"{tmp}/{arm}{i}.json"]
                    times[arm].append(run_job(job, arm_env))
            results = {arm: json.loads(Path(f"{tmp}/{arm}0.json").read_text())["ppl"] for arm in times}
        finally:
            server.terminate()
            server.wait(timeout=30)
    if results["own_process"] != results["warm_worker"]:
        raise RuntimeError(f"the arms disagree: {results}")
    own, warm = (statistics.median(times[arm]) for arm in times)
    result = {"benchmark": "warm_worker", "host": platform.node(), "stage": "evaluate-ppl", "jobs": jobs,
              "window": window, "max_tokens": max_tokens, "seconds": times, "median_own_process": own,
              "median_warm_worker": warm, "ratio": warm / own, "warm_worker_startup_seconds": startup,
              "ppl": results["own_process"], **run_facts(launched, argv)}
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"evaluate-ppl job ({max_tokens} tokens in windows of {window}), median of {jobs}: own process {own:.2f} s, "
          f"warm worker {warm:.2f} s, ratio {warm / own:.3f} (saves {own - warm:.2f} s per job; the worker's "
          f"start-up, once per DAG: {startup:.1f} s)\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
