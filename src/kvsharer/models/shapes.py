"""Architectures of real models, torch-free: what preflight checks offline and what random models are built of.

``ARCHITECTURES`` maps a hub id to its ``Shape``: layers, heads, KV heads, head size, hidden and
intermediate size, window (``max_position_embeddings``), RoPE, vocabulary, fused or separate QKV,
parameter count, the Python packages its remote code needs and whether the hub gates it (an HF token with
granted access is needed). The numbers are those of the models' published ``config.json`` files; the
parameter counts are the checkpoints' (tests recompute them from the shape). Preflight reads this table,
so every model of ``config/paper.yaml`` is checked without the hub, without weights and without torch.

``load_model("random:llama-2-7b", dtype="float16", device="cuda")`` builds a Llama-2-7B-shaped model
with random weights directly on the device (no download, no hub): KV bytes, peak memory, prefill latency
and decode throughput are those of the real model, its text is noise. ``benchmarks/gpu_profile.sh`` uses
it to profile real shapes on a lent GPU; ``random:tiny-llama`` is the CPU-sized smoke shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field

RANDOM_PREFIX = "random:"


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    max_positions: int  # the window: max_position_embeddings
    family: str = "llama"  # transformers model_type
    rope_theta: float = 10000.0
    rope_scaling: str | None = None  # e.g. "llama3 x8 from 8192", "dynamic x2"; None: plain RoPE
    head_dim: int | None = None  # None: hidden // heads
    fused_qkv: bool = False  # Q, K and V from one projection (needs a FusedQKVAdapter in kvsharer.models.fused_qkv)
    qkv_bias: bool = False
    tied_embeddings: bool = False
    params: int | None = None  # parameters of the checkpoint (None: not a published checkpoint)
    architecture: str = "LlamaForCausalLM"  # config.json "architectures"[0]
    remote_code: bool = False  # modeling code from the hub repo (trust_remote_code), not transformers'
    packages: tuple[str, ...] = field(default=())  # Python packages its remote code / tokenizer import
    gated: bool = False  # the hub serves it only with an HF token whose user was granted access
    qk_norm: bool = False  # RMSNorm on each query and key head (Qwen3, Gemma 3): 2 x head_dim weights a layer
    norms: int = 2  # RMSNorms around attention and MLP per layer (Gemma 2/3: 4)
    layer_types: tuple[str, ...] | None = None  # config.json "layer_types" (None: every layer full attention)
    sliding_window: int | None = None  # tokens a sliding layer attends over

    def kinds(self):
        """Each layer's attention kind (kvsharer.models.layer_kinds), from the shape alone."""
        from .layer_kinds import layer_kinds

        return layer_kinds({"num_hidden_layers": self.layers, "sliding_window": self.sliding_window,
                            "layer_types": list(self.layer_types) if self.layer_types else None})

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def as_tuple(self) -> tuple[int, int, int, int, int, int]:
        """(layers, hidden, intermediate, heads, kv heads, vocab): the search-scaling projection's form."""
        return self.layers, self.hidden, self.intermediate, self.heads, self.kv_heads, self.vocab

    def param_count(self) -> int:
        """Parameters from the shape: embeddings (+ LM head unless tied), per layer Q/K/V/O (+ QKV biases, + Q/K
        norms), gated MLP and its RMSNorm weights, and the final norm."""
        q, kv = self.heads * self.head_size, self.kv_heads * self.head_size
        attention = self.hidden * (q + 2 * kv) + q * self.hidden + ((q + 2 * kv) if self.qkv_bias else 0)
        attention += 2 * self.head_size if self.qk_norm else 0
        layer = attention + 3 * self.hidden * self.intermediate + self.norms * self.hidden
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * layer + embeddings + self.hidden

    def weight_bytes(self, dtype_bytes: int) -> int:
        return (self.params or self.param_count()) * dtype_bytes

    def kv_bytes(self, batch: int, tokens: int, dtype_bytes: int) -> int:
        """K/V of every layer (no sharing) for ``batch`` sequences of ``tokens`` tokens; a sliding-window layer
        holds at most its window (layers without K/V: nothing)."""
        held = sum(min(tokens, k.window) if k.kind in ("sliding", "chunked") and k.window else tokens
                   for k in self.kinds() if k.has_kv)
        return 2 * held * batch * self.kv_heads * self.head_size * dtype_bytes


