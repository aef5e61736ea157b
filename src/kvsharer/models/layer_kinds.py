"""What kind of attention every decoder layer runs, read from the model's config — torch-free.

KV sharing is sound only between layers that attend the same way: a shared layer attends over exactly what
its source's cache returned to the source's own attention in this forward, under its own mask, so the two
must keep the same tokens (full attention, or a sliding window / chunk of the same size). Layers with no
per-token K/V (Mamba / linear attention / convolution, or no attention at all) never share and are never
sources. This is the rule transformers' Gemma3n (``shared_kv_states`` keyed by layer type) and vLLM
(``kv_sharing_target_layer_name``: an earlier layer of the same attention type) follow.

``layer_kinds(config)`` reads a transformers config object or a ``config.json`` dict (its text config for
multimodal ones): ``layer_types`` when the config has it (transformers 5 normalises nearly every family to
it: ``full_attention``, ``sliding_attention``, ``chunked_attention``, ``linear_attention``, ``hybrid`` …),
else the older fields (``sliding_window`` / ``use_sliding_window`` / ``max_window_layers``,
``attention_chunk_size``). The policy code, the searches, preflight and the vLLM plugin all ask it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

FULL, SLIDING, CHUNKED, LINEAR, NONE, LATENT, UNKNOWN = "full", "sliding", "chunked", "linear", "none", "latent", "unknown"

# transformers' layer-type names -> (attention kind, the layer also keeps a recurrent state)
_LAYER_TYPES: dict[str, tuple[str, bool]] = {
    "full_attention": (FULL, False), "attention": (FULL, False), "global_attention": (FULL, False),
    "sliding_attention": (SLIDING, False), "local_attention": (SLIDING, False),
    "chunked_attention": (CHUNKED, False),
    "linear_attention": (LINEAR, True), "conv": (LINEAR, True), "mamba": (LINEAR, True), "mamba2": (LINEAR, True),
    # one layer holding both an attention cache and a recurrent state (Falcon-H1, Zamba2's hybrid blocks)
    "hybrid": (FULL, True), "hybrid_sliding": (SLIDING, True),
    "moe": (NONE, False), "mlp": (NONE, False), "dummy": (NONE, False),
}


@dataclass(frozen=True)
class LayerKind:
    """The attention of one decoder layer: ``kind`` (full, sliding, chunked, linear, none, latent, unknown),
    ``window`` (tokens a sliding/chunked layer attends over), ``recurrent`` (it also keeps a Mamba /
    linear-attention state of its own, which sharing never touches) and ``name`` (the config's word)."""

    kind: str
    window: int | None = None
    recurrent: bool = False
    name: str = ""

    @property
    def has_kv(self) -> bool:
        """Whether the layer stores per-token K/V that another layer could read (or stop storing)."""
        return self.kind in (FULL, SLIDING, CHUNKED)

    def describe(self) -> str:
        if self.kind in (SLIDING, CHUNKED):
            text = f"{self.kind} attention (window {self.window})"
        elif self.kind == FULL:
            text = "full attention"
        elif self.kind == LINEAR:
            text = f"no per-token K/V ({self.name or 'linear attention / state space'})"
        elif self.kind == NONE:
            text = f"no attention ({self.name or 'none'})"
        elif self.kind == LATENT:
            text = "multi-head latent attention (its cache holds a compressed latent, not K/V)"
        else:
            text = f"unknown layer type {self.name!r}"
        return text + (" + recurrent state" if self.recurrent and self.has_kv else "")


def _get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, dict):
        return config.get(key, default)
    try:
        return getattr(config, key, default)
    except Exception:  # transformers' heterogeneous configs refuse a per-layer attribute on the whole model
        return default


def _per_layer(config: Any, key: str, n: int) -> list[Any]:
    """``key`` of every layer: from the per-layer configs of a heterogeneous config, else the one value."""
    layers = None if isinstance(config, dict) else _get(config, "per_layer_config")
    if isinstance(layers, (list, tuple)) and len(layers) == n:
        return [_get(layer, key) for layer in layers]
    return [_get(config, key)] * n


def text_config_of(config: Any) -> Any:
    """The decoder's config: ``text_config`` of a multimodal config (object or dict), else ``config`` itself."""
    if not isinstance(config, dict) and hasattr(config, "get_text_config"):
        return config.get_text_config(decoder=True)
    inner = _get(config, "text_config")
    return inner if inner is not None else config


