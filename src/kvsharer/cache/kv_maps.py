"""Fitted K/V maps: what a sharing layer reads, corrected in closed form (training-free).

A layer ``i`` that shares layer ``j``'s cache attends over K/V that were computed *for j*. Both are linear
images of nearby points of the residual stream, so layer i's own K/V are well predicted, linearly, from
everything j stores — its keys *and* its values. A map per sharing layer, fitted by ridge least squares on the
plain model's K/V over the calibration samples (as GPTQ fits its rounding: closed form, no training):

    k_i ≈ [k̃_j, v_j] A_i + a_i        v_i ≈ [k̃_j, v_j] B_i + b_i        (one row per token; E = kv_heads × head_dim)
    [k̃_j, v_j]: 2E numbers          A_i, B_i: [2E, E]                    k̃: keys *before* RoPE

is applied to the source's K/V at attention time, in every forward (``KVSharing(..., maps=...)``). It stores
nothing per token: the KV bytes saved stay exactly those of plain sharing. The maps are constants of the
policy (``nbytes``: 2 × (2E × E + E) numbers per sharing layer), written beside the policy JSON
(``<policy>.kvmaps.safetensors``) and counted there, not in the cache.

Keys are cached after RoPE, whose rotation depends on the token's position: a map fitted across positions on
rotated keys would mix rotations. So the source's keys are un-rotated (positions 0..S-1: the cache index is
the position, as in every evaluation of this project; a left-padded batch would break that), mapped, and
rotated again at the same positions. This needs the model's rotary embedding in the ``rotate_half`` layout on
the full head dimension: the families of ``FAMILIES``; others are refused by :func:`check_model`.

Cost: the map runs over the source's whole cache in every forward (one [S, 2E] × [2E, 2E] product per sharing
layer): free next to the model at prefill, but a decoding step pays it for all S cached tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..atomic import atomic_path
from ..models.loading import find_parts, text_config
from ..names import MAP_FAMILIES

# model types whose keys carry RoPE in the rotate_half layout over the whole head (checked by tests/test_kv_maps.py)
FAMILIES = MAP_FAMILIES
RIDGE = 1e-3  # ridge, relative to the mean diagonal of the source's Gram matrix


class MapError(ValueError):
    """K/V maps that cannot be fitted or applied here."""


def check_model(model) -> None:
    """Refuse a model whose key rotation the maps cannot undo, naming the families they support."""
    config = text_config(model)
    family = getattr(config, "model_type", None)
    if family not in FAMILIES or getattr(config, "partial_rotary_factor", 1.0) not in (None, 1.0):
        raise MapError(f"fitted K/V maps support the {', '.join(FAMILIES)} families (keys rotated by RoPE over the whole "
                       f"head); {type(model).__name__} ({family}) is not one of them")
    if getattr(find_parts(model).decoder, "rotary_emb", None) is None:
        raise MapError(f"{type(model).__name__} has no decoder.rotary_emb: its key rotation cannot be undone")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Rope:
    """The model's key rotation at positions 0..S-1: ``rotate(x)`` applies it, ``unrotate(x)`` undoes it
    (x: [..., S, head_dim])."""

    def __init__(self, model):
        check_model(model)
        self.rotary = find_parts(model).decoder.rotary_emb

    def tables(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(like.shape[-2], device=like.device).unsqueeze(0)  # [1, S]
        cos, sin = self.rotary(like, positions)  # [1, S, head_dim] each
        return cos[0].to(like.dtype), sin[0].to(like.dtype)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        cos, sin = self.tables(x)
        return x * cos + _rotate_half(x) * sin

    def unrotate(self, x: torch.Tensor) -> torch.Tensor:
        cos, sin = self.tables(x)  # the inverse rotation: by -angle
        return x * cos - _rotate_half(x) * sin


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[N, H, T, D] -> [N*T, H*D]: one row per token, every head's channels side by side."""
    n, h, s, d = t.shape
    return t.transpose(1, 2).reshape(n * s, h * d)


