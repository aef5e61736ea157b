"""KVSharer: layer-wise dissimilar KV-cache sharing, as a library and a reproducible pipeline.

Public API::

    from kvsharer import SharingPolicy, share_kv
    policy = SharingPolicy.from_json("policy.json")
    with share_kv(model, policy):
        model.generate(...)

Names are imported lazily, so stages that only read result files (tables, figures) never import torch.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "SharingPolicy": "cache.policy",
    "PolicyError": "cache.policy",
    "resolve_chains": "cache.policy",
    "share_kv": "cache.sharing",
    "attach": "cache.sharing",
    "detach": "cache.sharing",
    "KVSharing": "cache.sharing",
    "cache_nbytes": "cache.sharing",
    "expected_kv_nbytes": "cache.sharing",
    "quantize_kv": "methods.quant",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'kvsharer' has no attribute {name!r}")
