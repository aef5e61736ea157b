"""Evaluation stages: what a sharing policy costs in quality.

* ``ppl``      stage ``evaluate-ppl``      perplexity on held-out text, in independent windows
* ``harness``  stages ``make-tasks`` and ``evaluate-harness``: lm-eval harness tasks (local multiple-choice
               tasks built from held-out text offline; the paper's tasks by name on a cluster)
* ``longctx``  stage ``evaluate-longctx``  passkey retrieval (needle in a haystack) over lengths x depths

Every stage takes ``--policy`` (no policy: the plain model) and writes one JSON result atomically.
"""
