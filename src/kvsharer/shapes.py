"""Random-initialised models of real shapes: what memory and speed cost does not depend on the weights.

``load_model("random:llama-2-7b", dtype="float16", device="cuda")`` builds a Llama-2-7B-shaped model
with random weights directly on the device (no download, no hub): KV bytes, peak memory, prefill latency
and decode throughput are those of the real model, its text is noise. ``benchmarks/gpu_profile.sh`` uses
it to profile real shapes on a lent GPU; ``random:tiny-llama`` is the CPU-sized smoke shape.
"""

from __future__ import annotations

from dataclasses import dataclass

RANDOM_PREFIX = "random:"


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    max_positions: int
    family: str = "llama"
    rope_theta: float = 10000.0

    def as_tuple(self) -> tuple[int, int, int, int, int, int]:
        """(layers, hidden, intermediate, heads, kv heads, vocab): the search-scaling projection's form."""
        return self.layers, self.hidden, self.intermediate, self.heads, self.kv_heads, self.vocab


# From the models' published config.json files.
SHAPES = {
    "llama-2-7b": Shape(32, 4096, 11008, 32, 32, 32000, 4096),
    "llama-2-13b": Shape(40, 5120, 13824, 40, 40, 32000, 4096),
    "llama-2-70b": Shape(80, 8192, 28672, 64, 8, 32000, 4096),
    "llama-3.1-8b": Shape(32, 4096, 14336, 32, 8, 128256, 131072, rope_theta=500000.0),
    "llama-3.1-405b": Shape(126, 16384, 53248, 128, 8, 128256, 131072, rope_theta=500000.0),
    "mistral-7b": Shape(32, 4096, 14336, 32, 8, 32768, 32768, family="mistral", rope_theta=1000000.0),
    "qwen2.5-7b": Shape(28, 3584, 18944, 28, 4, 152064, 32768, family="qwen2", rope_theta=1000000.0),
    "tiny-llama": Shape(8, 256, 512, 4, 2, 1024, 2048),  # CPU smoke size
}


def shape_of(source: str) -> Shape:
    name = source[len(RANDOM_PREFIX):] if source.startswith(RANDOM_PREFIX) else source
    if name not in SHAPES:
        raise ValueError(f"unknown random model shape {name!r}; known: {', '.join(RANDOM_PREFIX + n for n in SHAPES)}")
    return SHAPES[name]


def random_model(source: str, dtype, attn_implementation: str = "sdpa", device: str | None = None):
    """A random-initialised causal LM of ``source``'s shape, built directly on ``device``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = shape_of(source)
    config = AutoConfig.for_model(
        shape.family, vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.max_positions, rope_theta=shape.rope_theta, pad_token_id=0,
    )
    with torch.device(device or "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    return model.eval()