def layer_kinds(config: Any) -> list[LayerKind]:
    """One ``LayerKind`` per decoder layer of ``config`` (a transformers config or a ``config.json`` dict)."""
    config = text_config_of(config)
    n = _get(config, "num_hidden_layers")
    if not isinstance(n, int) or n <= 0:
        raise ValueError("the config has no num_hidden_layers: its decoder layers cannot be described")
    if any(_per_layer(config, "kv_lora_rank", n)):  # DeepSeek-V2/V3, MiniCPM3, GLM-4 MoE Lite: a latent cache
        return [LayerKind(LATENT, name="latent")] * n
    window = _get(config, "sliding_window")
    chunk = _get(config, "attention_chunk_size")
    types = _get(config, "layer_types")
    if types is not None:
        if len(types) != n:
            raise ValueError(f"the config's layer_types has {len(types)} entries for {n} layers")
        windows, chunks = _per_layer(config, "sliding_window", n), _per_layer(config, "attention_chunk_size", n)
        kinds = []
        for name, window, chunk in zip(types, windows, chunks):
            kind, recurrent = _LAYER_TYPES.get(name, (UNKNOWN, False))
            size = window if kind == SLIDING else chunk if kind == CHUNKED else None
            kinds.append(LayerKind(kind, size, recurrent, name))
    else:  # older configs: one window for every layer (Qwen2's use_sliding_window: the layers from max_window_layers)
        use = _get(config, "use_sliding_window", True)
        if window is not None and use:
            first = _get(config, "max_window_layers", 0) if _get(config, "use_sliding_window") else 0
            kinds = [LayerKind(SLIDING, window, name="sliding_attention") if i >= (first or 0)
                     else LayerKind(FULL, name="full_attention") for i in range(n)]
        elif chunk is not None:
            kinds = [LayerKind(CHUNKED, chunk, name="chunked_attention")] * n
        else:
            kinds = [LayerKind(FULL, name="full_attention")] * n
    return _mark_model_reuse(config, kinds)


def _mark_model_reuse(config: Any, kinds: list[LayerKind]) -> list[LayerKind]:
    """Layers that already read another layer's K/V by the model's own design (Gemma 3n's and Gemma 4's last
    layers: ``num_kv_shared_layers`` / ``kv_sharing_modes``) store none: they can neither share nor be sources."""
    modes = _get(config, "kv_sharing_modes")
    reuse = [mode == "reuse" for mode in modes] if modes else [False] * len(kinds)
    shared_tail = _get(config, "num_kv_shared_layers") or 0
    if shared_tail:
        reuse = [r or i >= len(kinds) - shared_tail for i, r in enumerate(reuse)]
    return [LayerKind(NONE, name="reuses K/V by design") if r else k for k, r in zip(kinds, reuse)]


def pair_problem(kinds: Sequence[LayerKind], layer: int, source: int) -> str | None:
    """Why ``layer`` cannot read ``source``'s K/V (None: it can)."""
    mine, theirs = kinds[layer], kinds[source]
    if not mine.has_kv:
        return f"layer {layer} has {mine.describe()}: it has no K/V to share"
    if not theirs.has_kv:
        return f"layer {layer} cannot read layer {source}: layer {source} has {theirs.describe()}"
    if (mine.kind, mine.window) != (theirs.kind, theirs.window):
        return (f"layer {layer} ({mine.describe()}) cannot read layer {source} ({theirs.describe()}): "
                "a shared layer attends over exactly what its source's cache holds, so both need the same kind")
    return None


def compatible(kinds: Sequence[LayerKind], layer: int, source: int) -> bool:
    return pair_problem(kinds, layer, source) is None


def policy_problems(share_map: Sequence[int], kinds: Sequence[LayerKind]) -> list[str]:
    """Every pair of ``share_map`` (``map[l] = s``) that ``kinds`` rule out (empty: the map fits the model)."""
    if len(share_map) != len(kinds):
        return [f"the map has {len(share_map)} entries but the model has {len(kinds)} decoder layers"]
    return [problem for layer, src in enumerate(share_map) if src != layer
            for problem in [pair_problem(kinds, layer, src)] if problem]


def shareable_layers(kinds: Sequence[LayerKind]) -> list[int]:
    """Layers that could stop storing K/V: those with an earlier layer of the same kind."""
    return [i for i in range(len(kinds)) if any(compatible(kinds, i, j) for j in range(i))]


def unsupported(kinds: Sequence[LayerKind]) -> str | None:
    """Why no layer of this model can share (None: some can). Latent attention and unknown layer types are
    refused whole; a model whose layers all lack K/V has nothing to share."""
    latent = [i for i, k in enumerate(kinds) if k.kind == LATENT]
    if latent:
        return ("multi-head latent attention (kv_lora_rank): its cache holds one compressed latent per token "
                "that each layer decompresses with its own up-projection, so another layer's latent read with "
                "this layer's projections is not that layer's K/V; sharing latents is not supported")
    unknown = sorted({k.name for k in kinds if k.kind == UNKNOWN})
    if unknown:
        return f"unknown layer type(s) {', '.join(map(repr, unknown))} in config.layer_types"
    if not shareable_layers(kinds):
        return "no two layers with per-token K/V of the same attention kind: no layer can share"
    return None
