"""Arguments shared by the evaluation stages: ``--policy`` and ``--cache`` (and ``--chunk``), parsed the
same way everywhere."""

from __future__ import annotations

import argparse


def add_setting_arguments(parser: argparse.ArgumentParser, chunked: bool = True) -> None:
    """``--policy`` and ``--cache`` (and ``--chunk`` for the scoring stages), the same in every stage."""
    parser.add_argument("--policy", help="policy JSON file (default: no sharing)")
    from ..method_registry import known_names

    parser.add_argument("--cache", default="none",
                        help=f"cache method composed with the policy: none, <method>:<budget>, int<bits> or "
                             f"minicache:<rate> ({known_names()}; see kvsharer.method_registry)")
    if chunked:
        parser.add_argument("--chunk", type=int, default=32,
                            help="with a cache method: tokens per forward through one cache (default 32)")


def parse_setting(args: argparse.Namespace):
    """``(policy or None, cache method or None)`` from the arguments, validated before any model loads."""
    from ..cache.compose import CacheMethod
    from ..cache.policy import SharingPolicy
    from ..evaluate.streaming import check_chunk

    policy = SharingPolicy.from_json(args.policy) if args.policy else None
    method = CacheMethod.parse(args.cache)
    if method is not None:
        method.check_policy(policy)
    check_chunk(getattr(args, "chunk", None))
    return policy, method
