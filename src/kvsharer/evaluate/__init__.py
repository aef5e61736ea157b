"""Evaluation stages: what a sharing policy costs in quality.

* ``ppl``      stage ``evaluate-ppl``      perplexity on held-out text, in independent windows
* ``harness``  stages ``make-tasks`` and ``evaluate-harness``: lm-eval harness tasks (local multiple-choice
               tasks built from held-out text offline; the paper's tasks by name on a cluster)
* ``longctx``  stage ``evaluate-longctx``  passkey retrieval (needle in a haystack) over lengths x depths

* ``passages``                           make-tasks' long-context items (a passage, a question on its first half)
* ``ruler``                              evaluate-harness' offline RULER tasks (lengths, refusals, their metric)
* ``streaming``                          chunked forwards through one cache (how cache methods are seen)

Every stage takes ``--policy`` (no policy: the plain model) and ``--cache`` (a cache method composed with
it, see :mod:`kvsharer.cache.compose`), and writes one JSON result atomically.
"""

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
    from .streaming import check_chunk

    policy = SharingPolicy.from_json(args.policy) if args.policy else None
    method = CacheMethod.parse(args.cache)
    if method is not None:
        method.check_policy(policy)
    check_chunk(getattr(args, "chunk", None))
    return policy, method


def result_header(stage: str, model: str, policy_path: str | None, policy, method=None, chunk=None) -> dict:
    """The fields every evaluation result starts with: what ran, on which model, under which policy and
    cache method (``cache``: its spec or None; ``chunk``: tokens per forward when it streamed)."""
    from ..models.loading import model_id

    source, weights = model_id(model)
    return {
        "stage": stage, "model": model, "model_source": source, "weights_sha256": weights,
        "policy": policy_path, "map": policy.map, "rate": policy.rate, "num_shared": policy.num_shared,
        "shared_layers": policy.shared_layers,
        "cache": method.spec if method is not None else None,
        "cache_family": method.family if method is not None else None,
        "chunk": chunk if method is not None else None,
    }
