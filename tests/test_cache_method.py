"""Every cache method gives the recorded logits, cache contents and bytes, bit for bit
(``tests/data/cache_method_reference.json``, written by ``tests/make_cache_method_reference.py``)."""

from __future__ import annotations

import functools
import json

import pytest

import make_cache_method_reference as ref


@functools.lru_cache(maxsize=1)
def reference() -> dict:
    return json.loads(ref.REFERENCE.read_text())


@functools.lru_cache(maxsize=1)
def tiny(name: str):
    return ref.model(name)


def test_the_reference_covers_every_case():
    assert sorted(reference()) == sorted(ref.case_key(*case) for case in ref.cases())


@functools.lru_cache(maxsize=None)
def plain_matches(name: str) -> bool:
    """The plain model gives the recorded numbers here (else this CPU's float kernels sum in another order)."""
    return ref.record(tiny(name), "none", False) == reference()[ref.case_key(name, "none", False)]


@pytest.mark.parametrize("name, spec, share", ref.cases(), ids=[ref.case_key(*case) for case in ref.cases()])
def test_a_setting_gives_the_recorded_outputs_bit_for_bit(name, spec, share):
    if not plain_matches(name):
        pytest.skip(f"{name}: the plain model's logits differ from the reference's on this machine's CPU "
                    "(its float kernels sum in another order); regenerate it here to compare")
    assert ref.record(tiny(name), spec, share) == reference()[ref.case_key(name, spec, share)]
