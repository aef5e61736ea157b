"""Distances between layers' calibration KV caches, and the orders in which the search tries pairs.

Inputs are the calibration statistics ``keys``/``values`` of shape [L, kv_heads, T, head_dim] (averaged
over samples). Every metric returns a symmetric [L, L] matrix with a zero diagonal, larger = more
dissimilar, and is the mean of the key distance and the value distance:

* ``euclidean`` (the paper): mean over heads and positions of the L2 norm over head_dim of K_i − K_j.
* ``cosine``: mean over heads and positions of 1 − cos(K_i, K_j) over head_dim (the paper's ablation).
* ``cka``: 1 − linear CKA between the [T, heads·head_dim] matrices of two layers (Kornblith et al.
  2019): compares the *geometry* of the token representations, invariant to rotation and scale — the
  metric a reviewer asks for when Euclidean distance may just reflect norm differences between layers.
"""

from __future__ import annotations

import random
from typing import Callable

import torch

from ..models.layer_kinds import LayerKind, compatible
from ..names import RANKED_ORDERS

Metric = Callable[[torch.Tensor], torch.Tensor]  # [L, H, T, D] -> [L, L]


def _euclidean(x: torch.Tensor) -> torch.Tensor:
    x = x.double()  # one row at a time: [L, L, H, T, D] at once would not fit for 7B-sized layers
    return torch.stack([(x[i] - x).norm(dim=-1).mean(dim=(-1, -2)) for i in range(x.shape[0])])


def _cosine(x: torch.Tensor) -> torch.Tensor:
    x = torch.nn.functional.normalize(x.double(), dim=-1)
    cos = torch.einsum("ihtd,jhtd->ijht", x, x)
    return (1 - cos).mean(dim=(-1, -2))


def _cka(x: torch.Tensor) -> torch.Tensor:
    n_layers, heads, tokens, dim = x.shape
    feats = x.double().permute(0, 2, 1, 3).reshape(n_layers, tokens, heads * dim)
    feats = feats - feats.mean(dim=1, keepdim=True)
    gram = feats @ feats.transpose(1, 2)  # [L, T, T]: linear CKA via centered Gram matrices
    hsic = torch.einsum("itu,jtu->ij", gram, gram)
    norm = hsic.diagonal().clamp_min(1e-30).sqrt()
    return 1 - hsic / (norm[:, None] * norm[None, :])


METRICS: dict[str, Metric] = {"euclidean": _euclidean, "cosine": _cosine, "cka": _cka}
def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown distance metric {metric!r}; choose one of {', '.join(METRICS)}")


def layer_distances(keys: torch.Tensor, values: torch.Tensor, metric: str = "euclidean") -> torch.Tensor:
    """[L, L] float64 matrix: (distance of keys + distance of values) / 2, exact zeros on the diagonal."""
    check_metric(metric)
    if keys.shape != values.shape or keys.dim() != 4:
        raise ValueError(f"keys/values must both be [L, kv_heads, T, head_dim], got {tuple(keys.shape)} and {tuple(values.shape)}")
    dist = (METRICS[metric](keys) + METRICS[metric](values)) / 2
    dist = (dist + dist.T) / 2
    dist.fill_diagonal_(0.0)
    return dist


def rank_pairs(dist: torch.Tensor, order: str = "dissimilar", seed: int = 0,
               kinds: list[LayerKind] | None = None) -> list[tuple[int, int, float]]:
    """All pairs (i, j) with i > j — layer i would reuse layer j's KV — as (i, j, distance), in search order.

    ``dissimilar``: distance descending (the paper); ``similar``: ascending; ``random``: a seeded shuffle.
    Ties break by (i, j) so the order is deterministic. ``kinds`` (each layer's attention kind): only pairs of
    the same kind (full with full, sliding with sliding of the same window; layers without K/V in none).
    """
    if order not in RANKED_ORDERS:
        raise ValueError(f"pair order {order!r} is not a ranking; choose one of {', '.join(RANKED_ORDERS)}")
    n = dist.shape[0]
    pairs = [(i, j, float(dist[i, j])) for i in range(1, n) for j in range(i)
             if kinds is None or compatible(kinds, i, j)]
    pairs.sort(key=lambda p: (p[0], p[1]))
    if order == "dissimilar":
        pairs.sort(key=lambda p: -p[2])
    elif order == "similar":
        pairs.sort(key=lambda p: p[2])
    else:
        random.Random(seed).shuffle(pairs)
    return pairs
