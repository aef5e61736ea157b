"""A sharing policy composed with one cache method: one spec string, one context manager.

Every evaluation stage takes ``--policy`` (KV sharing, or none) and ``--cache SPEC`` (a method that
changes what the cache stores, or none). Specs:

==================================  ===========================================  ======================
spec                                what                                         with sharing
==================================  ===========================================  ======================
``none``                            nothing                                      -
``h2o:0.5`` ``pyramidinfer:0.5``    token-level eviction/merging                 yes: one physical cache
``kvmerger:0.5`` ``h2o:256``        (:mod:`kvsharer.intra`; fraction or tokens)  per group
``int8`` ``int4`` ``int2``          KV quantization (:mod:`kvsharer.quant`,      yes: sources quantized
                                    groups of 32 channels, 32 recent tokens exact)
``minicache:0.25``                  MiniCache baseline: adjacent deep layers     no (a rival, not an
                                    merged (:mod:`kvsharer.minicache`)           add-on)
==================================  ===========================================  ======================

In result paths and tables a setting is ``<policy>+<label>``, the label being the spec with ``:``
replaced by ``-`` (``plain+h2o-0.5``, ``r0.25_dissimilar_euclidean_T0.5_s0+int4``).

Why evaluations stream when a cache method is on: all these methods act on the cache *between*
forwards (evict after the prefill, quantize the tokens already seen, merge layers' stored K/V). A
one-pass forward over a whole window never reads a cache, so it would score the plain model. With a
cache method, PPL and lm-eval therefore feed each sequence in chunks of ``chunk`` tokens through one
cache: every token is predicted from the compressed cache of all earlier chunks plus the exact K/V of
its own chunk (``chunk=1`` is token-by-token decoding). Without a cache method, chunking changes
nothing (sharing reads the source's K/V inside the forward), which the tests check.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Iterator

FAMILIES = ("intra", "quant", "minicache")
QUANT_BITS = (2, 4, 8)


@dataclass(frozen=True)
class CacheMethod:
    """A parsed ``--cache`` spec: ``family`` (intra, quant, minicache), method ``name`` and its ``value``
    (a token budget as a fraction or a count, a number of bits, or MiniCache's rate)."""

    family: str
    name: str
    value: float | int

    # parsing -----------------------------------------------------------------------------------
    @classmethod
    def parse(cls, spec: str | None) -> "CacheMethod | None":
        """``"h2o:0.5"`` -> CacheMethod("intra", "h2o", 0.5); ``"none"``/``None``/``""`` -> None."""
        if spec is None or str(spec).strip().lower() in ("", "none"):
            return None
        text = str(spec).strip().lower()
        quant = re.fullmatch(r"int(\d+)", text)
        if quant:
            bits = int(quant.group(1))
            if bits not in QUANT_BITS:
                raise ValueError(f"cache spec {spec!r}: KV quantization supports {', '.join(f'int{b}' for b in QUANT_BITS)}")
            return cls("quant", text, bits)
        name, sep, arg = text.partition(":")
        if not sep or not arg:
            raise ValueError(f"cache spec {spec!r}: expected none, int8/int4/int2, <method>:<budget> or minicache:<rate> "
                             f"({known_names()})")
        value = _number(arg, spec)
        if name == "minicache":
            if not 0 < value <= 0.5:
                raise ValueError(f"cache spec {spec!r}: MiniCache's rate (fraction of layers saved) must be in (0, 0.5]")
            return cls("minicache", name, float(value))
        from .intra import METHODS

        key = name.replace("-", "").replace("_", "")
        if key not in METHODS:
            raise ValueError(f"cache spec {spec!r}: unknown method {name!r} ({known_names()})")
        if value <= 0 or (value > 1 and not float(value).is_integer()):
            raise ValueError(f"cache spec {spec!r}: a budget is a fraction kept in (0, 1] or a whole number of tokens")
        return cls("intra", key, float(value) if value <= 1 else int(value))

    @classmethod
    def from_label(cls, label: str) -> "CacheMethod | None":
        """The inverse of :attr:`label` (file names use ``-`` where specs use ``:``)."""
        return cls.parse(label.replace("-", ":", 1) if not label.startswith("int") else label)

    @property
    def spec(self) -> str:
        return self.name if self.family == "quant" else f"{self.name}:{self.value:g}"

    @property
    def label(self) -> str:
        return self.spec.replace(":", "-")

    # checks -------------------------------------------------------------------------------------
    def check_policy(self, policy) -> None:
        """MiniCache is a rival of sharing (both remove layers' KV), not something to stack on it."""
        if self.family == "minicache" and policy is not None and policy.num_shared:
            raise ValueError("MiniCache is a baseline compared with KV sharing at equal KV bytes; "
                             "run it without --policy")

    # attaching ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def attach(self, model) -> Iterator[object]:
        """Attach this method to ``model`` for the duration (after any sharing policy)."""
        if self.family == "intra":
            from .intra import compress_kv, make_method

            with compress_kv(model, make_method(self.name, self.value)) as handle:
                yield handle
        elif self.family == "quant":
            from .quant import quantize_kv

            with quantize_kv(model, int(self.value), group_size=quant_group_size(model)) as handle:
                yield handle
        else:
            from .minicache import minicache

            with minicache(model, float(self.value)) as handle:
                yield handle


def quant_group_size(model) -> int:
    """Channels per quantization group: 32, or the whole head when its size is not a multiple of 32."""
    from .models import kv_shape

    head_dim = kv_shape(model)[2]
    return 32 if head_dim % 32 == 0 else head_dim


def _number(text: str, spec) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"cache spec {spec!r}: {text!r} is not a number") from None


def known_names() -> str:
    from .intra import METHODS

    return "token methods: " + ", ".join(METHODS) + "; quantization: " + ", ".join(f"int{b}" for b in QUANT_BITS) + \
        "; baseline: minicache"


@contextlib.contextmanager
def apply_setting(model, policy, method: CacheMethod | None) -> Iterator[None]:
    """``with apply_setting(model, policy, method): ...`` — sharing (if any) and the cache method (if any)."""
    from .sharing import share_kv

    if method is not None:
        method.check_policy(policy)
    with contextlib.ExitStack() as stack:
        if policy is not None and not (method is not None and method.family == "minicache"):
            stack.enter_context(share_kv(model, policy))
        if method is not None:
            stack.enter_context(method.attach(model))
        yield


def split_setting(setting: str) -> tuple[str, CacheMethod | None]:
    """``"plain+h2o-0.5"`` -> ("plain", CacheMethod(intra, h2o, 0.5)); ``"plain"`` -> ("plain", None)."""
    base, _, label = setting.partition("+")
    return base, CacheMethod.from_label(label) if label else None