def _heads(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[N*T, H*D] -> [N, H, T, D] shaped like ``like``."""
    n, h, s, d = like.shape
    return rows.reshape(n, s, h, d).transpose(1, 2)


@dataclass
class LayerMap:
    """Layer ``layer``'s K/V predicted from what ``source`` stores: ``[k̃, v] @ weight + bias`` for keys and values
    (weights [2E, E], biases [E], float32)."""

    layer: int
    source: int
    k_weight: torch.Tensor
    k_bias: torch.Tensor
    v_weight: torch.Tensor
    v_bias: torch.Tensor
    _placed: dict = field(default_factory=dict, repr=False, compare=False)  # (device, dtype) -> the four, converted

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k_weight, self.k_bias, self.v_weight, self.v_bias))

    def __call__(self, keys: torch.Tensor, values: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
        """The corrected (keys, values) [B, H, S, D] from the source's (keys after RoPE)."""
        x = torch.cat([_rows(rope.unrotate(keys)), _rows(values)], dim=-1)  # [B*S, 2E]
        where = (x.device, x.dtype)
        if where not in self._placed:  # converted once per device and dtype, not in every forward
            self._placed[where] = [t.to(*where) for t in (self.k_weight, self.k_bias, self.v_weight, self.v_bias)]
        k_weight, k_bias, v_weight, v_bias = self._placed[where]
        new_keys = _heads(torch.addmm(k_bias, x, k_weight), keys)  # [B, H, S, D], before RoPE
        new_values = _heads(torch.addmm(v_bias, x, v_weight), values)
        return rope.rotate(new_keys), new_values


class KVMaps(dict):
    """{sharing layer: its :class:`LayerMap`}, saved as one safetensors file."""

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.values())

    def check(self, share_map: list[int]) -> None:
        """Every sharing layer of ``share_map`` has a map from its source (and no map is left over)."""
        shared = {i: s for i, s in enumerate(share_map) if s != i}
        wrong = [f"layer {i} reads {s} but its map is from {self[i].source if i in self else 'nothing'}"
                 for i, s in shared.items() if i not in self or self[i].source != s]
        wrong += [f"a map for layer {i}, which does not share" for i in self if i not in shared]
        if wrong:
            raise MapError("K/V maps do not fit the sharing map: " + "; ".join(wrong))

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        tensors = {f"{i}.{name}": getattr(m, name).contiguous() for i, m in self.items()
                   for name in ("k_weight", "k_bias", "v_weight", "v_bias")}
        sources = json.dumps({str(i): m.source for i, m in self.items()})
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"sources": sources})

    @classmethod
    def load(cls, path: str | Path) -> "KVMaps":
        from safetensors import safe_open

        if not Path(path).is_file():
            raise MapError(f"K/V maps {path} not found (the search that wrote the policy writes them beside it)")
        out = cls()
        with safe_open(str(path), framework="pt") as fh:
            sources = json.loads((fh.metadata() or {}).get("sources", "{}"))
            for key, source in sources.items():
                i = int(key)
                out[i] = LayerMap(i, int(source), *(fh.get_tensor(f"{i}.{n}") for n in ("k_weight", "k_bias", "v_weight", "v_bias")))
        return out


# ------------------------------------------------------------------------------------------------
# fitting, from the plain model's K/V on the calibration samples
# ------------------------------------------------------------------------------------------------


