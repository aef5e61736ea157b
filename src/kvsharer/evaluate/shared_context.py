"""Score every continuation of a context from one prefill of that context.

A multiple-choice item asks lm-eval for ``log p(continuation | context)`` of each of its choices: four
requests with one context. lm-eval runs each as its own forward over context + continuation (it reuses a
forward only when every continuation is one token). :func:`score_continuations` prefills the context once
into a ``DynamicCache`` — the forward that a cache method (token eviction, quantization, MiniCache) then
compresses, as after a real prompt — and scores each continuation from a copy of that cache, feeding only
the context's last token and the continuation (``[1 + k]`` tokens, in chunks of ``chunk``). Continuations
whose inputs are equal (one-token answers: all of them) share one forward.

Without a cache method the log-likelihoods equal one forward over context + continuation (up to float
summation order); with one, every scored token is predicted from the compressed context, which is what
kvpress measures. A copy shares the model, its modules and the attached methods (``keep``); only the
cache's own layers and tensors are copied.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache

from .streaming import takes_logits_to_keep


def shared_objects(model, methods: Sequence = ()) -> dict[int, object]:
    """``deepcopy`` memo that copies none of ``model``'s modules, parameters and buffers nor ``methods``
    (cache layers may reference them)."""
    keep = [*model.modules(), *model.parameters(), *model.buffers(), *methods]
    return {id(obj): obj for obj in keep}


@torch.inference_mode()
def score_continuations(model, context: Sequence[int], continuations: Sequence[Sequence[int]], keep: dict,
                        chunk: int | None = None) -> list[tuple[float, bool]]:
    """``(log-likelihood, greedy)`` of each continuation (token ids, at least one) after ``context`` (at
    least one token), as lm-eval's ``_loglikelihood_tokens`` returns them. ``keep``: :func:`shared_objects`.
    ``chunk``: continuation tokens per forward (None: all at once)."""
    cache = DynamicCache(config=model.config)
    if len(context) > 1:  # context[:-1] once: the prefill a cache method compresses
        kwargs = {"logits_to_keep": 1} if takes_logits_to_keep(model) else {}
        model(input_ids=torch.tensor([list(context[:-1])], device=model.device), past_key_values=cache,
              use_cache=True, **kwargs)
    inputs: dict[tuple, list[int]] = {}  # the forward's input (last context token + continuation[:-1]) -> requests
    for i, continuation in enumerate(continuations):
        inputs.setdefault((context[-1], *continuation[:-1]), []).append(i)
    results: list[tuple[float, bool] | None] = [None] * len(continuations)
    for n, (tokens, requests) in enumerate(inputs.items()):
        own = cache if n == len(inputs) - 1 else copy.deepcopy(cache, memo=dict(keep))  # the last one may consume it
        ids = torch.tensor([tokens], device=model.device)  # [1, 1 + k - 1]
        step = chunk or ids.shape[1]
        logits = torch.cat([model(input_ids=ids[:, s : s + step], past_key_values=own, use_cache=True).logits
                            for s in range(0, ids.shape[1], step)], dim=1)[0]  # [k, V]
        logprobs = F.log_softmax(logits, dim=-1, dtype=torch.float32)
        greedy = logprobs.argmax(-1)  # [k]
        for i in requests:
            target = torch.tensor(continuations[i], device=logprobs.device)  # [k]
            results[i] = (float(logprobs.gather(-1, target[:, None]).sum()), bool((greedy == target).all()))
    return results
