"""Stand-ins of the paper's models for a rehearsal on CPU: ``standin:<hub id>``.

A stand-in is a random-initialised model of the hub model's own architecture, from the table of
``kvsharer.models.shapes.ARCHITECTURES``: the same transformers class (Llama, Mistral, Qwen2), number of layers,
attention heads and KV heads (so the same GQA grouping), window (``max_position_embeddings``), RoPE base
and scaling, vocabulary size, QKV biases and embedding tying. Only the width is shrunk, so that every
stage runs on a CPU: each head is ``HEAD_DIM`` wide instead of 128, ``hidden = heads x HEAD_DIM``, and the
MLP keeps the real model's intermediate/hidden ratio. Llama-2-7B (32 x 4096, 32 heads) becomes 32 layers
x 256, 32 heads of 8; Qwen2.5-7B (28 layers, 28 heads, 4 KV heads) 28 x 224 with 4 KV heads.

Its tokenizer is a byte-level BPE trained on the embedded ``pydoc`` corpus (offline, deterministic) with
``TOKENIZER_VOCAB`` entries at most: every id it emits is a valid id of the model's (larger) vocabulary.

InternLM2 (fused ``wqkv``, remote code) has no modeling code offline: its stand-in is built with
transformers' Llama code at InternLM2's numbers (layers, heads, KV heads, window, RoPE base, vocabulary)
and so has separate ``k_proj``/``v_proj``. The fused-QKV adapter is not rehearsed by it (it is tested on a
stand-in of InternLM2's layout in tests/test_internlm2_adapter.py).
"""

from __future__ import annotations

import functools
from dataclasses import replace

from .shapes import ARCHITECTURES, Shape

STANDIN_PREFIX = "standin:"
HEAD_DIM = 8  # width of every attention head of a stand-in (even: RoPE rotates pairs)
TOKENIZER_VOCAB = 4096  # byte-level BPE entries at most (the model's vocabulary keeps its real size)
TOKENIZER_CORPUS = "embedded:pydoc"
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]  # bos, eos, pad: ids 0, 1, 2

# transformers model_type of the stand-in: the real one where transformers ships the code
BUILT_AS = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "internlm2": "llama", "qwen3": "qwen3",
            "gemma3_text": "gemma3_text", "phi3": "phi3"}
CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
           "qwen3": "Qwen3ForCausalLM", "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM"}
# Shape.rope_scaling (as the table writes it) -> transformers' rope parameters
ROPE_SCALING = {
    "llama3 x8 from 8192": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192},
    "dynamic x2": {"rope_type": "dynamic", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},  # InternLM2-20B: factor not in the table (see shapes.py)
    "linear x8": {"rope_type": "linear", "factor": 8.0},
}


def parse_standin(source: str) -> tuple[str, int]:
    """``standin:<hub id>[:<head width>]`` -> (hub id, head width; default ``HEAD_DIM``). A head width of
    128 gives the real model's hidden and intermediate sizes (a full-width stand-in, for a GPU)."""
    rest = source[len(STANDIN_PREFIX):] if source.startswith(STANDIN_PREFIX) else source
    hub_id, _, width = rest.rpartition(":")
    if not width.isdigit():
        hub_id, width = rest, str(HEAD_DIM)
    if int(width) < 2 or int(width) % 2:
        raise ValueError(f"stand-in head width must be even and at least 2 (RoPE rotates pairs), got {width}")
    return hub_id_of(hub_id), int(width)


def hub_id_of(source: str) -> str:
    hub_id = source[len(STANDIN_PREFIX):] if source.startswith(STANDIN_PREFIX) else source
    if hub_id not in ARCHITECTURES:
        raise ValueError(f"no stand-in for {hub_id!r}: not in kvsharer.models.shapes.ARCHITECTURES (known: "
                         f"{', '.join(ARCHITECTURES)})")
    return hub_id


def standin_shape(source: str) -> Shape:
    """The real shape of ``standin:<hub id>[:<head width>]`` with heads that wide (default ``HEAD_DIM``; no
    checkpoint: ``params`` None)."""
    hub_id, head_dim = parse_standin(source)
    real = ARCHITECTURES[hub_id]
    hidden = real.heads * head_dim
    # the MLP's width keeps the real intermediate/hidden ratio (Llama-2-7B: 11008/4096 -> 688 for 256)
    intermediate = max(head_dim, round(real.intermediate * hidden / real.hidden / head_dim) * head_dim)
    built_as = BUILT_AS.get(real.family)
    if built_as is None:
        raise ValueError(f"no stand-in for {hub_id}: transformers model_type {real.family!r} has no "
                         f"stand-in class (known: {', '.join(BUILT_AS)})")
    # InternLM2 is built with Llama's code (separate k/v); Phi-3/4's own class keeps its fused qkv_proj
    return replace(real, hidden=hidden, intermediate=intermediate, head_dim=head_dim, params=None,
                   family=built_as, fused_qkv=real.fused_qkv and not real.remote_code, remote_code=False,
                   packages=(), gated=False, architecture=CLASSES[built_as])


def transformers_config(shape: Shape):
    """A transformers config of ``shape`` (its model_type, sizes, window, RoPE, biases, tying)."""
    from transformers import AutoConfig

    extra = {}
    if shape.rope_scaling is not None:
        extra["rope_scaling"] = ROPE_SCALING[shape.rope_scaling]
    if shape.family == "gemma3_text":  # RoPE per layer type: the global layers' base and scaling, local 10k plain
        extra = {"rope_parameters": {
            "full_attention": {**extra.get("rope_scaling", {"rope_type": "default"}), "rope_theta": shape.rope_theta},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}}
    if shape.family == "llama" and shape.qkv_bias:
        extra["attention_bias"] = True
    if shape.layer_types is not None:  # Gemma 3: its sliding and global layers, the window at its real size
        extra.update(layer_types=list(shape.layer_types))
    if shape.family in ("mistral", "qwen2", "qwen3", "gemma3_text", "phi3"):  # the real window (None: none; a
        extra["sliding_window"] = shape.sliding_window  # config class's default, Mistral's 4096, would add one)
    return AutoConfig.for_model(
        shape.family, vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_size, max_position_embeddings=shape.max_positions, rope_theta=shape.rope_theta,
        tie_word_embeddings=shape.tied_embeddings, bos_token_id=0, eos_token_id=1, pad_token_id=2, **extra,
    )


def standin_model(source: str, dtype, attn_implementation: str = "sdpa", device: str | None = None, seed: int = 0):
    """``(model, tokenizer)`` of ``standin:<hub id>``: random weights (seeded), the BPE tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    config = transformers_config(standin_shape(source))
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    return model.eval(), standin_tokenizer_of(source)


def standin_tokenizer_of(source: str):
    """The tokenizer of ``standin:<hub id>``: the BPE, at most as large as the model's vocabulary."""
    return standin_tokenizer(min(TOKENIZER_VOCAB, transformers_config(standin_shape(source)).vocab_size))


@functools.lru_cache(maxsize=4)
def standin_tokenizer(vocab: int):
    """A byte-level BPE of at most ``vocab`` entries trained on ``TOKENIZER_CORPUS`` (any text encodes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ..data import load_corpus

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(load_corpus(TOKENIZER_CORPUS).splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   model_max_length=1 << 30)