_LLAMA2 = dict(vocab=32000, max_positions=4096, gated=True)
_INTERNLM2 = dict(vocab=92544, max_positions=32768, family="internlm2", rope_theta=1000000.0, fused_qkv=True,
                  architecture="InternLM2ForCausalLM", remote_code=True, packages=("einops", "sentencepiece"))

# hub id -> shape, from the models' published config.json files
ARCHITECTURES: dict[str, Shape] = {
    "meta-llama/Llama-2-7b-chat-hf": Shape(32, 4096, 11008, 32, 32, **_LLAMA2, params=6_738_415_616),
    "meta-llama/Llama-2-13b-chat-hf": Shape(40, 5120, 13824, 40, 40, **_LLAMA2, params=13_015_864_320),
    "meta-llama/Llama-2-70b-chat-hf": Shape(80, 8192, 28672, 64, 8, **_LLAMA2, params=68_976_648_192),
    "internlm/internlm2-chat-7b": Shape(32, 4096, 14336, 32, 8, **_INTERNLM2, rope_scaling="dynamic x2",
                                        params=7_737_708_544),
    # (its dynamic-NTK factor is not recorded here; no check reads rope_scaling)
    "internlm/internlm2-chat-20b": Shape(48, 6144, 16384, 48, 8, **_INTERNLM2, rope_scaling="dynamic",
                                         params=19_861_149_696),
    "meta-llama/Llama-3.1-8B-Instruct": Shape(32, 4096, 14336, 32, 8, 128256, 131072, rope_theta=500000.0,
                                              rope_scaling="llama3 x8 from 8192", params=8_030_261_248, gated=True),
    "meta-llama/Llama-3.1-405B-Instruct": Shape(126, 16384, 53248, 128, 8, 128256, 131072, rope_theta=500000.0,
                                                rope_scaling="llama3 x8 from 8192", params=405_853_388_800,
                                                gated=True),
    "mistralai/Mistral-7B-Instruct-v0.3": Shape(32, 4096, 14336, 32, 8, 32768, 32768, family="mistral",
                                                rope_theta=1000000.0, params=7_248_023_552,
                                                architecture="MistralForCausalLM", gated=True),
    "Qwen/Qwen2.5-7B-Instruct": Shape(28, 3584, 18944, 28, 4, 152064, 32768, family="qwen2", rope_theta=1000000.0,
                                      qkv_bias=True, params=7_615_616_512, architecture="Qwen2ForCausalLM"),
    # current models beyond the paper's layout (a researcher adds them through the config):
    # Gemma 3: 5 sliding-window (1,024-token) layers to 1 global; sharing pairs within each kind. The checkpoint
    # is multimodal (Gemma3ForConditionalGeneration: its count includes a vision tower), so no count is stored
    "google/gemma-3-12b-it": Shape(48, 3840, 15360, 16, 8, 262208, 131072, family="gemma3_text",
                                   rope_theta=1000000.0, rope_scaling="linear x8", head_dim=256, qk_norm=True,
                                   norms=4, tied_embeddings=True, architecture="Gemma3ForConditionalGeneration",
                                   gated=True, sliding_window=1024,
                                   layer_types=(("sliding_attention",) * 5 + ("full_attention",)) * 8),
    "Qwen/Qwen3-8B": Shape(36, 4096, 12288, 32, 8, 151936, 40960, family="qwen3", rope_theta=1000000.0, head_dim=128,
                           qk_norm=True, params=8_190_735_360, architecture="Qwen3ForCausalLM"),
    # Phi-4: Q, K and V from one fused qkv_proj ([q | k | v] rows), transformers' own Phi3 code
    "microsoft/phi-4": Shape(40, 5120, 17920, 40, 10, 100352, 16384, family="phi3", rope_theta=250000.0,
                             fused_qkv=True, params=14_659_507_200, architecture="Phi3ForCausalLM"),
    # the embedded demo model (embedded:smollm2-135m-instruct, a GGUF of this checkpoint)
    "HuggingFaceTB/SmolLM2-135M-Instruct": Shape(30, 576, 1536, 9, 3, 49152, 8192, rope_theta=100000.0,
                                                 tied_embeddings=True, params=134_515_008),
}
# embedded:<name> -> the hub id of the checkpoint it ships (kvsharer.models.loading.EMBEDDED_MODELS)
EMBEDDED = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}

