"""Evaluation stages: what a sharing policy costs in quality.

* ``ppl``      stage ``evaluate-ppl``      perplexity on held-out text, in independent windows
* ``harness``  stages ``make-tasks`` and ``evaluate-harness``: lm-eval harness tasks (local multiple-choice
               tasks built from held-out text offline; the paper's tasks by name on a cluster)
* ``longctx``  stage ``evaluate-longctx``  passkey retrieval (needle in a haystack) over lengths x depths

Every stage takes ``--policy`` (no policy: the plain model) and writes one JSON result atomically.
"""


def result_header(stage: str, model: str, policy_path: str | None, policy) -> dict:
    """The fields every evaluation result starts with: what ran, on which model, under which policy."""
    from ..models import model_id

    source, weights = model_id(model)
    return {
        "stage": stage, "model": model, "model_source": source, "weights_sha256": weights,
        "policy": policy_path, "map": policy.map, "rate": policy.rate, "num_shared": policy.num_shared,
        "shared_layers": policy.shared_layers,
    }
