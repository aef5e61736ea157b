"""Serving a sharing policy in vLLM (optional: ``pip install 'kvsharer-pipeline[serve]'`` / ``make serve-setup``).

* ``overrides`` (torch- and vLLM-free): checks a policy against a model's config and builds the
  ``hf_overrides`` that make vLLM serve the model with it — ``LLM(model, hf_overrides=serving_overrides(...))``.
* ``vllm_plugin``: the ``vllm.general_plugins`` entry point; registers one ``KVSharer<Architecture>`` per
  supported architecture with vLLM's ``ModelRegistry`` (lazily: nothing of vLLM is imported until used).
* ``vllm_models``: those classes — vLLM's own model class, unchanged, whose layers are bound to their
  sources' KV caches right after the model is built (``Attention.kv_sharing_target_layer_name``).
* ``compare``: greedy generations (token ids and log-probs) through vLLM or through transformers +
  ``share_kv``, written to JSON, so the two can be compared across virtual environments.

Nothing else in the package imports this subpackage (vLLM lives in its own environment, ``.venv-serve``).
"""
