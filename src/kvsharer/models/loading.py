"""Load any Hugging Face causal LM and find its decoder layers and attention modules generically.

No per-model table for the standard transformers layout: the decoder is ``model.get_decoder()``, its
layers are the ``nn.ModuleList`` with ``num_hidden_layers`` entries, and a layer's attention is the
sub-module that owns separate ``k_proj``/``v_proj`` projections and a ``layer_idx`` (which is how it
talks to the transformers Cache API). Architectures that compute Q, K and V with one fused projection
need a ``FusedQKVAdapter`` registered in ``FUSED_QKV_ADAPTERS`` under the model class name
(``kvsharer.models.fused_qkv``: their layouts as data); without one they get an error naming what is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# model sources (hub id, folder, embedded:<name>, random:<shape>) are checked torch-free in kvsharer.models.sources
from .layer_kinds import LATENT, UNKNOWN, LayerKind, layer_kinds, unsupported  # noqa: E402
from .sources import (DEFAULT_MODEL, EMBEDDED_MODELS, EMBEDDED_PREFIX, ModelError, check_source,  # noqa: E402,F401
                      embedded_gguf)

# fused-QKV layouts, their Q-only stand-ins and the adapter registry live in kvsharer.models.fused_qkv
from .fused_qkv import (FUSED_QKV_ADAPTERS, adapter_factory, FUSED_QKV_NAMES, FUSED_QKV_REFUSED, FusedQKVAdapter,  # noqa: E402,F401
                        GroupedQOnlyProjection, InternLM2Adapter, QOnlyProjection)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class UnsupportedArchitecture(ValueError):
    """A model whose layout the KV-sharing mechanism cannot handle."""


@dataclass
class ModelParts:
    """Where the pieces KV sharing touches live inside a loaded model."""

    decoder: nn.Module  # the module whose forward runs the layer loop and builds the cache
    layers: nn.ModuleList  # decoder layers, in order
    attentions: list[nn.Module | None]  # attention module of each layer (None: a layer with no K/V)
    k_name: str | None  # separate K/V projections (None with a fused-QKV adapter)
    v_name: str | None
    fused: FusedQKVAdapter | None = None  # the adapter of a fused-QKV architecture
    kinds: list[LayerKind] | None = None  # each layer's attention kind (kvsharer.models.layer_kinds)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def native_attention(self) -> bool:
        """Whether attention is transformers' own code (and so dispatches through its attention-function
        registry, which the token-level methods of ``kvsharer.methods.intra`` plug into); False for remote code."""
        return all(type(a).__module__.startswith("transformers.") for a in self.attentions if a is not None)


def text_config(model_or_config):
    config = getattr(model_or_config, "config", model_or_config)
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def find_parts(model: nn.Module) -> ModelParts:
    """Discover decoder, layers and attention modules, or raise ``UnsupportedArchitecture``."""
    cls = type(model).__name__
    config = text_config(model)
    n_layers = getattr(config, "num_hidden_layers", None)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    if n_layers is None:
        raise UnsupportedArchitecture(f"{cls}: the config has no num_hidden_layers, so decoder layers cannot be found")
    layer_lists = [m for m in decoder.children() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    if not layer_lists:  # get_decoder() did not reach the layer loop (Llama 4): the one module holding the list
        holders = [m for m in model.modules()
                   if any(isinstance(c, nn.ModuleList) and len(c) == n_layers for c in m.children())]
        if len(holders) == 1:
            decoder = holders[0]
            layer_lists = [m for m in decoder.children() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    if len(layer_lists) != 1:
        raise UnsupportedArchitecture(
            f"{cls}: expected exactly one nn.ModuleList of {n_layers} decoder layers directly under "
            f"{type(decoder).__name__}, found {len(layer_lists)}"
        )
    layers = layer_lists[0]
    own_cache = _own_cache_class(decoder)
    if own_cache is not None:
        raise UnsupportedArchitecture(
            f"{cls}: its modeling code keeps its states in a cache class of its own ({own_cache}) and refuses any "
            "other, so the cache layers KV sharing and the cache methods build cannot be given to it")
    kinds = layer_kinds(config)
    refused = next((k for k in kinds if k.kind in (LATENT, UNKNOWN)), None)
    if refused is not None:
        raise UnsupportedArchitecture(f"{cls}: {unsupported(kinds)}")
    factory = adapter_factory(cls, config)
    adapter = factory(config) if factory is not None else None
    attentions = []
    for idx, layer in enumerate(layers):
        if not kinds[idx].has_kv:  # a Mamba / linear-attention / MLP-only layer: nothing of it is shared
            attentions.append(None)
            continue
        attn = _find_attention(model, layer, idx, adapter)
        if getattr(attn, "layer_idx", idx) != idx:
            raise UnsupportedArchitecture(
                f"{cls}: attention of layer {idx} has layer_idx={attn.layer_idx}; KV sharing relies on the "
                "transformers Cache API being called with each layer's own index"
            )
        attentions.append(attn)
    if adapter is not None:
        return ModelParts(decoder=decoder, layers=layers, attentions=attentions, k_name=None, v_name=None,
                          fused=adapter, kinds=kinds)
    return ModelParts(decoder=decoder, layers=layers, attentions=attentions, k_name="k_proj", v_name="v_proj",
                      kinds=kinds)


def _own_cache_class(decoder: nn.Module) -> str | None:
    """A ``DynamicCache`` subclass defined in the decoder's own modeling file (MiniMax's ``MiniMaxCache``), if any."""
    import sys

    from transformers.cache_utils import DynamicCache

    module = sys.modules.get(type(decoder).__module__)
    own = [name for name, c in vars(module).items() if isinstance(c, type) and issubclass(c, DynamicCache)
           and c.__module__ == module.__name__] if module is not None else []
    return own[0] if own else None


def _find_attention(model: nn.Module, layer: nn.Module, idx: int, adapter: FusedQKVAdapter | None) -> nn.Module:
    cls = type(model).__name__
    if adapter is not None:
        for _, module in layer.named_modules():
            if isinstance(getattr(module, adapter.projection, None), nn.Module):
                _check_cache_api(cls, module, idx)
                problem = adapter.problem(module)
                if problem is not None:
                    raise UnsupportedArchitecture(f"{cls}: layer {idx}: {problem}")
                return module
        raise UnsupportedArchitecture(
            f"{cls}: layer {idx} ({type(layer).__name__}) has no attention module with the fused projection "
            f"'{adapter.projection}' that its adapter {type(adapter).__name__} expects"
        )
    for _, module in layer.named_modules():
        if isinstance(getattr(module, "k_proj", None), nn.Module) and isinstance(getattr(module, "v_proj", None), nn.Module):
            _check_cache_api(cls, module, idx)
            return module
    for _, module in layer.named_modules():
        fused = [n for n in FUSED_QKV_NAMES if isinstance(getattr(module, n, None), nn.Module)]
        if fused:
            raise UnsupportedArchitecture(
                f"{cls}: layer {idx} computes Q, K and V with one fused projection '{fused[0]}' "
                f"({type(module).__name__}); KV sharing needs separate k_proj/v_proj or a fused-QKV adapter, "
                f"and no adapter is registered for {cls} in kvsharer.models.fused_qkv.FUSED_QKV_ADAPTERS"
                + (f": {FUSED_QKV_REFUSED[cls]}" if cls in FUSED_QKV_REFUSED else "")
            )
    raise UnsupportedArchitecture(
        f"{cls}: layer {idx} ({type(layer).__name__}) has no attention module with k_proj/v_proj projections"
    )


def _check_cache_api(cls: str, module: nn.Module, idx: int) -> None:
    if not hasattr(module, "layer_idx"):
        raise UnsupportedArchitecture(
            f"{cls}: attention of layer {idx} ({type(module).__name__}) has no layer_idx, so it does not use "
            "the transformers Cache API that KV sharing plugs into"
        )


def kv_shape(model) -> tuple[int, int, int]:
    """(n_layers, kv_heads, head_dim) from the config."""
    config = text_config(model)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def trusts_remote_code(source: str, local_files_only: bool = False) -> bool:
    """Whether ``source`` is loaded with ``trust_remote_code``: only when its ``config.json`` points to
    remote code (``auto_map``) AND names an architecture with an adapter in ``FUSED_QKV_ADAPTERS`` (a
    modeling file kvsharer was written against). Reading the JSON runs no code."""
    if source.startswith(EMBEDDED_PREFIX):
        return False
    from transformers import PretrainedConfig

    try:
        data, _ = PretrainedConfig.get_config_dict(source, local_files_only=local_files_only)
    except Exception:  # not reachable: loading will say so
        return False
    return bool(data.get("auto_map")) and any(a in FUSED_QKV_ADAPTERS for a in data.get("architectures") or [])


GPU_FILL = 0.9  # share of each GPU's memory device_map="auto" may fill (the rest: K/V, activations, CUDA context)


def requested_gpus() -> int:
    """GPUs a job loads its model across: ``$KVSHARER_GPUS`` (set by ``python -m kvsharer --gpus N``), else 1."""
    try:
        return max(0, int(os.environ.get("KVSHARER_GPUS", "1")))
    except ValueError:
        raise ModelError(f"KVSHARER_GPUS must be a number of GPUs, got {os.environ['KVSHARER_GPUS']!r}") from None


def placement(device: str | None, gpus: int) -> dict:
    """``from_pretrained`` keyword arguments that place the model: none for one device (it loads on CPU and
    moves there); for ``gpus > 1``, ``device_map="auto"`` over the first ``gpus`` visible GPUs, each filled
    to ``GPU_FILL`` of its memory, with no CPU or disk offload (the layers are spread over the GPUs in order;
    accelerate moves the activations between them)."""
    if gpus <= 1:
        return {}
    if device is None or not str(device).startswith("cuda"):
        raise ModelError(f"{gpus} GPUs were requested (--gpus) but the model goes to {device or 'the CPU'}: "
                         "no GPU is visible to this job")
    visible = torch.cuda.device_count()
    if visible < gpus:
        raise ModelError(f"{gpus} GPUs were requested (--gpus) but {visible} are visible to this job "
                         "(CUDA_VISIBLE_DEVICES); ask the scheduler for them (models.<name>.gpus)")
    memory = {i: int(torch.cuda.get_device_properties(i).total_memory * GPU_FILL) for i in range(gpus)}
    return {"device_map": "auto", "max_memory": memory}


def load_model(
    source: str,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    device: str | None = None,
    gpus: int | None = None,
):
    """Load ``(model, tokenizer)`` from a local folder, a hub id, or ``embedded:<name>``; ``random:<shape>``
    builds a random-initialised model of a real shape on ``device`` (tokenizer None; see kvsharer.models.shapes);
    ``standin:<hub id>`` a random CPU-width stand-in of a hub model with its BPE tokenizer (kvsharer.models.standins).

    ``gpus`` (default: :func:`requested_gpus`): more than one loads a folder or hub model across that many
    GPUs (:func:`placement`); 0 keeps it on the CPU. Remote-code models are loaded only for the
    architectures ``trusts_remote_code`` accepts, with the attention their own code selects
    (``attn_implementation`` applies to transformers' own models)."""
    check_source(source)
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    gpus = requested_gpus() if gpus is None else gpus
    if gpus == 0 and device is not None and str(device).startswith("cuda"):
        device = "cpu"
    from transformers import AutoModelForCausalLM

    kwargs = dict(dtype=DTYPES[dtype], attn_implementation=attn_implementation)
    from .shapes import RANDOM_PREFIX, random_model
    from .standins import STANDIN_PREFIX, standin_model

    if source.startswith(RANDOM_PREFIX):
        return random_model(source, DTYPES[dtype], attn_implementation, device), None
    if source.startswith(STANDIN_PREFIX):
        return standin_model(source, DTYPES[dtype], attn_implementation, device)
    if source.startswith(EMBEDDED_PREFIX):
        gguf = embedded_gguf(source[len(EMBEDDED_PREFIX):])
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, **kwargs)
        _drop_quantizer(model)
    else:
        remote = {}
        if trusts_remote_code(source):
            remote = dict(trust_remote_code=True)
            kwargs.pop("attn_implementation")
        kwargs.update(placement(device, gpus))
        try:
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs, **remote)
        except OSError as err:
            raise ModelError(
                f"could not load {source!r}: {err}. Offline? Use a local folder or an embedded model."
            ) from None
    tokenizer = load_tokenizer(source)
    model.eval()
    if device and "device_map" not in kwargs:  # a model spread over GPUs stays where accelerate put it
        model.to(device)
    return model, tokenizer


