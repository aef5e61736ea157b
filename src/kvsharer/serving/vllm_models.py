"""``KVSharer<Arch>``: vLLM's own ``<Arch>`` model class, whose shared layers read their sources' KV caches.

No modeling code is copied: the class is built on first use as a subclass of the class vLLM's registry
names for ``<Arch>``; its ``__init__`` runs vLLM's and then, for every shared layer ``l -> s`` of the policy
in ``config.kvsharer_share_map``, sets ``Attention.kv_sharing_target_layer_name`` of layer ``l`` to layer
``s``'s attention (and the backend's copy, ``attn.impl.kv_sharing_target_layer_name``). vLLM reads that
attribute when it sets up the KV cache, after the model is built (``GPUModelRunner.get_kv_cache_spec``,
which the CPU runner inherits): a shared layer gets no KV-cache spec, hence no blocks, is bound to its
source's cache tensor (``initialize_kv_cache``) and skips the cache write in ``Attention.forward``; its
attention reads the source's K/V from the cache, in prefill as in decode.

What a shared layer still does: its fused ``qkv_proj`` still computes K and V (and rotary embeds K);
they are thrown away (vLLM 0.32: ``Attention.forward`` skips only ``unified_kv_cache_update``).
"""

from __future__ import annotations

import importlib

from torch import nn

from ..cache.policy import SharingPolicy
from ..models.layer_kinds import layer_kinds, pair_problem
from .overrides import BASE_KEY, MAP_KEY, PREFIX, ServingError

_classes: dict[str, type] = {}


def attention_layers(model: nn.Module) -> dict[int, nn.Module]:
    """{decoder layer index: its vLLM ``Attention``} of ``model``."""
    from vllm.model_executor.layers.attention import Attention
    from vllm.model_executor.models.utils import extract_layer_index

    out: dict[int, nn.Module] = {}
    for module in model.modules():
        if isinstance(module, Attention):
            index = extract_layer_index(module.layer_name)
            if index in out:
                raise ServingError(f"two attention layers in decoder layer {index}: "
                                   f"{out[index].layer_name} and {module.layer_name}")
            out[index] = module
    return out


def _vllm_problem(layer: int, src: int, mine: nn.Module, theirs: nn.Module) -> str | None:
    """Why vLLM's layer ``mine`` cannot read ``theirs``' cache, as vLLM built them (None: it can)."""
    for what in ("attn_type", "num_kv_heads", "head_size", "kv_cache_dtype"):
        a, b = getattr(mine, what, None), getattr(theirs, what, None)
        if a != b:
            return f"layer {layer} ({mine.layer_name}) has {what}={a} but layer {src} ({theirs.layer_name}) has {b}"
    a, b = getattr(mine.impl, "sliding_window", None), getattr(theirs.impl, "sliding_window", None)
    if a != b:
        return (f"layer {layer} ({mine.layer_name}) has sliding window {a} but layer {src} "
                f"({theirs.layer_name}) has {b}: a shared layer attends over exactly what its source's cache holds")
    return None


def bind_shared_layers(model: nn.Module, vllm_config) -> list[tuple[str, str]]:
    """Bind every shared layer of the policy in ``vllm_config``'s model config to its source's cache.

    Returns the (layer, source) attention names bound. Raises :class:`ServingError` naming both layers of
    every pair that differs in attention type or window (from the config and as vLLM built them)."""
    from vllm.model_executor.layers.attention.attention import validate_kv_sharing_target

    hf_config = vllm_config.model_config.hf_config
    share_map = getattr(hf_config, MAP_KEY, None)
    if share_map is None:
        raise ServingError(f"{type(model).__name__} serves a sharing policy but the config has no {MAP_KEY}: "
                           "pass hf_overrides=kvsharer.serving.overrides.serving_overrides(model, policy)")
    policy = SharingPolicy(list(share_map))
    kinds = layer_kinds(hf_config)
    attns = attention_layers(model)
    if len(kinds) != policy.n_layers or len(attns) != policy.n_layers:
        raise ServingError(f"the policy has {policy.n_layers} layers, the config {len(kinds)}, "
                           f"the vLLM model {len(attns)} attention layers (pipeline parallelism is not supported)")
    problems = []
    for layer in policy.shared_layers:
        src = policy.map[layer]
        why = pair_problem(kinds, layer, src) or _vllm_problem(layer, src, attns[layer], attns[src])
        if why:
            problems.append(why)
    if problems:
        raise ServingError("vLLM cannot serve this policy: " + "; ".join(problems))
    context = vllm_config.compilation_config.static_forward_context
    bound = []
    for layer in policy.shared_layers:
        mine, theirs = attns[layer], attns[policy.map[layer]]
        validate_kv_sharing_target(mine.layer_name, theirs.layer_name, context)
        mine.kv_sharing_target_layer_name = theirs.layer_name
        if hasattr(mine.impl, "kv_sharing_target_layer_name"):
            mine.impl.kv_sharing_target_layer_name = theirs.layer_name
        bound.append((mine.layer_name, theirs.layer_name))
    return bound


def _make(name: str) -> type:
    from vllm.logger import init_logger
    from vllm.model_executor.models.registry import _VLLM_MODELS

    base_arch = name[len(PREFIX):]
    if base_arch not in _VLLM_MODELS:
        raise ServingError(f"vLLM has no architecture {base_arch}")
    module_name, class_name = _VLLM_MODELS[base_arch]
    base = getattr(importlib.import_module(f"vllm.model_executor.models.{module_name}"), class_name)
    logger = init_logger(f"vllm.{__name__}")  # under vLLM's logger: printed in the engine process too

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        base.__init__(self, vllm_config=vllm_config, prefix=prefix, **kwargs)
        hf_config = vllm_config.model_config.hf_config
        if getattr(hf_config, BASE_KEY, base_arch) != base_arch:
            raise ServingError(f"{name} was asked for a {getattr(hf_config, BASE_KEY)} model")
        self.kvsharer_bound = bind_shared_layers(self, vllm_config)
        logger.info("KVSharer: %d of %d layers read another layer's KV cache: %s", len(self.kvsharer_bound),
                    len(attention_layers(self)), ", ".join(f"{a} -> {b}" for a, b in self.kvsharer_bound))

    cls = type(name, (base,), {"__init__": __init__, "__module__": __name__, "__qualname__": name,
                               "__doc__": f"vLLM's {base_arch} serving a KVSharer policy ({__name__})."})
    return cls


def __getattr__(name: str) -> type:
    """``KVSharer<Arch>``, built on first use (vLLM's registry imports it as ``module:Class``)."""
    if not name.startswith(PREFIX):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _classes:
        _classes[name] = _make(name)
    return _classes[name]
