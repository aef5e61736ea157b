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
    "SharingPolicy": "policy",
    "PolicyError": "policy",
    "resolve_chains": "policy",
    "share_kv": "sharing",
    "attach": "sharing",
    "detach": "sharing",
    "KVSharing": "sharing",
    "cache_nbytes": "sharing",
    "expected_kv_nbytes": "sharing",
    "quantize_kv": "quant",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'kvsharer' has no attribute {name!r}")