class Fitter:
    """Ridge least-squares maps and their residuals from the plain model's cache on the calibration samples.

    ``kv``: per layer (keys after RoPE, values) [N, H, T, D] (the fast search's plain run; None for a layer
    with no K/V), positions 0..T-1 in every sample. Everything in float64 on the CPU."""

    def __init__(self, kv: list, rope: Rope, ridge: float = RIDGE):
        self.ridge = ridge
        self.k = [None if p is None else _rows(rope.unrotate(p[0].float().cpu())).double() for p in kv]  # [M, E]
        self.v = [None if p is None else _rows(p[1].float().cpu()).double() for p in kv]
        self._solved: dict[int, tuple] = {}  # per source: centred inputs, mean, Cholesky factor of the Gram
        self._maps: dict[tuple[int, int], LayerMap] = {}

    def _source(self, j: int):
        """(centred inputs [M, 2E], their mean, the Cholesky factor of their ridge-regularized Gram [2E, 2E], the
        ridge λ) of source ``j``."""
        if j not in self._solved:
            x = torch.cat([self.k[j], self.v[j]], dim=1)
            mean = x.mean(0)
            xc = x - mean
            gram = xc.T @ xc
            ridge = self.ridge * float(gram.diagonal().mean())
            gram += ridge * torch.eye(gram.shape[0], dtype=gram.dtype)
            self._solved[j] = (xc, mean, torch.linalg.cholesky(gram), ridge)
        return self._solved[j]

    @staticmethod
    def _explained(cross: torch.Tensor, weight: torch.Tensor, ridge: float) -> torch.Tensor:
        """The target variance a ridge solution W = (X'X + λI)⁻¹ X'Y explains, summed over its last dimension's
        columns: |Y|² - |Y - XW|² = tr(W'X'Y) + λ|W|² (shapes [..., 2E, E] -> [...])."""
        return (cross * weight).sum((-2, -1)) + ridge * (weight * weight).sum((-2, -1))

    def _fit(self, target: torch.Tensor, j: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(weight [2E, E], bias [E], residual: unexplained fraction of the target's variance)."""
        xc, mean, chol, ridge = self._source(j)
        yc = target - target.mean(0)
        cross = xc.T @ yc  # [2E, E]
        weight = torch.cholesky_solve(cross, chol)
        bias = target.mean(0) - mean @ weight
        residual = 1.0 - float(self._explained(cross, weight, ridge) / (yc * yc).sum())
        return weight, bias, residual

    def fit(self, i: int, j: int) -> LayerMap:
        if (i, j) in self._maps:
            return self._maps[(i, j)]
        kw, kb, _ = self._fit(self.k[i], j)
        vw, vb, _ = self._fit(self.v[i], j)
        self._maps[(i, j)] = LayerMap(i, j, kw.float(), kb.float(), vw.float(), vb.float())
        return self._maps[(i, j)]

    def residuals(self, i: int, j: int) -> tuple[float, float]:
        """(keys, values): the fraction of layer i's K and V variance the map from j leaves unexplained."""
        return self._fit(self.k[i], j)[2], self._fit(self.v[i], j)[2]

    def maps(self, share_map: list[int]) -> KVMaps:
        """A map for every sharing layer of ``share_map``."""
        return KVMaps({i: self.fit(i, s) for i, s in enumerate(share_map) if s != i})

    def ranking(self, pairs: list[tuple[int, int]]) -> list[tuple[int, int, float]]:
        """``pairs`` (i, j) as (i, j, score) by score, then i, then j: score = the K and V residuals of the map from j
        to i, summed (what the map cannot explain). Per source, one product with every target at once (float32;
        the solve in float64)."""
        targets: dict[int, list[int]] = {}
        for i, j in pairs:
            targets.setdefault(j, []).append(i)
        wanted = sorted({i for i, _ in pairs})
        # every target layer's centred K and V once, float32 [M, E], and their variance (float64)
        centred = [{i: (side[i] - side[i].mean(0)).float() for i in wanted} for side in (self.k, self.v)]
        variance = [{i: float((side[i] - side[i].mean(0)).pow(2).sum()) for i in wanted} for side in (self.k, self.v)]
        scored = []
        for j, layers in targets.items():
            xc, _, chol, ridge = self._source(j)
            x = xc.float()
            score = torch.zeros(len(layers), dtype=torch.float64)
            for side in range(2):
                yc = torch.cat([centred[side][i] for i in layers], dim=1)  # [M, n*E]: every target side by side
                n, e = len(layers), yc.shape[1] // len(layers)
                cross = (x.T @ yc).double()  # [2E, n*E]
                weight = torch.cholesky_solve(cross, chol)  # every target's map at once
                per_target = lambda t: t.reshape(-1, n, e).transpose(0, 1)  # noqa: E731 ([2E, n*E] -> [n, 2E, E])
                explained = self._explained(per_target(cross), per_target(weight), ridge)  # [n]
                score += 1.0 - explained / torch.tensor([variance[side][i] for i in layers], dtype=torch.float64)
            scored += [(i, j, float(s)) for i, s in zip(layers, score)]
        return sorted(scored, key=lambda t: (t[2], t[0], t[1]))
