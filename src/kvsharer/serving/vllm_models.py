"""``KVSharer<Arch>``: vLLM's own ``<Arch>`` model class, whose shared layers read their sources' KV caches.

No modeling code is copied: the class is built on first use as a subclass of the class vLLM's registry
names for ``<Arch>``; its ``__init__`` runs vLLM's and then, for every shared layer ``l -> s`` of the policy
in ``config.kvsharer_share_map``, sets ``Attention.kv_sharing_target_layer_name`` of layer ``l`` to layer
``s``'s attention (and the backend's copy, ``attn.impl.kv_sharing_target_layer_name``). vLLM reads that
attribute when it sets up the KV cache, after the model is built (``GPUModelRunner.get_kv_cache_spec``,
which the CPU runner inherits): a shared layer gets no KV-cache spec, hence no blocks, is bound to its
source's cache tensor (``initialize_kv_cache``) and skips the cache write in ``Attention.forward``; its
attention reads the source's K/V from the cache, in prefill as in decode.

vLLM itself would still compute a shared layer's K and V (its fused ``qkv_proj``) and throw them away
(``Attention.forward`` skips only the cache write). After the checkpoint's weights are loaded
(``load_weights``), each shared layer's ``qkv_proj`` is replaced by :class:`QOnlyProjection`, which keeps only
the Q rows of the weight and multiplies by those alone, returning zeros in the K/V columns (never read:
the layer attends over its source's cache). This needs an unquantized ``qkv_proj`` with ``q_size`` /
``kv_size`` on its attention module (Llama, Mistral, Qwen2, Qwen3, Gemma 2/3, Phi-3 in vLLM); elsewhere,
with ``load_format=dummy`` (no ``load_weights``) or with ``kvsharer_skip_kv: false`` in the overrides, the
projection is left as it is and the K/V are computed and discarded.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from ..cache.policy import SharingPolicy
from ..models.layer_kinds import layer_kinds, pair_problem
from .overrides import BASE_KEY, MAP_KEY, PREFIX, SKIP_KEY, ServingError

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


class QOnlyProjection(nn.Module):
    """Stands in for a shared layer's fused ``qkv_proj`` after weight loading: ``x @ W_q^T (+ b_q)`` into the
    Q columns of a ``[..., q + 2 kv]`` output whose K/V columns are zero (the layer's K/V are never read)."""

    def __init__(self, original: nn.Module, q_size: int, kv_size: int):
        super().__init__()
        weight = original.weight
        if weight.shape[0] != q_size + 2 * kv_size:
            raise ServingError(f"qkv_proj has {weight.shape[0]} output rows, not q + 2 kv = {q_size + 2 * kv_size}")
        # buffers, not parameters: vLLM's loaded-weights check counts parameters
        self.register_buffer("q_weight", weight.detach()[:q_size].clone(), persistent=False)
        bias = getattr(original, "bias", None)
        self.register_buffer("q_bias", None if bias is None else bias.detach()[:q_size].clone(), persistent=False)
        self.q_size, self.kv_size = q_size, kv_size

    def forward(self, x: torch.Tensor):
        out = x.new_zeros(*x.shape[:-1], self.q_size + 2 * self.kv_size)
        out[..., : self.q_size] = torch.nn.functional.linear(x, self.q_weight, self.q_bias)
        return out, None

    def extra_repr(self) -> str:
        return f"q_size={self.q_size}, kv_size={self.kv_size} (K/V not computed: KV sharing)"


def skip_shared_kv_projections(model: nn.Module, bound: list[tuple[str, str]]) -> list[str]:
    """Replace the ``qkv_proj`` of every shared layer's attention module by a :class:`QOnlyProjection`;
    returns the attention layer names done (those whose projection is not an unquantized fused QKV stay)."""
    shared = {layer for layer, _ in bound}
    done = []
    for module in list(model.modules()):
        attn, proj = getattr(module, "attn", None), getattr(module, "qkv_proj", None)
        if attn is None or proj is None or getattr(attn, "layer_name", None) not in shared:
            continue
        method = type(getattr(proj, "quant_method", None)).__name__
        if method != "UnquantizedLinearMethod" or not hasattr(module, "q_size") or not hasattr(module, "kv_size"):
            continue
        module.qkv_proj = QOnlyProjection(proj, module.q_size, module.kv_size)
        done.append(attn.layer_name)
    return done


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
        self.kvsharer_config = hf_config
        logger.info("KVSharer: %d of %d layers read another layer's KV cache: %s", len(self.kvsharer_bound),
                    len(attention_layers(self)), ", ".join(f"{a} -> {b}" for a, b in self.kvsharer_bound))

    def load_weights(self, weights):
        loaded = base.load_weights(self, weights)
        if getattr(self.kvsharer_config, SKIP_KEY, True):
            done = skip_shared_kv_projections(self, self.kvsharer_bound)
            logger.info("KVSharer: %d of %d shared layers compute no K/V (Q-only projection)", len(done),
                        len(self.kvsharer_bound))
        return loaded

    cls = type(name, (base,), {"__init__": __init__, "load_weights": load_weights,
                               "__module__": __name__, "__qualname__": name,
                               "__doc__": f"vLLM's {base_arch} serving a KVSharer policy ({__name__})."})
    return cls


def __getattr__(name: str) -> type:
    """``KVSharer<Arch>``, built on first use (vLLM's registry imports it as ``module:Class``)."""
    if not name.startswith(PREFIX):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _classes:
        _classes[name] = _make(name)
    return _classes[name]