def load_tokenizer(source: str):
    """The tokenizer :func:`load_model` pairs with ``source`` (a padding token set), loaded without weights;
    ModelError for ``random:<shape>``, which has none."""
    check_source(source)
    from transformers import AutoTokenizer

    from .shapes import RANDOM_PREFIX
    from .standins import STANDIN_PREFIX, standin_tokenizer_of

    if source.startswith(RANDOM_PREFIX):
        raise ModelError(f"{source} is a random model of a shape: it has no tokenizer")
    if source.startswith(STANDIN_PREFIX):
        return standin_tokenizer_of(source)
    if source.startswith(EMBEDDED_PREFIX):
        gguf = embedded_gguf(source[len(EMBEDDED_PREFIX):])
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    else:
        remote = dict(trust_remote_code=True) if trusts_remote_code(source) else {}
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **remote)
        except OSError as err:
            raise ModelError(
                f"could not load the tokenizer of {source!r}: {err}. Offline? Use a local folder or an embedded model."
            ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def save_tokenizer(source: str, folder: str | os.PathLike) -> Path:
    """Save ``source``'s tokenizer (no weights) beside its model config, so that ``AutoTokenizer`` loads from
    ``folder`` what it loads from :func:`prepare_model`'s folder: it picks the tokenizer class by the config's
    model type (a Qwen2 stand-in's BPE gets Qwen's pre-tokenizer there, and different token counts)."""
    from transformers import AutoConfig

    from .standins import STANDIN_PREFIX, standin_shape, transformers_config

    folder = Path(folder)
    load_tokenizer(source).save_pretrained(folder)
    if source.startswith(STANDIN_PREFIX):
        config = transformers_config(standin_shape(source))
    elif source.startswith(EMBEDDED_PREFIX):
        gguf = embedded_gguf(source[len(EMBEDDED_PREFIX):])
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    else:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trusts_remote_code(source))
    config.save_pretrained(folder)
    return folder


