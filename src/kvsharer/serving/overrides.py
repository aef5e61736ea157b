"""What vLLM needs to serve a model with a sharing policy — torch-free and vLLM-free.

``serving_overrides(config, policy)`` checks the policy against the model (same length, every pair of the
same attention kind: :mod:`kvsharer.models.layer_kinds`) and returns the ``hf_overrides`` for vLLM:

* ``architectures``: ``KVSharer<Arch>`` — registered by :mod:`kvsharer.serving.vllm_plugin`, it is vLLM's own
  ``<Arch>`` class, whose attention layers are bound to their sources' caches after the model is built;
* ``kvsharer_share_map``: the policy's map (``map[l] = s``: layer ``l`` reads layer ``s``'s K/V);
* ``kvsharer_base_architecture``: the architecture it wraps;
* ``kvsharer_skip_kv``: whether shared layers skip computing K/V (``skip_kv``; default yes).

vLLM copies these fields into the model's config (``hf_overrides``), in the engine process too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..cache.policy import PolicyError, SharingPolicy
from ..models.layer_kinds import layer_kinds, pair_problem, unsupported

PREFIX = "KVSharer"
MAP_KEY = "kvsharer_share_map"
BASE_KEY = "kvsharer_base_architecture"
SKIP_KEY = "kvsharer_skip_kv"  # False: shared layers keep computing (and discarding) their K/V

# vLLM architectures whose decoder attention is one ``Attention`` per layer (a KV cache of its own that
# ``kv_sharing_target_layer_name`` can redirect). Llama / Mistral / Qwen2 / Qwen3 are the demo's and the
# paper's families; Gemma 2/3 (sliding + full layers) are accepted with only same-kind pairs.
SUPPORTED = (
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
    "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM",
)


class ServingError(ValueError):
    """A policy that vLLM cannot serve for this model."""


def read_config(model: str | os.PathLike | dict) -> dict[str, Any]:
    """A model folder's ``config.json`` (or the dict itself)."""
    if isinstance(model, dict):
        return model
    path = Path(model) / "config.json"
    if not path.is_file():
        raise ServingError(f"{model} has no config.json: serve a prepared model folder "
                           "(python -m kvsharer prepare-model --out FOLDER)")
    return json.loads(path.read_text())


def read_policy(policy: SharingPolicy | str | os.PathLike | list[int]) -> SharingPolicy:
    if isinstance(policy, SharingPolicy):
        return policy
    if isinstance(policy, (list, tuple)):
        return SharingPolicy(list(policy))
    return SharingPolicy.from_json(policy)


def policy_problems_for(config: dict[str, Any], policy: SharingPolicy) -> list[str]:
    """Every reason vLLM cannot serve ``config``'s model with ``policy`` (empty: it can)."""
    kinds = layer_kinds(config)
    if len(kinds) != policy.n_layers:
        return [f"the policy has {policy.n_layers} layers but the model has {len(kinds)} decoder layers"]
    if policy.is_identity():
        return []
    if policy.meta.get("kv_maps"):
        return [f"it reads its sources through fitted K/V maps ({policy.meta['kv_maps']}), which this plugin does not "
                "apply: vLLM would serve plain sharing of the same layers"]
    why = unsupported(kinds)
    if why:
        return [why]
    return [problem for layer in policy.shared_layers
            for problem in [pair_problem(kinds, layer, policy.map[layer])] if problem]


def base_architecture(config: dict[str, Any]) -> str:
    archs = config.get("architectures") or []
    if len(archs) != 1:
        raise ServingError(f"the config names architectures {archs}: exactly one is needed")
    arch = archs[0]
    if arch.startswith(PREFIX):
        arch = config.get(BASE_KEY) or arch[len(PREFIX):]
    if arch not in SUPPORTED:
        raise ServingError(f"architecture {arch} is not supported for KV sharing in vLLM "
                           f"(supported: {', '.join(SUPPORTED)})")
    return arch


def serving_overrides(model: str | os.PathLike | dict,
                      policy: SharingPolicy | str | os.PathLike | list[int] | None,
                      skip_kv: bool = True) -> dict[str, Any]:
    """``hf_overrides`` for ``vllm.LLM`` / ``vllm serve --hf-overrides`` that serve ``model`` with ``policy``.

    ``None`` or an identity policy: ``{}`` (plain vLLM). Raises :class:`ServingError` naming every pair
    vLLM cannot serve (different attention kind or window) or an unsupported architecture."""
    if policy is None:
        return {}
    config = read_config(model)
    try:
        policy = read_policy(policy)
    except PolicyError as err:
        raise ServingError(str(err)) from None
    if policy.is_identity():
        return {}
    arch = base_architecture(config)
    problems = policy_problems_for(config, policy)
    if problems:
        raise ServingError("vLLM cannot serve this policy: " + "; ".join(problems))
    return {"architectures": [PREFIX + arch], MAP_KEY: list(policy.map), BASE_KEY: arch, SKIP_KEY: skip_kv}
