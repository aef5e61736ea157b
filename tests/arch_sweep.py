"""The architecture sweep: KV sharing tried on every causal LM transformers ships (GitHub issue 32, item 7).

For each ``model_type`` of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` :func:`sweep_one` builds a tiny random
model from its config class (4-ish decoder layers, hidden 64, vocab 128, sliding windows of 16 tokens so a
48-token prompt is longer than the window), pairs later attention layers with earlier ones *of the same
attention type*, and compares three runs with ``share_kv`` attached — uncached, cached prefill, and
token-by-token decode — against an independent reference: the plain model (no kvsharer) whose attention
function, registered in transformers' ``AttentionInterface``, records the K/V every layer's attention
receives and hands a sharing layer its source's recorded K/V instead of its own (under its own mask, with
the model's own eager attention function). Attention written by hand, outside that interface, gets a
fallback reference: hooks that hand a sharer its source's ``k_proj``/``v_proj`` outputs
(``PROJECTION_REFERENCE``), or a plain ``DynamicCache`` whose ``update`` returns the source's K/V
(``CACHE_REFERENCE``, fused-QKV models); both are checked against the interface one on Llama
(tests/test_architecture_sweep.py). The outcome is one of:

* ``shares``        — all three modes equal the reference within ``tolerance`` (see there);
* ``refused``       — ``UnsupportedArchitecture``/``PolicyError`` when sharing is attached (the message is kept);
* ``crash``         — any other exception (or a refusal that only comes in the forward, not at attach);
* ``wrong``         — runs, but differs from the reference (max abs diff per mode);
* ``not runnable``  — the plain model does not build or run here, or disagrees with itself cached vs uncached;
* ``no reference``  — the reference does not work for this model (its attention does not dispatch through
  the attention interface, the reference with no sharing does not reproduce the model, or the substitution
  changes nothing).

The tolerance is absolute, 1e-4 of the logit scale: 1e-4 × max(1, max |reference logit|).

``.venv/bin/python tests/arch_sweep.py [model_type ...]`` prints the status table (markdown).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import sys
import time
import traceback
from dataclasses import dataclass, field

import torch
import transformers
from transformers import AttentionInterface, AttentionMaskInterface, DynamicCache, PreTrainedConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import eager_mask
from transformers.models.auto import modeling_auto

from kvsharer import PolicyError, SharingPolicy, share_kv
from kvsharer.models.loading import UnsupportedArchitecture

MAPPING = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
MODEL_TYPES = sorted(MAPPING)

VOCAB, PROMPT, PREFILL, BATCH = 128, 48, 40, 2  # decode: prefill 40 tokens, then 8 one at a time
WINDOW = 16  # sliding window / attention chunk: shorter than the prompt, so windows really cut
N_LAYERS = 4
SCALE = 2.5  # weights (dim > 1) scaled up after the random init, as tests/conftest.py does, so layers differ
REFERENCE = "kv_substitute"  # the name the reference attention function is registered under

# Small sizes, applied to every config (and sub-config) that has the field (directly or through its
# ``attribute_map``). Per-layer lists are resized separately (:func:`_resize_layer_lists`).
SMALL = {
    "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256, "rotary_dim": 8, "is_decoder": True,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 1,
    # every name a sliding window / attention chunk goes by
    "sliding_window": WINDOW, "sliding_window_size": WINDOW, "attention_chunk_size": WINDOW,
    "attention_window_size": WINDOW, "window_size": WINDOW,
    # Gemma3n / Gemma4 per-layer inputs
    "vocab_size_per_layer_input": VOCAB, "hidden_size_per_layer_input": 8,
    # encoder-decoder configs whose decoder is the causal LM (Bart, Whisper …)
    "d_model": 64, "decoder_attention_heads": 4, "encoder_attention_heads": 4, "decoder_ffn_dim": 128,
    "encoder_ffn_dim": 128,
    # mixture of experts
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "n_shared_experts": 1, "n_group": 1,
    "topk_group": 1,
    # multi-head latent attention (its head_dim is the rope part: not set, see _shrink)
    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    # Mamba / linear-attention blocks of hybrids (chunk 8 divides both 40 and 48)
    "mamba_d_state": 8, "mamba_n_heads": 8, "mamba_d_head": 16, "mamba_chunk_size": 8,
    "linear_num_heads": 4, "linear_head_dim": 16, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    "linear_key_head_dim": 16, "linear_value_head_dim": 16,
}
LAYER_COUNTS = ("num_hidden_layers", "decoder_layers", "encoder_layers", "num_layers")

# Per model type: config arguments on top of SMALL (what the generic sizes get wrong); a dict value patches
# the sub-config of that name.
PATCHES: dict[str, dict] = {
    # layer patterns: at least two attention layers of a kind in few layers
    "bamba": {"attn_layer_indices": [1, 3]},  # default: no attention layer at all
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"] * 2},  # default: all Mamba
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1},  # attention at 1 and 3 (default: 1 in 8)
    "lfm2": {"layer_types": ["conv", "full_attention"] * 2},  # default: all full attention
    "lfm2_moe": {"layer_types": ["conv", "full_attention"] * 2},  # default: none
    "nemotron_h": {"layers_block_type": ["linear_attention", "full_attention"] * 2},  # default: 1 attention in 4
    "zamba": {"layers_block_type": ["mamba", "hybrid"] * 2, "attn_layer_period": 2, "attn_layer_offset": 1},
    "gpt_neo": {"attention_types": [[["global", "local"], 2]], "num_layers": 4},
    "gemma3n_text": {"num_kv_shared_layers": 0},  # its own cross-layer KV sharing: off (15 layers by default)
    # sizes the config validates against each other
    "mamba2": {"num_heads": 8, "head_dim": 16},  # hidden × expand = heads × head_dim
    "falcon_h1": {"mamba_d_ssm": 128},  # = mamba_n_heads × mamba_d_head
    "xlnet": {"d_head": 16},  # = d_model / n_head
    "zaya": {"num_experts_per_tok": 1},  # the only value it supports
    "dbrx": {"attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0}},  # DbrxConfig sets them on its default only
    "blt": {"encoder_hash_byte_group_vocab": 256, "encoder_config": {"hidden_size_global": 64},
            "decoder_config": {"hidden_size_global": 64}},  # default hash vocabulary: 500k rows
    "qwen4_exp_text": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 16,
                       "indexer_compress_ratio": 4},  # its indexed layers need an indexer
}
PATCHES["qwen4_exp"] = PATCHES["qwen4_exp_text"]  # the same model class (Qwen4ExpForCausalLM)

# Layer kinds with no K/V cache of their own to share (recurrent / state-space / convolution / MLP-only blocks).
NOT_ATTENTION = {"cross_attention", "linear_attention", "mamba", "mamba2", "conv", "recurrent", "mlp", "moe", "rwkv",
                 "ssm", "m", "-"}


# ------------------------------------------------------------------------------------------------
# Tiny configs
# ------------------------------------------------------------------------------------------------


def _get(config, name):
    """``config.<name>``, or None (also for a per-layer attribute of a heterogeneous config, which raises)."""
    try:
        return getattr(config, name, None)
    except Exception:
        return None


def _fields(cls) -> set[str]:
    """The config's real (dataclass) fields."""
    return {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()


def _mixed_layer_types(default: list[str], n_layers: int) -> list[str]:
    """The config's own distinct layer types, in order of first appearance, repeated: every type gets at
    least two layers (e.g. Gemma3 [sliding, full, sliding, full]), at least ``n_layers`` layers in all."""
    distinct = list(dict.fromkeys(default))
    length = max(n_layers, 2 * len(distinct))
    return [distinct[i % len(distinct)] for i in range(length)]


def _resize_layer_lists(default: PreTrainedConfig, kwargs: dict, n_layers: int) -> int:
    """Resize the config's per-layer list fields in ``kwargs`` in place; returns the layer count they give."""
    fields = _fields(type(default))
    old_n = _get(default, "num_hidden_layers")
    if "layer_types" in fields and isinstance(_get(default, "layer_types"), list) and "layer_types" not in kwargs:
        kwargs["layer_types"] = _mixed_layer_types(default.layer_types, n_layers)
    n = len(kwargs["layer_types"]) if "layer_types" in kwargs else n_layers
    for name in fields:
        value = _get(default, name)
        if name in kwargs or not isinstance(value, list) or len(value) != old_n:
            continue
        kwargs[name] = [value[i % len(value)] for i in range(n)]  # e.g. mlp_layer_types: truncated/cycled
    return n


def config_class(model_type: str):
    return getattr(transformers, MAPPING[model_type]).config_class


def tiny_config(model_type: str, n_layers: int = N_LAYERS) -> PreTrainedConfig:
    """The model class's config class with small sizes (sub-configs too: text, vision, audio …)."""
    return _shrink(config_class(model_type), n_layers, PATCHES.get(model_type, {}))


def _shrink(config_cls, n_layers: int, patch: dict) -> PreTrainedConfig:
    fields = _fields(config_cls)
    names = fields | set(getattr(config_cls, "attribute_map", {}))
    kwargs = {k: v for k, v in SMALL.items() if k in names}
    if "qk_rope_head_dim" in names:  # multi-head latent attention: as many K/V heads as query heads
        kwargs.pop("head_dim", None)
        kwargs["num_key_value_heads"] = SMALL["num_attention_heads"]
    own = {k: v for k, v in patch.items() if not isinstance(v, dict)}
    for per_layer in ("layer_types", "layers_block_type"):
        if per_layer in own:
            own.setdefault("num_hidden_layers", len(own[per_layer]))
    kwargs.update(own)
    subs = {k: v for k, v in patch.items() if isinstance(v, dict)}  # sub-config patches, as dicts
    try:  # the config's defaults for what is not set here (per-layer lists of its default depth, sub-configs)
        default = config_cls(**kwargs, **subs)
    except Exception:
        default = config_cls(**own, **subs)
    for name in fields:  # sub-configs (text_config, vision_config, …): shrunk the same way
        sub = _get(default, name)
        if isinstance(sub, PreTrainedConfig):
            kwargs[name] = _shrink(type(sub), n_layers, patch.get(name, {}))
    if "num_hidden_layers" in names:
        n_layers = _resize_layer_lists(default, kwargs, n_layers)
    for name in LAYER_COUNTS:
        if name in names and name not in own:
            kwargs[name] = n_layers
    return config_cls(**kwargs)


def build_model(model_type: str, n_layers: int = N_LAYERS, seed: int = 0):
    """Tiny eager fp32 model with random weights (scaled up by SCALE), in eval mode."""
    config = tiny_config(model_type, n_layers)
    model_cls = getattr(transformers, MAPPING[model_type])
    torch.manual_seed(seed)
    model = model_cls._from_config(config, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(SCALE)
    if hasattr(model, "set_default_language"):  # X-MOD: adapters per language
        model.set_default_language("en_XX")
    return model


def decoder_config(model) -> PreTrainedConfig:
    return model.config.get_text_config(decoder=True)


# ------------------------------------------------------------------------------------------------
# Which layers share with which
# ------------------------------------------------------------------------------------------------


def layer_kinds(config: PreTrainedConfig) -> list[str | None]:
    """The attention kind of every decoder layer, from the config alone (None: no K/V cache to share).

    Sliding kinds carry their window (``sliding_attention:16``) so only equal windows pair."""
    n = _get(config, "num_hidden_layers") or 0
    window = next((getattr(config, name) for name in ("sliding_window", "sliding_window_size", "window_size")
                   if isinstance(_get(config, name), int)), None)
    if isinstance(getattr(config, "layer_types", None), list):
        raw = list(config.layer_types)
    elif isinstance(getattr(config, "layers_block_type", None), list):  # Zamba, Nemotron-H
        raw = list(config.layers_block_type)
    elif isinstance(getattr(config, "block_types", None), (list, tuple)):  # RecurrentGemma
        raw = [config.block_types[i % len(config.block_types)] for i in range(n)]
    elif getattr(config, "attn_layer_period", None):  # Jamba
        raw = ["attention" if i % config.attn_layer_period == config.attn_layer_offset else "mamba" for i in range(n)]
    elif getattr(config, "attn_layer_indices", None) is not None:  # Bamba
        raw = ["attention" if i in config.attn_layer_indices else "mamba" for i in range(n)]
    elif isinstance(getattr(config, "attention_layers", None), list):  # GPT-Neo: global / local
        raw = list(config.attention_layers)
    elif window and getattr(config, "use_sliding_window", True):
        raw = ["sliding_attention"] * n
    else:
        raw = ["full_attention"] * n
    cross = set(_get(config, "cross_attention_layers") or [])  # Mllama: attention over the image, not the text
    raw = ["cross_attention" if i in cross else kind for i, kind in enumerate(raw)]
    kinds = []
    for kind in raw[:n]:
        if kind in NOT_ATTENTION:
            kinds.append(None)
        elif "sliding" in kind or kind == "local":
            kinds.append(f"{kind}:{window}")
        else:
            kinds.append(kind)
    return kinds


def choose_pairs(kinds: list[str | None]) -> dict[int, int]:
    """{sharing layer: source}: per attention kind, the last half of its layers read the first half."""
    pairs = {}
    for kind in dict.fromkeys(k for k in kinds if k is not None):
        layers = [i for i, k in enumerate(kinds) if k == kind]
        half = len(layers) // 2
        for i in range(half):
            pairs[layers[len(layers) - half + i]] = layers[i]
    return pairs


# ------------------------------------------------------------------------------------------------
# The three modes, and the independent reference
# ------------------------------------------------------------------------------------------------


def prompt_ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (BATCH, PROMPT), generator=torch.Generator().manual_seed(seed))  # [2, 48]


CACHE_OUTPUTS = ("past_key_values", "cache_params", "mems")  # where a model's output carries its cache


def run_modes(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """{mode: logits}: ``uncached`` and ``cached`` [B, 48, V]; ``decode`` [B, 8, V] (the last 8 positions,
    fed one at a time after a 40-token cached prefill)."""
    takes_position = "cache_position" in inspect.signature(model.forward).parameters
    with torch.no_grad():
        out = {"uncached": model(ids, use_cache=False).logits, "cached": model(ids, use_cache=True).logits}
        step = model(ids[:, :PREFILL], use_cache=True)
        steps = []
        for t in range(PREFILL, PROMPT):
            name = next((n for n in CACHE_OUTPUTS if getattr(step, n, None) is not None), None)
            if name is None:
                raise RuntimeError(f"{type(step).__name__} carries no cache ({', '.join(CACHE_OUTPUTS)})")
            extra = {"cache_position": torch.tensor([t])} if takes_position else {}
            step = model(ids[:, t : t + 1], use_cache=True, **{name: getattr(step, name)}, **extra)
            steps.append(step.logits[:, -1:])  # [B, 1, V]
        out["decode"] = torch.cat(steps, dim=1)  # [B, 8, V]
    return {mode: logits.float() for mode, logits in out.items()}


def _own_eager_attention(module):
    """The eager attention function of the module's own modeling file (softcapping, sinks … included)."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    return fn if fn is not None else sdpa_attention_forward


class Substitution:
    """The reference attention: records what each layer's attention receives, substitutes a sharer's K/V.

    ``share_map[l]`` is the layer whose recorded K/V layer ``l`` attends over (itself: its own). A layer
    that calls attention more than once per forward (DiffLlama: one call per value half) gets its source's
    K/V of the same call."""

    def __init__(self):
        self.share_map: list[int] = []
        self.recorded: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # (layer, call) -> K, V
        self.calls: list[int] = []  # layer of every call, in order

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        idx = module.layer_idx
        nth = self.calls.count(idx)
        self.calls.append(idx)
        src = self.share_map[idx]
        if src == idx:
            self.recorded[(idx, nth)] = (key, value)  # [B, kv_heads, T, head_dim] as attention receives them
        else:
            key, value = self.recorded[(src, nth)]
        return _own_eager_attention(module)(module, query, key, value, attention_mask, **kwargs)


SUBSTITUTION = Substitution()
AttentionInterface.register(REFERENCE, SUBSTITUTION)
AttentionMaskInterface.register(REFERENCE, eager_mask)  # the masks eager attention gets


def reference_logits(model, ids: torch.Tensor, share_map: list[int]) -> tuple[torch.Tensor, list[int]]:
    """Logits [B, 48, V] of the plain model (uncached) with the substitution; and the layers whose attention ran.

    The model's modules get shallow copies of their configs naming the reference function; the originals
    are put back (the model under test is untouched)."""
    swaps, copies = [], {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if not isinstance(config, PreTrainedConfig):
            continue
        if id(config) not in copies:
            twin = copy.copy(config)
            twin._attn_implementation_internal = REFERENCE
            copies[id(config)] = twin
        swaps.append((module, config))
        module.config = copies[id(config)]
    SUBSTITUTION.share_map, SUBSTITUTION.recorded, SUBSTITUTION.calls = list(share_map), {}, []
    try:
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits.float()
        return logits, sorted(set(SUBSTITUTION.calls))
    finally:
        for module, config in swaps:
            module.config = config
        SUBSTITUTION.recorded = {}


def projection_reference_logits(model, ids: torch.Tensor, share_map: list[int]) -> torch.Tensor:
    """Fallback reference for attention written by hand (no attention interface): forward hooks make a
    sharing layer's ``k_proj``/``v_proj`` return its source's outputs [B, T, kv_dim]. Equal to sharing the
    cached K/V only where nothing per-layer happens between projection and cache (no k-norm; RoPE or absolute
    positions are the same in every layer): used for the models listed in ``PROJECTION_REFERENCE``."""
    attentions = {}  # layer -> its first attention module with k/v projections (self-attention, not cross)
    for m in model.modules():
        if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "k_proj") and hasattr(m, "v_proj"):
            attentions.setdefault(m.layer_idx, m)
    recorded: dict[tuple[int, str], torch.Tensor] = {}
    handles = []

    def hook(idx, name):
        def fn(module, args, output):
            src = share_map[idx]
            if src == idx:
                recorded[(idx, name)] = output
                return output
            return recorded[(src, name)]
        return fn

    for idx, attn in attentions.items():
        for name in ("k_proj", "v_proj"):
            handles.append(getattr(attn, name).register_forward_hook(hook(idx, name)))
    try:
        with torch.no_grad():
            return model(ids, use_cache=False).logits.float()
    finally:
        for handle in handles:
            handle.remove()


# Hand-written attention (no attention interface) whose K/V are their k_proj/v_proj outputs up to a
# layer-independent position encoding: checked against projection_reference_logits.
PROJECTION_REFERENCE = {"gptj", "mvp", "trocr", "xglm"}


class SubstitutingCache(DynamicCache):
    """A plain ``DynamicCache`` whose ``update`` hands a sharing layer its source's K/V [B, kv_heads, T, d].

    The sharer still stores its own K/V (so its mask sizes are its own); only what attention gets changes."""

    def __init__(self, share_map: list[int], **kwargs):
        super().__init__(**kwargs)
        self.share_map = share_map

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        src = self.share_map[layer_idx]
        if src == layer_idx:
            return keys, values
        return self.layers[src].keys, self.layers[src].values


def cache_reference_logits(model, ids: torch.Tensor, share_map: list[int]) -> torch.Tensor:
    """Fallback reference for fused-QKV attention written by hand (neither the attention interface nor
    k/v projections to hook): the plain model's cached prefill [B, 48, V] with a :class:`SubstitutingCache`.
    It substitutes where kvsharer does (the cache), so it checks the rest: skipped projections, masks, the
    three modes; used for the models in ``CACHE_REFERENCE`` (full attention only)."""
    with torch.no_grad():
        cache = SubstitutingCache(list(share_map), config=model.config)
        return model(ids, past_key_values=cache, use_cache=True).logits.float()


CACHE_REFERENCE = {"bloom", "falcon", "mpt"}


def reference_for(model_type: str, model, ids: torch.Tensor, share_map: list[int]) -> tuple[torch.Tensor, list[int]]:
    """The model type's reference logits [B, 48, V], and the layers whose attention it saw."""
    if model_type in PROJECTION_REFERENCE:
        return projection_reference_logits(model, ids, share_map), list(range(len(share_map)))
    if model_type in CACHE_REFERENCE:
        return cache_reference_logits(model, ids, share_map), list(range(len(share_map)))
    return reference_logits(model, ids, share_map)


# ------------------------------------------------------------------------------------------------
# One architecture
# ------------------------------------------------------------------------------------------------


def tolerance(reference: torch.Tensor) -> float:
    """Absolute tolerance: 1e-4 of the logit scale (max |reference logit|, at least 1)."""
    return 1e-4 * max(1.0, reference.abs().max().item())


def _max_diffs(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict[str, float]:
    return {mode: (got[mode] - want[mode]).abs().max().item() for mode in want}


def _first_line(err: BaseException) -> str:
    """``Type: message`` on one line (a validation error's cause is on its second line: kept), cut at 300."""
    text = " ".join(line.strip() for line in str(err).strip().splitlines()[:2])
    return f"{type(err).__name__}: {text}"[:300]


@dataclass
class Outcome:
    model_type: str
    outcome: str  # shares | refused | crash | wrong | not runnable | no reference
    detail: str = ""
    pairs: dict[int, int] = field(default_factory=dict)
    diffs: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def sweep_one(model_type: str) -> Outcome:
    start = time.perf_counter()
    result = _sweep(model_type)
    result.seconds = time.perf_counter() - start
    return result


def _sweep(model_type: str) -> Outcome:
    def out(outcome, detail="", **kw):
        return Outcome(model_type, outcome, detail, **kw)

    # 1. the model builds; the policy pairs attention layers of one kind
    try:
        model = build_model(model_type)
        kinds = layer_kinds(decoder_config(model))
        if not choose_pairs(kinds):  # no two attention layers of a kind: try more layers
            try:
                model = build_model(model_type, n_layers=2 * N_LAYERS)
                kinds = layer_kinds(decoder_config(model))
            except Exception:
                pass
    except Exception as err:
        return out("not runnable", _first_line(err))
    n_layers = len(kinds) or N_LAYERS
    pairs = choose_pairs(kinds) or {2: 0, 3: 1}  # no attention at all: any pairs (a refusal is expected)
    policy = SharingPolicy.from_pairs(n_layers, pairs)

    # 2. sharing attaches, or is refused right there (a crash is reported once the plain model runs)
    attach_crash = None
    try:
        share_kv(model, policy).attach().detach()
    except (UnsupportedArchitecture, PolicyError) as err:
        return out("refused", _first_line(err), pairs=pairs)
    except Exception as err:
        attach_crash = err

    # 3. the plain model runs and agrees with itself cached vs uncached
    ids = prompt_ids()
    try:
        plain = run_modes(model, ids)
    except Exception as err:
        return out("not runnable", _first_line(err), pairs=pairs)
    tol = tolerance(plain["uncached"])
    self_diffs = _max_diffs(plain, {"uncached": plain["uncached"], "cached": plain["uncached"],
                                    "decode": plain["uncached"][:, PREFILL:]})
    if not all(torch.isfinite(v).all() for v in plain.values()):
        return out("not runnable", "plain logits are not finite", pairs=pairs)
    if max(self_diffs.values()) > tol:
        return out("not runnable", f"plain model disagrees with itself: max diff {self_diffs} > tol {tol:.2g}",
                   pairs=pairs, diffs=self_diffs)
    if attach_crash is not None:
        return out("crash", "at attach: " + _first_line(attach_crash), pairs=pairs)

    # 4. the three modes with sharing attached
    sharing = share_kv(model, policy).attach()
    try:
        shared = run_modes(model, ids)
    except (UnsupportedArchitecture, PolicyError) as err:
        return out("crash", "refused in the forward, not at attach: " + _first_line(err), pairs=pairs)
    except Exception as err:
        where = traceback.extract_tb(err.__traceback__)[-1]
        return out("crash", f"{_first_line(err)} ({where.filename.rsplit('/', 1)[-1]}:{where.lineno})", pairs=pairs)
    finally:
        sharing.detach()

    # 5. the independent reference (plain model, K/V substituted inside attention)
    try:
        identity, ran = reference_for(model_type, model, ids, list(range(n_layers)))
        reference, _ = reference_for(model_type, model, ids, policy.map)
    except Exception as err:
        return out("no reference", "reference run failed: " + _first_line(err), pairs=pairs)
    attention_layers = [i for i, k in enumerate(kinds) if k is not None]
    if not set(pairs) | set(pairs.values()) <= set(ran):
        return out("no reference", f"attention of layers {sorted(set(pairs) - set(ran))} does not dispatch through "
                   f"the attention interface (it ran for {ran}; config says {attention_layers})", pairs=pairs)
    if (identity - plain["uncached"]).abs().max().item() > tol:
        return out("no reference", "the reference without sharing does not reproduce the plain model "
                   f"(max diff {(identity - plain['uncached']).abs().max().item():.3g})", pairs=pairs)
    if (reference - plain["uncached"]).abs().max().item() <= tol:
        return out("no reference", "the substitution changes nothing (sharing would be invisible)", pairs=pairs)
    want = {"uncached": reference, "cached": reference, "decode": reference[:, PREFILL:]}
    diffs = _max_diffs(shared, want)
    if max(diffs.values()) > tolerance(reference):
        detail = ", ".join(f"{mode} {d:.3g}" for mode, d in diffs.items()) + f" (tol {tolerance(reference):.2g})"
        return out("wrong", "max abs diff: " + detail, pairs=pairs, diffs=diffs)
    return out("shares", f"pairs {pairs}", pairs=pairs, diffs=diffs)


def table(results: list[Outcome]) -> str:
    lines = ["| model_type | outcome | detail |", "|---|---|---|"]
    for r in results:
        lines.append(f"| {r.model_type} | {r.outcome} | {r.detail.replace('|', '/')} |")
    counts: dict[str, int] = {}
    for r in results:
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
    lines.append("")
    lines.append(", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) + f" (of {len(results)})")
    return "\n".join(lines)


if __name__ == "__main__":
    import logging

    logging.disable(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    chosen = sys.argv[1:] or MODEL_TYPES
    started = time.perf_counter()
    results = []
    for mt in chosen:
        results.append(sweep_one(mt))
        last = results[-1]
        print(f"{mt}: {last.outcome} ({last.seconds:.1f}s) {last.detail}", file=sys.stderr, flush=True)
    print(table(results))
    print(f"\n{len(results)} architectures in {time.perf_counter() - started:.0f} s")