def tokenizer_folder(source: str, scratch: str | os.PathLike) -> str:
    """A folder ``AutoTokenizer`` loads ``source``'s tokenizer from as its jobs do (RULER's generators, preflight):
    the model folder, else the tokenizer saved in ``scratch`` by :func:`save_tokenizer`."""
    if Path(source).is_dir():
        return str(Path(source).resolve())
    return str(save_tokenizer(source, scratch))


def _drop_quantizer(model) -> None:
    """A GGUF checkpoint is dequantized on load; forget the quantizer so the model saves as plain weights."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def draw_device(source: str) -> str:
    """Where :func:`prepare_model` builds ``source``: a stand-in's random weights are drawn on a visible GPU
    (a full-width 7B stand-in's 13 GB of fp16 weights in seconds; torch's CPU generator is serial, about 25-230 M
    values a second, so 5 minutes on a GPU machine's CPU); everything else, and any model of a job that
    asks for no GPU (``--gpus 0``), is converted on the CPU. The draw depends on the device's generator."""
    from .standins import STANDIN_PREFIX

    if source.startswith(STANDIN_PREFIX) and requested_gpus() > 0 and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def prepare_model(source: str, out_dir: str | os.PathLike, dtype: str = "float32") -> Path:
    """Materialize ``source`` once as a safetensors folder with its tokenizer (atomically); the folder's
    ``kvsharer_source.json`` says where it was built (:func:`draw_device`)."""
    out_dir = Path(out_dir)
    device = draw_device(source)
    model, tokenizer = load_model(source, dtype=dtype, device=device)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    meta = {"source": source, "dtype": dtype, "class": type(model).__name__, "built_on": device,
            "weights_sha256": weights_hash(tmp)}
    (tmp / "kvsharer_source.json").write_text(json.dumps(meta, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def weights_hash(folder: str | os.PathLike) -> str:
    """sha256 over a model folder's weight files (names and bytes), for provenance."""
    folder = Path(folder)
    digest = hashlib.sha256()
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin")) or sorted(folder.glob("*.gguf"))
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def model_id(source: str) -> tuple[str, str | None]:
    """(what the model is, weights hash when it is a local folder) for provenance sidecars."""
    path = Path(source)
    if path.is_dir():
        meta = path / "kvsharer_source.json"
        if meta.is_file():
            data = json.loads(meta.read_text())
            return data.get("source", str(path)), data.get("weights_sha256")
        return str(path.resolve()), weights_hash(path)
    return source, None


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
