"""Greedy generation under a sharing policy, and the KV-cache bytes it held (stage ``generate``,
:mod:`kvsharer.stages.generate`)."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from ..cache.policy import SharingPolicy
from ..cache.sharing import cache_nbytes, share_kv


def generate(model, tokenizer, prompts: list[str], policy: SharingPolicy, max_new_tokens: int, chat: bool = False):
    """Greedy generation with ``policy``; returns (texts, kv bytes held by the cache at the end)."""
    if chat:
        prompts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
    if policy.meta.get("kv_maps") and len(prompts) > 1:
        raise ValueError("a policy with fitted K/V maps generates one prompt at a time: its maps take the cache index "
                         "as the position, which left padding of a batch would shift (kvsharer.cache.kv_maps)")
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=not chat).to(model.device)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode(), share_kv(model, policy):
        out = model.generate(
            **batch, past_key_values=cache, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return texts, cache_nbytes(cache), cache.get_seq_length()
