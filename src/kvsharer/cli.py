"""``python -m kvsharer <stage>``: one subcommand per pipeline stage.

Each stage module (:mod:`kvsharer.stages`) owns its subcommand through two functions,
``add_arguments(parser)`` and ``main(args) -> int``: it parses, reads its inputs, calls the core's pure functions
and writes its outputs; this file only lists them. ``warm-worker`` is the one subcommand that is no pipeline
stage: it hosts the CLI itself (:mod:`kvsharer.warm_worker`). Snakemake rules call these subcommands, so every stage
runs and is tested without Snakemake.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time

from .warm_worker import IN_WORKER

# subcommand -> (module, one-line help)
STAGES = {
    "prepare-model": ("kvsharer.stages.prepare_model", "materialize a model (hub id, folder or embedded) as a safetensors folder"),
    "prepare-text": ("kvsharer.stages.prepare_text", "split a corpus into non-overlapping calibration and evaluation text"),
    "calibrate": ("kvsharer.stages.calibrate", "per-layer K/V statistics and reference outputs on N x T calibration tokens"),
    "calibration-states": ("kvsharer.stages.calibration_states", "the plain model's run on the calibration samples, layer by "
                                                                 "layer: where every fast search starts"),
    "distances": ("kvsharer.stages.distances", "pairwise layer distance matrix of the calibration KV caches"),
    "search": ("kvsharer.stages.search", "greedy KVSharer policy search (fast or the authors' official procedure)"),
    "profile": ("kvsharer.stages.profile", "KV bytes, peak memory, prefill and decode speed vs sharing rate and token methods"),
    "serving": ("kvsharer.stages.serving", "vLLM serving plain and sharing policies at fixed KV-cache budgets: blocks, "
                                           "concurrency, tokens/s (needs vLLM: make serve-setup)"),
    "search-scaling": ("kvsharer.stages.search_scaling", "search cost vs depth and width, fitted and projected to 7B-400B"),
    "run-meta": ("kvsharer.stages.run_meta", "record commit, config hash, versions, host and GPU of a run"),
    "generate": ("kvsharer.stages.generate", "generate text with a sharing policy and report the KV-cache bytes"),
    "make-tasks": ("kvsharer.stages.make_tasks", "build local multiple-choice lm-eval tasks from held-out text"),
    "evaluate-ppl": ("kvsharer.stages.evaluate_ppl", "perplexity on held-out text under a sharing policy"),
    "evaluate-harness": ("kvsharer.stages.evaluate_harness", "lm-eval harness accuracy under a sharing policy"),
    "evaluate-longctx": ("kvsharer.stages.evaluate_longctx", "passkey retrieval over lengths x depths under a sharing policy"),
    "rehearsal-config": ("kvsharer.stages.rehearsal_config", "a rehearsal of a paper config: CPU stand-ins of its models and tasks, a stated cut"),
    "tables": ("kvsharer.stages.tables", "paper-style tables (CSV + Markdown) from policy and evaluation files"),
    "figures": ("kvsharer.stages.figures", "report figures (PNG + PDF) from policy, evaluation and distance files"),
    "docs": ("kvsharer.stages.docs", "generate docs/configuration.md from the config schema and docs/results.md "
                                     "(+ the README's table) from a results folder"),
    "warm-worker": ("kvsharer.warm_worker", "run a command (e.g. snakemake) whose kvsharer jobs fork from one warm "
                                            "process instead of each importing torch anew"),
}


def build_parser(stage: str | None = None) -> argparse.ArgumentParser:
    """All stages are listed; only ``stage``'s module is imported (stages that only read results, like
    ``tables``, never pay for importing torch)."""
    parser = argparse.ArgumentParser(
        prog="python -m kvsharer",
        description="KVSharer: layer-wise dissimilar KV-cache sharing, stage by stage.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--gpus", type=int, default=None,
                        help="GPUs a model is loaded across (more than 1: device_map='auto' over the first N visible "
                             "GPUs; default 1, or $KVSHARER_GPUS)")
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for name, (module, help_text) in STAGES.items():
        stage_parser = sub.add_parser(name, help=help_text, description=help_text)
        stage_parser.set_defaults(_module=module)
        if name == stage:
            importlib.import_module(module).add_arguments(stage_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    stage = next((a for a in argv if a in STAGES), None)
    args = build_parser(stage).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s kvsharer %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    log = logging.getLogger("kvsharer")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.gpus is not None:
        if args.gpus < 0:
            log.error("--gpus must be 0 or more, got %d", args.gpus)
            return 2
        os.environ["KVSHARER_GPUS"] = str(args.gpus)  # read by kvsharer.models.loading.load_model
    start = time.perf_counter()
    warm = os.environ.get(IN_WORKER)
    log.info("stage %s started%s", args.stage, f" (forked from the warm worker, pid {warm})" if warm else "")
    try:
        rc = importlib.import_module(args._module).main(args)
    except (ValueError, FileNotFoundError) as err:
        # bad input: one clear message, no traceback
        log.error("%s: %s", args.stage, err)
        return 2
    log.info("stage %s finished in %.1f s", args.stage, time.perf_counter() - start)
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
