"""Stage ``calibrate``: per-layer K/V statistics and reference outputs on N x T calibration tokens, written
as one safetensors file with a JSON sidecar (``<out>.json``)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from safetensors.torch import save_file

from ..atomic import atomic_path, atomic_write_text
from ..data import check_text_source, load_corpus, sha256_text, token_chunks
from ..models.loading import DTYPES, check_source, load_model, model_id, resolve_device
from ..provenance import code_commit, versions
from ..search.calibrate import collect

log = logging.getLogger("kvsharer")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model folder, hub id or embedded:<name>")
    parser.add_argument("--text", default="embedded:pydoc", help="calibration text: a file, embedded:pydoc, or hf:<dataset>...")
    parser.add_argument("--samples", type=int, default=30, help="N samples (paper: 30)")
    parser.add_argument("--tokens", type=int, default=64, help="T tokens per sample (paper: 64)")
    parser.add_argument("--batch-size", type=int, default=None, help="samples per forward (default: all N at once)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", required=True, type=Path, help="output .safetensors (sidecar: <out>.json)")


def main(args: argparse.Namespace) -> int:
    check_source(args.model)
    check_text_source(args.text)
    if args.samples < 1 or args.tokens < 2:
        raise ValueError(f"need --samples >= 1 and --tokens >= 2, got {args.samples} and {args.tokens}")
    text = load_corpus(args.text)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=resolve_device(args.device))
    input_ids = token_chunks(tokenizer, text, args.samples, args.tokens)
    tensors = collect(model, input_ids, args.batch_size)
    source, weights = model_id(args.model)
    meta = {
        "model": args.model,
        "model_source": source,
        "weights_sha256": weights,
        "model_class": type(model).__name__,
        "n_layers": tensors["keys"].shape[0],
        "text": args.text,
        "text_sha256": sha256_text(text),
        "samples": args.samples,
        "tokens": args.tokens,
        "dtype": args.dtype,
        "device": str(model.device),
        "versions": versions(),
        "commit": code_commit(),
    }
    with atomic_path(args.out) as tmp:
        save_file(tensors, str(tmp), metadata={"kvsharer": json.dumps(meta)})
        atomic_write_text(f"{args.out}.json", json.dumps(meta, indent=2) + "\n")
    log.info("calibration (%d x %d tokens, %d layers) written to %s", args.samples, args.tokens, meta["n_layers"], args.out)
    return 0
