"""Calibration: per-layer K/V statistics and reference outputs, computed once per (model, text).

One batched forward of the plain model over N samples of exactly T tokens (paper: 30 × 64). Written as
one safetensors file:

* ``input_ids``        [N, T]                   the samples
* ``keys``, ``values`` [L, kv_heads, T, head_dim] each layer's cache (keys after RoPE), averaged over samples, fp32
* ``reference_hidden`` [N, T, hidden]            last hidden state after the final norm (the search's yardstick)

and a JSON sidecar (``<file>.json``) with provenance: model and weights hash, text sha256, N, T, dtype,
package versions, code commit (the stage ``calibrate``, :mod:`kvsharer.stages.calibrate`, writes them).
Every later stage (distances, all searches) reuses this file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm import tqdm
from ..cache.prefill import prefill_cache
from ..models.loading import find_parts


def _per_layer(tensors: list, kinds) -> torch.Tensor:
    """[L, kv_heads, T, head_dim]: each layer's K (or V) summed over the batch, fp32 on the CPU; a layer with no
    K/V (Mamba / linear attention: it never shares) gets zeros, so the distances keep one row per layer."""
    shapes = {tuple(t.shape[1:]) for t, kind in zip(tensors, kinds) if kind.has_kv}
    if len(shapes) != 1:
        raise ValueError(f"the attention layers' K/V have different shapes {sorted(shapes)}: calibration "
                         "needs one [kv_heads, T, head_dim] for every layer")
    (shape,) = shapes
    return torch.stack([t.float().sum(0).cpu() if kind.has_kv else torch.zeros(shape)
                        for t, kind in zip(tensors, kinds)])


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
        # API that transformers 5 removed; sliding layers keep every token (kvsharer.cache.prefill)
        out = parts.decoder(input_ids=batch, past_key_values=prefill_cache(model.config), use_cache=True)
        cache = out.past_key_values
        # (on CPU: a model spread over GPUs holds its layers' caches on different devices)
        keys = _per_layer([layer.keys for layer in cache.layers[: parts.n_layers]], parts.kinds)
        values = _per_layer([layer.values for layer in cache.layers[: parts.n_layers]], parts.kinds)
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
