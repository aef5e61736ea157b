"""Stage ``run-meta``: what produced a result directory (commit, config hash, versions, host, GPU)."""

from __future__ import annotations

import argparse
import json
import platform
import socket
from pathlib import Path

from ..atomic import atomic_write_text
from ..provenance import code_commit, config_hash, gpu_name, versions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config-json", required=True, help="the pipeline config as JSON (Snakemake passes it)")
    parser.add_argument("--model", help="model name this directory belongs to")
    parser.add_argument("--out", required=True, type=Path)


def main(args: argparse.Namespace) -> int:
    config = json.loads(args.config_json)
    meta = {
        "model": args.model, "commit": code_commit(), "config_sha256": config_hash(config),
        "host": socket.gethostname(), "platform": platform.platform(), "gpu": gpu_name(),
        "versions": versions(), "config": config,
    }
    atomic_write_text(args.out, json.dumps(meta, indent=2) + "\n")
    return 0
