"""Tiny random-initialised decoder models built from configs in memory (no hub, no files)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": 4096}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),
}
VOCAB = 96


def make_tiny(family: str = "llama", n_layers: int = 8, attn: str = "sdpa", seed: int = 0, **overrides):
    config_cls, model_cls, extra = FAMILIES[family]
    config = config_cls(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **{**extra, **overrides},
    )
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    # random init is near-uniform; scale up so that layers really differ and greedy text is non-trivial
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(2.5)
    return model


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, VOCAB, (2, 12), generator=g)
