"""Stage ``calibration-states``: the plain model's run on a calibration file's samples, layer by layer (every
decoder layer's output and the K/V it stores), written once so that every fast search starts from it instead of
computing it (:func:`kvsharer.search.greedy.plain_run`; the search reads it with ``--start``).

It saves one forward over the N x T calibration tokens per search: on a CPU about half of a short search (the
demo's: ~5 s of ~10 s). The file holds N x T x L x (hidden + 2 x KV width) values in the model's dtype: 220 MB
for the 135M demo model in float32, ~1.5 GB for a 7B model in float16, so on GPUs, where that forward takes a
fraction of a second, it is off by default (config ``calibration.states``).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from safetensors.torch import save_file

from ..atomic import atomic_path
from ..models.loading import DTYPES, check_source, load_model, resolve_device
from ..search import calibrate
from ..search.greedy import plain_run
from .search import check_calibration, sha256_file, states_header

log = logging.getLogger("kvsharer")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="the model the calibration file was made with")
    parser.add_argument("--calibration", required=True, type=Path, help="calibration .safetensors (from `calibrate`)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="samples per forward: the searches' (float rounding depends on it; default all)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", required=True, type=Path, help="output .safetensors")


def main(args: argparse.Namespace) -> int:
    check_source(args.model)
    meta = calibrate.read_meta(args.calibration)
    check_calibration(meta, args.model, None, None)
    stats = calibrate.load(args.calibration)
    model, _ = load_model(args.model, dtype=args.dtype, device=resolve_device(args.device))
    tensors = {name: t.cpu() for name, t in plain_run(model, stats["input_ids"], args.batch_size).items()}
    with atomic_path(args.out) as tmp:
        save_file(tensors, str(tmp), metadata={"kvsharer": json.dumps(states_header(sha256_file(args.calibration), args.batch_size, args.dtype))})
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    log.info("plain run on %d x %d calibration tokens, %d layers (%.0f MB) written to %s", *stats["input_ids"].shape,
             meta["n_layers"], size / 1e6, args.out)
    return 0
