"""The ``vllm.general_plugins`` entry point (``pyproject.toml``): vLLM calls :func:`register` in every process
it starts (the front end, the engine core, each worker) before it builds a model.

It registers ``KVSharer<Arch>`` for every architecture in :data:`kvsharer.serving.overrides.SUPPORTED` with
``ModelRegistry.register_model`` as a lazy ``"module:Class"`` string, so nothing of vLLM's model code is
imported until a model asks for it. A model is served with a policy only when its ``hf_overrides`` name
such an architecture (:func:`kvsharer.serving.overrides.serving_overrides`); every other model is untouched.
"""

from __future__ import annotations

from .overrides import PREFIX, SUPPORTED

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from vllm import ModelRegistry

    for arch in SUPPORTED:
        ModelRegistry.register_model(PREFIX + arch, f"kvsharer.serving.vllm_models:{PREFIX}{arch}")
    _registered = True
