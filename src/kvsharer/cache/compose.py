"""A sharing policy composed with one cache method: one spec string, one context manager.

Every evaluation stage takes ``--policy`` (KV sharing, or none) and ``--cache SPEC`` (a method that
changes what the cache stores, or none). The names and the spec syntax live in
:mod:`kvsharer.method_registry` (torch-free), which names each family's
:class:`~kvsharer.cache.method.KVMethod` class; the class declares whether it composes with sharing. Specs:

=====================================  ==============================================  =======================
spec                                   what                                            with sharing
=====================================  ==============================================  =======================
``none``                               nothing                                         -
``h2o:0.5`` ``pyramidinfer:0.5``       token-level eviction/merging                    yes: one physical cache
``kvmerger:0.5`` ``h2o:256``           (:mod:`kvsharer.methods.intra`; a fraction      per group
``streamingllm:0.5`` ``snapkv:0.5``    or a number of tokens)
``int8`` ``int4`` ``int2``             KV quantization (:mod:`kvsharer.methods.quant`, yes: sources quantized
                                       groups of 32 channels, 32 recent tokens exact)
``minicache:0.25``                     MiniCache baseline: adjacent deep layers        no (a rival, not an
                                       merged (:mod:`kvsharer.methods.minicache`)      add-on)
=====================================  ==============================================  =======================

In result paths and tables a setting is ``<policy>+<label>``, the label being the spec with ``:``
replaced by ``-`` (``plain+h2o-0.5``, ``r0.25_dissimilar_euclidean_T0.5_s0+int4``).

Why evaluations stream when a cache method is on: all these methods act on the cache *between*
forwards (evict after the prefill, quantize the tokens already seen, merge layers' stored K/V). A
one-pass forward over a whole window never reads a cache, so it would score the plain model. With a
cache method, PPL therefore feeds each window in chunks of ``chunk`` tokens through one cache: every
token is predicted from the compressed cache of all earlier chunks plus the exact K/V of its own chunk
(``chunk=1`` is token-by-token decoding). lm-eval scores only a continuation: its context goes through
as one prefill, which the method then compresses, and the scored tokens follow in chunks. Without a
cache method, chunking changes nothing (sharing reads the source's K/V inside the forward), which the
tests check.
"""

from __future__ import annotations

import contextlib
from importlib import import_module
from typing import Iterator

from ..method_registry import FAMILY_METHOD, QUANT_BITS, CacheSpec, known_names  # noqa: F401 (re-exported)


class CacheMethod(CacheSpec):
    """A parsed ``--cache`` spec (:class:`~kvsharer.method_registry.CacheSpec`) that builds its cache method."""

    def method_class(self) -> type:
        """The :class:`~kvsharer.cache.method.KVMethod` subclass of this spec's family (imported on use)."""
        module, _, name = FAMILY_METHOD[self.family].partition(":")
        return getattr(import_module(module), name)

    def build(self, model):
        """This method for ``model``, not attached yet (a context manager: ``with method.build(model): ...``)."""
        return self.method_class().from_spec(model, self)

    def check_policy(self, policy) -> None:
        """Refuse, before any model loads, a policy that shares layers next to a method that does not
        compose with KV sharing (:func:`kvsharer.cache.method.check_combination` decides)."""
        if policy is None or not policy.num_shared:
            return
        if policy.meta.get("kv_maps"):  # the maps un-rotate keys by cache index: a method that drops or merges tokens breaks it
            raise ValueError(f"{self.spec}: a policy with fitted K/V maps ({policy.meta['kv_maps']}) composes with no "
                             "cache method yet; run it without --cache")
        from .method import CombinationError, check_combination
        from .sharing import KVSharing

        try:
            check_combination([KVSharing], self.method_class())
        except CombinationError as err:
            raise ValueError(f"{self.spec}: {err}; run it without --policy") from None


@contextlib.contextmanager
def apply_setting(model, policy, method: CacheMethod | None) -> Iterator[None]:
    """``with apply_setting(model, policy, method): ...`` — sharing (if any) and the cache method (if any)."""
    from .method import attach_all
    from .sharing import share_kv

    if method is not None:
        method.check_policy(policy)
    shares = policy is not None and (method is None or method.method_class().with_sharing)
    with attach_all(share_kv(model, policy) if shares else None, method.build(model) if method is not None else None):
        yield


def split_setting(setting: str) -> tuple[str, CacheMethod | None]:
    """``"plain+h2o-0.5"`` -> ("plain", CacheMethod(intra, h2o, 0.5)); ``"plain"`` -> ("plain", None)."""
    base, _, label = setting.partition("+")
    return base, CacheMethod.from_label(label) if label else None
