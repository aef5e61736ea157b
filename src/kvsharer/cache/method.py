"""The shape of every cache method: one base class, ``KVMethod``, and one rule for which methods combine.

A cache method changes what a model's KV cache stores (KV sharing, a token method's eviction, quantization,
MiniCache's merged layer pairs). A subclass says two things:

* **its cache layers** — ``build_layer(i, layers)``: the cache layer of decoder layer ``i``, given what is
  there already: the methods that wire before it (KV sharing, whose sharers hold a ``SharedLayer``) and
  its own layers ``0 … i-1``. It returns ``layers[i]`` to leave a layer as it is;
* **how it combines with KV sharing** — the class attributes ``shares`` (it *is* KV sharing) and
  ``with_sharing`` (True: it composes with sharing, one physical cache per sharing group; False: a rival
  of sharing, never attached with it). ``check_combination`` is the one place that refuses a combination,
  from those declarations alone.

Optionally ``on_attach``/``on_detach`` (what it changes on the model besides the cache: KV sharing's
skipped projections, a token method's attention function) and ``end_forward`` (after every decoder
forward). Everything else — the decoder hooks, creating a cache when the forward gets none, wiring a cache
once, detaching exactly — is the same for every method (:mod:`kvsharer.cache.hooks`,
:mod:`kvsharer.cache.assembly`). A method is a context manager: ``with SomeMethod(model, ...): ...``.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

from torch import nn

from ..models.loading import ModelParts, find_parts
from .assembly import source_of
from .hooks import attach_method, attached_methods, detach_method


class CombinationError(RuntimeError):
    """Cache methods that cannot be attached to one model together."""


class KVMethod:
    """A cache method attached to one model (see the module docstring for what a subclass says)."""

    title = "a cache method"  # how messages name it ("the model already has <title> attached")
    shares = False  # True for KV sharing itself
    with_sharing = True  # composes with KV sharing (False: a rival of sharing)
    always_wires = False  # also wires a cache the forward asked not to keep (use_cache=False)
    replaces_layers = False  # gives every layer that stores K/V a cache layer of its own class (``own_layer``)

    def __init__(self, model: nn.Module):
        self.model = model
        self.parts: ModelParts = find_parts(model)
        if self.replaces_layers:
            hybrid = [i for i, kind in enumerate(self.parts.kinds) if kind.has_kv and kind.recurrent]
            if hybrid:
                raise CombinationError(
                    f"{self.title} replaces the cache layer of every layer that stores K/V, but layer {hybrid[0]} "
                    f"of {type(model).__name__} keeps a recurrent (Mamba / linear-attention) state in the same cache "
                    "layer: it would be lost. KV sharing alone works on this model")

    def own_layer(self, i: int, layers: Sequence) -> bool:
        """Whether layer ``i`` gets a cache layer of this method: it stores K/V itself (not a sharer, not a
        Mamba / linear-attention or MLP-only layer, whose cache objects stay as they are)."""
        return self.parts.kinds[i].has_kv and source_of(layers, i) == i

    @classmethod
    def from_spec(cls, model: nn.Module, spec) -> "KVMethod":
        """The method a parsed ``--cache`` spec names (``spec.name``, ``spec.value``), for ``model``."""
        raise NotImplementedError(f"{cls.__name__} is not built from a --cache spec")

    # what a subclass says -------------------------------------------------------------------------
    def build_layer(self, i: int, layers: Sequence) -> object:
        """The cache layer of decoder layer ``i`` (``layers``: the cache's layers as they are now)."""
        raise NotImplementedError

    def on_attach(self) -> None:
        """Change the model besides its cache (undone by ``on_detach``)."""

    def on_detach(self) -> None:
        """Undo ``on_attach`` exactly."""

    def end_forward(self, cache, output, kwargs: dict) -> None:
        """After every decoder forward: its cache (None without one), its output (None when it failed) and
        the keyword arguments it was called with."""

    @property
    def wiring(self) -> object:
        """What a cache wired for this method remembers of it: a cache is wired once, for one set of methods."""
        return self

    # the one attach/detach path ---------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        return any(method is self for method in attached_methods(self.model))

    def attach(self) -> "KVMethod":
        if self.attached:
            raise RuntimeError(f"this {type(self).__name__} is already attached")
        check_combination(attached_methods(self.model), self)
        attach_method(self)
        return self

    def detach(self) -> None:
        if self.attached:
            detach_method(self)

    def __enter__(self) -> "KVMethod":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()


def check_combination(attached: Sequence[KVMethod | type[KVMethod]], new: KVMethod | type[KVMethod]) -> None:
    """Refuse ``new`` next to the methods ``attached`` (instances or classes) unless the classes allow it:
    one method of a kind, at most one cache method besides KV sharing, and KV sharing only with methods that
    declare ``with_sharing``."""
    kind = new if isinstance(new, type) else type(new)
    for old in attached:
        old_kind = old if isinstance(old, type) else type(old)
        if old_kind is kind:
            raise CombinationError(f"the model already has {kind.title} attached; detach it first")
        if not (old_kind.shares or kind.shares):
            raise CombinationError(f"the model has {old_kind.title} attached; {kind.title} cannot be combined with it "
                                   "(one cache method at a time)")
        rival = next((k for k in (old_kind, kind) if not k.with_sharing), None)
        if rival is not None:
            raise CombinationError(f"{rival.title} is a rival of KV sharing, not an add-on: it does not run with a "
                                   "KV-sharing policy attached")


@contextlib.contextmanager
def attach_all(*methods: KVMethod | None) -> Iterator[None]:
    """``with attach_all(a, b): ...`` — the methods (None: left out) attached in order, detached in reverse."""
    with contextlib.ExitStack() as stack:
        for method in methods:
            if method is not None:
                stack.enter_context(method)
        yield
