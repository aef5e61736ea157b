"""Stage ``calibrate``: per-layer K/V statistics and reference outputs, computed once per (model, text).

One batched forward of the plain model over N samples of exactly T tokens (paper: 30 × 64). Written as
one safetensors file:

* ``input_ids``        [N, T]                   the samples
* ``keys``, ``values`` [L, kv_heads, T, head_dim] each layer's cache (keys after RoPE), averaged over samples, fp32
* ``reference_hidden`` [N, T, hidden]            last hidden state after the final norm (the search's yardstick)

and a JSON sidecar (``<file>.json``) with provenance: model and weights hash, text sha256, N, T, dtype,
package versions, code commit. Every later stage (distances, all searches) reuses this file.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers.cache_utils import DynamicCache

from ..atomic import atomic_path, atomic_write_text
from ..data import check_text_source, load_corpus, sha256_text, token_chunks
from ..models.loading import DTYPES, check_source, find_parts, load_model, model_id, resolve_device
from ..provenance import code_commit, versions

log = logging.getLogger("kvsharer")


@torch.inference_mode()
def collect(model, input_ids: torch.Tensor, batch_size: int | None = None) -> dict[str, torch.Tensor]:
    """Mean K/V per layer over samples and the reference last hidden states, from the plain model."""
    parts = find_parts(model)
    batch_size = batch_size or input_ids.shape[0]
    key_sum = value_sum = None
    hidden = []
    for start in tqdm(range(0, input_ids.shape[0], batch_size), desc="calibrate", unit="batch", leave=False):
        batch = input_ids[start : start + batch_size].to(model.device)
        # an explicit cache: remote code (InternLM2) would otherwise build one through the legacy-cache
        # API that transformers 5 removed
        out = parts.decoder(input_ids=batch, past_key_values=DynamicCache(config=model.config), use_cache=True)
        cache = out.past_key_values
        # (on CPU: a model spread over GPUs holds its layers' caches on different devices)
        keys = torch.stack([layer.keys.float().sum(0).cpu() for layer in cache.layers[: parts.n_layers]])
        values = torch.stack([layer.values.float().sum(0).cpu() for layer in cache.layers[: parts.n_layers]])
        key_sum = keys if key_sum is None else key_sum + keys
        value_sum = values if value_sum is None else value_sum + values
        hidden.append(out.last_hidden_state.float().cpu())
    n = input_ids.shape[0]
    return {
        "input_ids": input_ids.cpu().contiguous(),
        "keys": (key_sum / n).cpu().contiguous(),
        "values": (value_sum / n).cpu().contiguous(),
        "reference_hidden": torch.cat(hidden).contiguous(),
    }


def read_meta(path: str | Path) -> dict:
    """The JSON sidecar of a calibration file (raises ValueError when it is missing)."""
    side = Path(f"{path}.json")
    if not Path(path).is_file() or not side.is_file():
        raise ValueError(f"calibration file {path} (and its sidecar {side.name}) not found; run `calibrate` first")
    return json.loads(side.read_text())


def load(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


# ------------------------------------------------------------------------------------------------
# stage calibrate
# ------------------------------------------------------------------------------------------------


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
