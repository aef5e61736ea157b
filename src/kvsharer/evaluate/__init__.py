"""Evaluation: what a sharing policy costs in quality (the stages that run it are in :mod:`kvsharer.stages`).

* ``ppl``      stage ``evaluate-ppl``      perplexity on held-out text, in independent windows
* ``harness``  stages ``make-tasks`` and ``evaluate-harness``: lm-eval harness tasks (local multiple-choice
               tasks built from held-out text offline; the paper's tasks by name on a cluster)
* ``longctx``  stage ``evaluate-longctx``  passkey retrieval (needle in a haystack) over lengths x depths

* ``passages``                           make-tasks' long-context items (a passage, a question on its first half)
* ``ruler``                              evaluate-harness' offline RULER tasks (lengths, refusals, their metric)
* ``streaming``                          chunked forwards through one cache (how cache methods are seen)
* ``generate``                           greedy generation under a policy (stage ``generate``)

Every evaluation stage takes ``--policy`` (no policy: the plain model) and ``--cache`` (a cache method composed
with it, see :mod:`kvsharer.cache.compose`), and writes one JSON result atomically.
"""


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