# random:<name> shapes: the published models above by short name, and a CPU smoke size
SHAPES: dict[str, Shape] = {
    "llama-2-7b": ARCHITECTURES["meta-llama/Llama-2-7b-chat-hf"],
    "llama-2-13b": ARCHITECTURES["meta-llama/Llama-2-13b-chat-hf"],
    "llama-2-70b": ARCHITECTURES["meta-llama/Llama-2-70b-chat-hf"],
    "llama-3.1-8b": ARCHITECTURES["meta-llama/Llama-3.1-8B-Instruct"],
    "llama-3.1-405b": ARCHITECTURES["meta-llama/Llama-3.1-405B-Instruct"],
    "mistral-7b": ARCHITECTURES["mistralai/Mistral-7B-Instruct-v0.3"],
    "qwen2.5-7b": ARCHITECTURES["Qwen/Qwen2.5-7B-Instruct"],
    "tiny-llama": Shape(8, 256, 512, 4, 2, 1024, 2048),  # CPU smoke size
}


def architecture_of(source: str) -> Shape | None:
    """The shape of a hub id (or ``random:<name>``, ``standin:<hub id>``, ``embedded:<name>``) from the table; None for anything else."""
    if source.startswith(RANDOM_PREFIX):
        return SHAPES.get(source[len(RANDOM_PREFIX):])
    if source.startswith("standin:"):  # a hub model's architecture at CPU width (kvsharer.models.standins)
        from .standins import standin_shape

        try:
            return standin_shape(source)
        except ValueError:
            return None
    if source.startswith("embedded:"):
        return ARCHITECTURES.get(EMBEDDED.get(source[len("embedded:"):], ""))
    return ARCHITECTURES.get(source)


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


def shape_from_config(data: dict) -> Shape | None:
    """A ``Shape`` from a model's ``config.json`` content (a local folder's, or a cached hub one); None when
    it lacks the sizes. Its parameter count is the shape's (``param_count``), not a checkpoint's."""
    text = data.get("text_config") or data
    try:
        heads = int(text["num_attention_heads"])
        hidden = int(text["hidden_size"])
        return Shape(
            layers=int(text["num_hidden_layers"]), hidden=hidden,
            intermediate=int(text.get("intermediate_size") or 4 * hidden), heads=heads,
            kv_heads=int(text.get("num_key_value_heads") or heads), vocab=int(text["vocab_size"]),
            max_positions=int(text.get("max_position_embeddings") or 0), family=str(data.get("model_type", "")),
            rope_theta=float(text.get("rope_theta") or 10000.0), head_dim=text.get("head_dim"),
            tied_embeddings=bool(data.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            architecture=(data.get("architectures") or [""])[0], remote_code=bool(data.get("auto_map")),
            layer_types=tuple(text["layer_types"]) if text.get("layer_types") else None,
            sliding_window=text.get("sliding_window") if text.get("use_sliding_window", True) else None,
        )
    except (KeyError, TypeError, ValueError):
        return None
