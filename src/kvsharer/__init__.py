"""KVSharer: layer-wise dissimilar KV-cache sharing, as a library and a reproducible pipeline.

Public API::

    from kvsharer import SharingPolicy, share_kv
    policy = SharingPolicy.from_json("policy.json")
    with share_kv(model, policy):
        model.generate(...)
"""

from .policy import PolicyError, SharingPolicy, resolve_chains
from .sharing import KVSharing, attach, cache_nbytes, detach, expected_kv_nbytes, share_kv

__all__ = [
    "SharingPolicy",
    "PolicyError",
    "resolve_chains",
    "share_kv",
    "attach",
    "detach",
    "KVSharing",
    "cache_nbytes",
    "expected_kv_nbytes",
]
__version__ = "0.1.0"
