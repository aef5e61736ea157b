"""The cache methods by name, in one torch-free place: the CLI's ``--cache``, :mod:`kvsharer.cache.compose`,
:mod:`kvsharer.methods.intra`, preflight, the report and the workflow's rules all read this table.

A spec names one method and its number: ``<name>:<value>`` (``h2o:0.5``, ``snapkv:256``,
``minicache:0.25``) or, for quantization, ``int<bits>`` (``int4``). In result paths a spec's *label* has
``-`` for ``:`` (``h2o-0.5``). What a number means is the entry's ``value``:

* ``budget`` — tokens a token-level method keeps per storing layer: a fraction kept in (0, 1] or a whole
  number of tokens;
* ``bits`` — 2, 4 or 8;
* ``rate`` — MiniCache's fraction of layers' KV saved, in (0, 0.5].

A family is attached by one :class:`~kvsharer.cache.method.KVMethod` subclass (``FAMILY_METHOD``), which
declares how it combines with KV sharing: True — one physical cache per sharing group (the source's cache
is the method's, the sharers store nothing); False — a rival of sharing, evaluated without a policy. An
entry's ``with_sharing`` is the torch-free copy of that declaration that the planners read (the workflow's
rules, the profile); tests/test_method_registry.py checks that the two agree. At most one cache method
runs at a time.

Adding a method: one file with its class, one :class:`Entry` below (docs/adding-a-cache-method.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import import_module

QUANT_BITS = (2, 4, 8)
FAMILY_METHOD = {  # family -> "module:Class" of the KVMethod that attaches it (imported on use)
    "intra": "kvsharer.methods.intra.attach:KVCompression",
    "quant": "kvsharer.methods.quant:KVQuantization",
    "minicache": "kvsharer.methods.minicache:MiniCache",
}


@dataclass(frozen=True)
class Entry:
    """One cache method: its spec ``name``, ``family`` (intra, quant, minicache), the meaning of its
    number (``value``: budget, bits, rate), whether it composes with KV sharing (its family's class says
    so; this is the torch-free copy), and where its class is."""

    name: str
    family: str
    value: str
    with_sharing: bool
    implementation: str  # "module:Class", imported only when the method is built
    summary: str

    def load(self):
        module, _, attribute = self.implementation.partition(":")
        return getattr(import_module(module), attribute)


ENTRIES: dict[str, Entry] = {entry.name: entry for entry in (
    Entry("h2o", "intra", "budget", True, "kvsharer.methods.intra.h2o:H2O", "heavy hitters + recent window"),
    Entry("pyramidinfer", "intra", "budget", True, "kvsharer.methods.intra.pyramidinfer:PyramidInfer",
          "budgets shrinking with depth, tokens chosen by the recent queries"),
    Entry("kvmerger", "intra", "budget", True, "kvsharer.methods.intra.kvmerger:KVMerger",
          "Gaussian-kernel merging of similar adjacent keys"),
    Entry("streamingllm", "intra", "budget", True, "kvsharer.methods.intra.streaming_llm:StreamingLLM",
          "attention sinks (first 4 tokens) + recent window"),
    Entry("snapkv", "intra", "budget", True, "kvsharer.methods.intra.snapkv:SnapKV",
          "per-head votes of the last 32 queries, max-pooled over 7 tokens"),
    Entry("int", "quant", "bits", True, "kvsharer.methods.quant:KVQuantization", "KV quantization (int2, int4, int8)"),
    Entry("minicache", "minicache", "rate", False, "kvsharer.methods.minicache:MiniCache",
          "baseline: adjacent deep layers merged (a rival of sharing)"),
)}


def names(family: str | None = None) -> tuple[str, ...]:
    """Method names (of one family), in registry order: ``names("intra")`` are the token-level methods."""
    return tuple(name for name, entry in ENTRIES.items() if family is None or entry.family == family)


def known_names() -> str:
    return ("token methods: " + ", ".join(names("intra")) + "; quantization: "
            + ", ".join(f"int{b}" for b in QUANT_BITS) + "; baseline: " + ", ".join(names("minicache")))


@dataclass(frozen=True)
class CacheSpec:
    """A parsed ``--cache`` spec: ``family``, method ``name`` (``int4`` for quantization) and ``value``
    (a token budget as a fraction or a count, a number of bits, or MiniCache's rate)."""

    family: str
    name: str
    value: float | int

    @classmethod
    def parse(cls, spec: str | None) -> "CacheSpec | None":
        """``"h2o:0.5"`` -> (intra, h2o, 0.5); ``"int4"`` -> (quant, int4, 4); ``"none"``/``None``/``""`` -> None."""
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
        key = name.replace("-", "").replace("_", "")
        entry = ENTRIES.get(key)
        if entry is None or entry.value == "bits":
            raise ValueError(f"cache spec {spec!r}: unknown method {name!r} ({known_names()})")
        if entry.value == "rate":
            if not 0 < value <= 0.5:
                raise ValueError(f"cache spec {spec!r}: MiniCache's rate (fraction of layers saved) must be in (0, 0.5]")
            return cls(entry.family, key, float(value))
        if value <= 0 or (value > 1 and not float(value).is_integer()):
            raise ValueError(f"cache spec {spec!r}: a budget is a fraction kept in (0, 1] or a whole number of tokens")
        return cls(entry.family, key, float(value) if value <= 1 else int(value))

    @classmethod
    def from_label(cls, label: str) -> "CacheSpec | None":
        """The inverse of :attr:`label` (file names use ``-`` where specs use ``:``)."""
        return cls.parse(spec_of_label(label))

    @property
    def entry(self) -> Entry:
        return ENTRIES["int" if self.family == "quant" else self.name]

    @property
    def with_sharing(self) -> bool:
        return self.entry.with_sharing

    @property
    def spec(self) -> str:
        return self.name if self.family == "quant" else f"{self.name}:{self.value:g}"

    @property
    def label(self) -> str:
        return label(self.spec)


def label(spec) -> str:
    """A spec as it appears in paths: ``h2o:0.5`` -> ``h2o-0.5``, ``int4`` -> ``int4``."""
    return str(spec).replace(":", "-")


def spec_of_label(text: str) -> str:
    """The inverse of :func:`label`: ``h2o-0.5`` -> ``h2o:0.5``, ``int4`` -> ``int4``."""
    return text if text.startswith("int") else text.replace("-", ":", 1)


def family_of(spec) -> str | None:
    """``"h2o:0.5"`` -> ``"intra"``; ``None`` for no method."""
    parsed = CacheSpec.parse(spec)
    return None if parsed is None else parsed.family


def is_token_method(spec) -> bool:
    return family_of(spec) == "intra"


def _number(text: str, spec) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"cache spec {spec!r}: {text!r} is not a number") from None
