"""A KV-sharing policy: which layer's KV cache every layer reads.

``policy.map[l] == l`` means layer ``l`` computes and stores its own K/V (it is a *source*);
``policy.map[l] == s`` with ``s < l`` means layer ``l`` stores nothing and attends over the K/V that
layer ``s`` stored. A valid map has no forward pointers and no chains (``s`` itself stores KV).

Pure data and pure functions: no torch, no model. Policies are JSON files so that every later stage
(evaluation, profiling, baselines) takes "a policy file" as input.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..atomic import atomic_write_text


class PolicyError(ValueError):
    """A sharing map that cannot be applied."""


def map_problems(share_map: Sequence[int]) -> list[str]:
    """Every reason ``share_map`` is not a valid sharing map (empty list: valid)."""
    problems = []
    n = len(share_map)
    for layer, src in enumerate(share_map):
        if not isinstance(src, int) or isinstance(src, bool):
            problems.append(f"map[{layer}]={src!r} is not a layer index")
        elif src < 0 or src >= n:
            problems.append(f"map[{layer}]={src} is outside 0..{n - 1}")
        elif src > layer:
            problems.append(f"layer {layer} points forward to layer {src} (a layer may only reuse an earlier layer's KV)")
        elif src != layer and share_map[src] != src:
            problems.append(
                f"layer {layer} -> {src} is a chain: layer {src} itself shares layer {share_map[src]}, so it stores no KV"
            )
    return problems


def resolve_chains(share_map: Sequence[int]) -> list[int]:
    """Rewrite chains ``a -> b -> c`` as ``a -> c``, in layer order.

    This is how the search makes a candidate valid: when a former source ``b`` starts sharing ``c``,
    its dependents are dragged along to ``c``. Because ``map[l] <= l``, resolving in increasing layer
    order makes every earlier entry final before it is read.
    """
    out = list(share_map)
    for layer in range(len(out)):
        if out[layer] > layer:
            raise PolicyError(f"layer {layer} points forward to layer {out[layer]}")
        out[layer] = out[out[layer]]
    return out


@dataclass
class SharingPolicy:
    """``map[l]``: the layer whose KV layer ``l`` uses. ``meta``: anything else the JSON carried. ``path``: the
    file it was read from (files it names, such as its fitted K/V maps, lie beside it)."""

    map: list[int]
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.map = [int(s) if isinstance(s, (int,)) and not isinstance(s, bool) else s for s in self.map]
        if not self.map:
            raise PolicyError("invalid sharing map: it is empty (one entry per decoder layer is needed)")
        problems = map_problems(self.map)
        if problems:
            raise PolicyError("invalid sharing map " + str(self.map) + ": " + "; ".join(problems))

    # construction -------------------------------------------------------------------------
    @classmethod
    def identity(cls, n_layers: int, **meta: Any) -> "SharingPolicy":
        return cls(list(range(n_layers)), dict(meta))

    @classmethod
    def from_pairs(cls, n_layers: int, pairs: dict[int, int] | Sequence[tuple[int, int]], **meta: Any) -> "SharingPolicy":
        """``pairs``: {sharing layer: source layer}. Chains are *not* resolved: a chain is an error."""
        share_map = list(range(n_layers))
        for layer, src in dict(pairs).items():
            if not 0 <= layer < n_layers:
                raise PolicyError(f"invalid sharing map: layer {layer} is outside 0..{n_layers - 1}")
            share_map[layer] = src
        return cls(share_map, dict(meta))

    # views --------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.map)

    @property
    def shared_layers(self) -> list[int]:
        """Layers that store no KV."""
        return [layer for layer, src in enumerate(self.map) if src != layer]

    @property
    def num_shared(self) -> int:
        return len(self.shared_layers)

    @property
    def rate(self) -> float:
        """Fraction of layers that store no KV (the paper's compression rate)."""
        return self.num_shared / self.n_layers

    @classmethod
    def spread(cls, n_layers: int, rate: float, kinds: Sequence[Any] | None = None, **meta: Any) -> "SharingPolicy":
        """round(rate × L) layers, evenly spread over the depth, each reading the layer of its kind before it: the
        2nd, 4th, … layer of each attention kind reads the 1st, 3rd, … (``kinds``: each layer's
        ``kvsharer.models.layer_kinds.LayerKind``; None: all alike, so odd layers read the even one before).

        Not a searched policy: for measuring what sharing costs (bytes, time), which depends on how many
        layers share, not on which."""
        groups: dict[Any, list[int]] = {}
        for layer in range(n_layers):
            kind = None if kinds is None else kinds[layer]
            if kind is None or kind.has_kv:
                groups.setdefault(None if kind is None else (kind.kind, kind.window), []).append(layer)
        source = {group[i]: group[i - 1] for group in groups.values() for i in range(1, len(group), 2)}
        odd = sorted(source)
        k = int(rate * n_layers + 0.5)
        if not 0 <= k <= len(odd):
            raise PolicyError(f"rate {rate} gives {k} shared layers; a spread policy allows at most {len(odd)} of {n_layers}")
        chosen = {odd[(i * len(odd)) // k] for i in range(k)}
        return cls([source[layer] if layer in chosen else layer for layer in range(n_layers)], dict(meta))

    def is_identity(self) -> bool:
        return self.num_shared == 0

    def groups(self) -> dict[int, list[int]]:
        """{source layer: [source, sharers...]}: the layers that read one physical cache."""
        out: dict[int, list[int]] = {}
        for layer, src in enumerate(self.map):
            out.setdefault(src, []).append(layer)
        return out

    def __eq__(self, other: object) -> bool:  # policies are equal when they share the same way
        return isinstance(other, SharingPolicy) and self.map == other.map

    def __repr__(self) -> str:
        pairs = ", ".join(f"{layer}->{self.map[layer]}" for layer in self.shared_layers) or "none"
        return f"SharingPolicy(n_layers={self.n_layers}, shared={pairs})"

    # JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {**self.meta, "map": list(self.map), "n_layers": self.n_layers, "num_shared": self.num_shared}

    def to_json(self, path: str | os.PathLike | None = None, indent: int = 2) -> str:
        """The policy as JSON; with ``path``, also written there atomically (temp file, then rename)."""
        text = json.dumps(self.to_dict(), indent=indent) + "\n"
        if path is not None:
            atomic_write_text(path, text)
        return text

    @classmethod
    def from_json(cls, source: str | os.PathLike) -> "SharingPolicy":
        """From a JSON string or a path to a JSON file."""
        text, path = str(source), None
        if not text.lstrip().startswith("{"):
            path = Path(source)
            if not path.is_file():
                raise PolicyError(f"policy file {path} does not exist")
            text = path.read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise PolicyError(f"policy is not valid JSON: {err}") from None
        if not isinstance(data, dict) or "map" not in data:
            raise PolicyError("policy JSON must be an object with a 'map' list")
        meta = {k: v for k, v in data.items() if k not in ("map", "n_layers", "num_shared")}
        return cls(list(data["map"]), meta, path)

