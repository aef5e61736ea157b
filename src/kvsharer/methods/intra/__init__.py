"""Token-level KV-cache compression that really shrinks the cache, composable with KV sharing.

One small class per method (kvpress style), attached by one cache method (``KVCompression``) — no forked
modeling file::

    from kvsharer import SharingPolicy, share_kv
    from kvsharer.methods.intra import compress_kv, make_method

    with compress_kv(model, make_method("h2o", 0.5)):             # keep 50 % of the tokens per layer
        model.generate(**batch, max_new_tokens=64)

    policy = SharingPolicy.from_json("policy.json")
    with share_kv(model, policy), compress_kv(model, make_method("h2o", 0.5)):   # both
        model.generate(**batch, max_new_tokens=64)
    # same thing: with compress_kv(model, make_method("h2o", 0.5), policy=policy): ...

Methods (``METHODS``, the token-level entries of :mod:`kvsharer.method_registry`): ``h2o`` (heavy
hitters + recent window), ``pyramidinfer`` (budgets shrinking with depth, tokens chosen by the most
recent queries' attention), ``kvmerger`` (Gaussian-kernel merging of similar adjacent keys),
``streamingllm`` (attention sinks + recent window), ``snapkv`` (per-head votes of an observation window,
pooled). A budget is a fraction kept (float in (0, 1]) or a number of tokens (int).
With KV sharing, a source layer and its sharers form one physical cache: it is scored by the attention
of every layer of the group and keeps one set of tokens; shared layers store nothing.

Modules: ``base`` (budget, method base, keep helpers), ``cache`` (``CompressedLayer``), ``attention``
(the scoring attention function, registered as ``"kvsharer_intra"``), ``blockwise`` (its fp32 kernel
over blocks of queries and the scores it hands to the methods), ``attach`` (``KVCompression``: the cache
method that attaches them, ``compress_kv``), one file per method.
"""

from __future__ import annotations

from ...method_registry import ENTRIES, names
from .attach import KVCompression, compress_kv, stored_tokens
from .attention import ATTENTION_NAME
from .base import Budget, TokenMethod
from .cache import CompressedLayer
from .h2o import H2O
from .kvmerger import KVMerger
from .pyramidinfer import PyramidInfer
from .snapkv import SnapKV
from .streaming_llm import StreamingLLM

METHODS: dict[str, type[TokenMethod]] = {name: ENTRIES[name].load() for name in names("intra")}


def make_method(name: str, budget=0.5, **options) -> TokenMethod:
    """A method from the registry: ``make_method("h2o", 0.5)``, ``make_method("kvmerger", 128, threshold=0.8)``."""
    key = str(name).lower().replace("-", "").replace("_", "")
    if key not in METHODS:
        raise ValueError(f"unknown token-level method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[key](budget, **options)


__all__ = [
    "ATTENTION_NAME", "Budget", "CompressedLayer", "H2O", "KVCompression", "KVMerger", "METHODS", "PyramidInfer",
    "SnapKV", "StreamingLLM", "TokenMethod", "compress_kv", "make_method", "stored_tokens",
]
