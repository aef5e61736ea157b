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
    base = dict(
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
    )
    config = config_cls(**{**base, **extra, **overrides})
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


def make_tokenizer(vocab_size: int = VOCAB):
    """A small byte-level BPE tokenizer trained in memory on the embedded corpus (no files, no hub)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from kvsharer.data import load_corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[: vocab_size - 3],
    )
    tok.train_from_iterator([load_corpus("embedded:pydoc")[:20000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def save_tiny_model(path, family: str = "llama", n_layers: int = 8, seed: int = 0, vocab_size: int = 300):
    """A tiny random model + tokenizer saved as a Hugging Face folder (what the CLI stages load)."""
    model = make_tiny(family, n_layers=n_layers, seed=seed, vocab_size=vocab_size)
    model.save_pretrained(path)
    make_tokenizer(vocab_size).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """An 8-layer tiny Llama folder with its tokenizer, shared by the CLI/stage tests of a session."""
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")
