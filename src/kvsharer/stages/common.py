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
    if policy is not None:
        check_policy_kinds(policy, getattr(args, "model", None))
    method = CacheMethod.parse(args.cache)
    if method is not None:
        method.check_policy(policy)
    check_chunk(getattr(args, "chunk", None))
    return policy, method


def check_policy_kinds(policy, model: str | None) -> None:
    """Refuse a policy whose pairs the model's layer kinds rule out, from the model folder's ``config.json`` (or the
    shape table), before its weights load; a model known neither way is checked when the policy is attached."""
    import json
    from pathlib import Path

    from ..cache.policy import PolicyError
    from ..models.layer_kinds import layer_kinds, policy_problems
    from ..models.shapes import architecture_of

    if not model:
        return
    config = Path(model) / "config.json"
    if config.is_file():
        kinds = layer_kinds(json.loads(config.read_text()))
    elif architecture_of(model) is not None:
        kinds = architecture_of(model).kinds()
    else:
        return
    problems = policy_problems(policy.map, kinds)
    if problems:
        raise PolicyError(f"policy {policy.map} does not fit {model}: " + "; ".join(problems))
