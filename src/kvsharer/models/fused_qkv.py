"""Fused-QKV projections as data: where the query rows sit, and a stand-in that computes only those.

Architectures that compute Q, K and V with ONE projection cannot skip K/V by swapping ``k_proj``/``v_proj``.
For a layer that reads another layer's K/V, KV sharing (``kvsharer.cache.sharing``) replaces the fused
projection by a ``QOnlyProjection``: same output shape and layout, only the query rows computed (on views of
the original weight), zeros in the key/value rows — never read, because the layer's cache returns the
source's K/V.

Every layout we know is "``blocks`` blocks of rows, each: its query rows, then its key/value rows"
(``QKVLayout``; ``d`` = head_dim):

* concatenated ``[q | k | v]`` — 1 block: heads x d query rows, 2 x kv_heads x d key/value rows.
  Phi-3 / Phi-4 (``qkv_proj``), MPT (``Wqkv``), GPT-2 (``c_attn``, a ``Conv1D``: weight ``[in, out]``),
  Falcon multi-query and GPTBigCode multi-query (one key head, one value head).
* interleaved ``[heads, 3, d]`` — one block per head: d query rows, 2 x d key/value rows.
  GPT-NeoX, Persimmon, Bloom (``query_key_value``), Falcon's classic multi-head layout, GPTBigCode multi-head
  (``c_attn``).
* grouped ``[kv_heads, groups + 2, d]`` — one block per KV head: its groups x d query rows, 2 x d key/value rows.
  InternLM2 (``wqkv``), Falcon's new decoder architecture (``query_key_value``).

A family is one ``FusedQKVFamily`` (which attribute, which layout from its config; ``Linear`` or ``Conv1D`` is
read off the module). ``FUSED_QKV_ADAPTERS`` maps a model CLASS NAME (the ``architectures`` entry of ``config.json``,
which ``kvsharer.models.loading.trusts_remote_code`` also reads) to the adapter factory of its family;
``FUSED_QKV_REFUSED`` says why a fused architecture we looked at has none.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

# Projection names that mean "Q, K and V are one matrix" (cannot skip K/V without an adapter).
FUSED_QKV_NAMES = ("qkv_proj", "wqkv", "c_attn", "query_key_value", "Wqkv", "W_pack")


@dataclass(frozen=True)
class QKVLayout:
    """The output features of a fused QKV projection, viewed as ``[blocks, q_rows + kv_rows]``: in each block
    the first ``q_rows`` are query features, the next ``kv_rows`` key and value features."""

    blocks: int
    q_rows: int
    kv_rows: int
    shape: str  # the layout in words, for messages

    @classmethod
    def concatenated(cls, heads: int, kv_heads: int, head_dim: int) -> "QKVLayout":
        """``[q | k | v]``: all query heads, then all key heads, then all value heads."""
        return cls(1, heads * head_dim, 2 * kv_heads * head_dim,
                   f"[q | k | v] = [{heads} | {kv_heads} | {kv_heads} heads] x {head_dim}")

    @classmethod
    def interleaved(cls, heads: int, head_dim: int) -> "QKVLayout":
        """``[heads, 3, head_dim]``: per head its query, key and value."""
        return cls(heads, head_dim, 2 * head_dim, f"[{heads} heads, (q, k, v), {head_dim}]")

    @classmethod
    def grouped(cls, kv_heads: int, groups: int, head_dim: int) -> "QKVLayout":
        """``[kv_heads, groups + 2, head_dim]``: per KV head its ``groups`` query heads, then its key and value."""
        return cls(kv_heads, groups * head_dim, 2 * head_dim,
                   f"[{kv_heads} KV heads, ({groups} query heads, k, v), {head_dim}]")

    @property
    def block_rows(self) -> int:
        return self.q_rows + self.kv_rows

    @property
    def out_features(self) -> int:
        return self.blocks * self.block_rows

    @property
    def query_features(self) -> int:
        return self.blocks * self.q_rows


def query_weight(weight: torch.Tensor, layout: QKVLayout, conv1d: bool) -> torch.Tensor:
    """The query rows of a fused projection's weight as ``[blocks, q_rows, in]`` — a view, no copy.

    ``nn.Linear`` (and subclasses such as Falcon's ``FalconLinear``) hold ``[out, in]``; GPT-2's ``Conv1D``
    holds ``[in, out]`` (``y = x @ W + b``)."""
    b, q, rows = layout.blocks, layout.q_rows, layout.block_rows
    if conv1d:
        return weight.view(-1, b, rows)[:, :, :q].permute(1, 2, 0)  # [in, b, rows] -> [b, q, in]
    return weight.view(b, rows, -1)[:, :q]  # [b, rows, in] -> [b, q, in]


class QOnlyProjection(nn.Module):
    """Stands in for a fused QKV projection (``nn.Linear`` or GPT-2's ``Conv1D``) in a layer that reads another
    layer's K/V: computes only the query rows of ``layout`` — one batched matmul over a strided view of the
    original weight — and writes zeros into the key/value rows, so the output has the original shape and
    layout. It holds the original ``weight``/``bias`` under the same names, so the model's ``state_dict``
    is unchanged while sharing is attached."""

    def __init__(self, original: nn.Module, layout: QKVLayout):
        super().__init__()
        self.weight = original.weight
        self.bias = original.bias
        self.conv1d = isinstance(original, Conv1D)
        self.layout = layout
        self.in_features = self.weight.shape[0] if self.conv1d else self.weight.shape[1]
        self.out_features = layout.out_features
        self.calls = 0  # how often it stood in for the real projection (tests read it)
        self.rows = 0  # output features its last call computed (layout.query_features; tests read it)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        b, q, rows = self.layout.blocks, self.layout.q_rows, self.layout.block_rows
        flat = hidden_states.reshape(-1, self.in_features)  # [n, in]
        weight = query_weight(self.weight, self.layout, self.conv1d)  # [b, q, in]: a view of the original
        query = torch.matmul(flat, weight.mT)  # [b, n, q]: one batched GEMM, the query rows only
        out = flat.new_zeros(flat.shape[0], b, rows)  # [n, b, q + kv]: the key/value rows stay zero
        out[:, :, :q] = query.transpose(0, 1)
        if self.bias is not None:
            out[:, :, :q] += self.bias.view(b, rows)[:, :q]  # [b, q]
        self.rows = b * q
        return out.view(*hidden_states.shape[:-1], self.out_features)  # [..., out]

    def extra_repr(self) -> str:
        kind = "Conv1D" if self.conv1d else "Linear"
        return (f"{kind}, in_features={self.in_features}, out_features={self.out_features}, {self.layout.shape} "
                "(only Q: this layer reads another layer's KV)")


class GroupedQOnlyProjection(QOnlyProjection):
    """The Q-only stand-in of a projection laid out ``[kv_heads, groups + 2, head_dim]`` (InternLM2)."""

    def __init__(self, original: nn.Linear, kv_heads: int, groups: int, head_dim: int):
        super().__init__(original, QKVLayout.grouped(kv_heads, groups, head_dim))


# ----------------------------------------------------------------------------------------------
# Families: which attribute, which layout
# ----------------------------------------------------------------------------------------------


def heads(config) -> int:
    return config.num_attention_heads  # GPT-2, Bloom, GPTBigCode, MPT map their n_head(s) onto it


def kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or heads(config)


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // heads(config)


@dataclass(frozen=True)
class FusedQKVFamily:
    """One architecture family's fused QKV projection, as data."""

    name: str
    projection: str  # attribute of the attention module holding it
    layout: Callable[[object], QKVLayout]  # from the model's text config
    source: str  # where the layout is read, for the reader


def _falcon_layout(config) -> QKVLayout:
    if config.new_decoder_architecture:  # view(b, s, -1, heads // kv_heads + 2, d): q heads, k, v per KV head
        return QKVLayout.grouped(config.num_kv_heads, heads(config) // config.num_kv_heads, head_dim(config))
    if config.multi_query:  # view(b, s, heads + 2, d): all query heads, one key, one value
        return QKVLayout.concatenated(heads(config), 1, head_dim(config))
    return QKVLayout.interleaved(heads(config), head_dim(config))  # view(b, s, heads, 3, d)


def _gpt_bigcode_layout(config) -> QKVLayout:
    if config.multi_query:  # split((embed, kv_dim, kv_dim)) with one KV head
        return QKVLayout.concatenated(heads(config), 1, head_dim(config))
    return QKVLayout.interleaved(heads(config), head_dim(config))  # view(b, s, heads, 3 * d).split(3 * [d])


INTERNLM2 = FusedQKVFamily(
    "InternLM2", "wqkv", lambda c: QKVLayout.grouped(kv_heads(c), heads(c) // kv_heads(c), head_dim(c)),
    "remote modeling_internlm2.py: rearrange(qkv, 'b q (h gs d) -> b q h gs d', gs=2 + groups)")
PHI3 = FusedQKVFamily(
    "Phi-3", "qkv_proj", lambda c: QKVLayout.concatenated(heads(c), kv_heads(c), head_dim(c)),
    "modeling_phi3.py: qkv[..., :query_pos], then num_key_value_heads * head_dim key, then value")
GPT_NEOX = FusedQKVFamily(
    "GPT-NeoX", "query_key_value", lambda c: QKVLayout.interleaved(heads(c), head_dim(c)),
    "modeling_gpt_neox.py: view(b, s, -1, 3 * head_size).chunk(3, dim=-1)")
PERSIMMON = FusedQKVFamily(
    "Persimmon", "query_key_value", lambda c: QKVLayout.interleaved(heads(c), head_dim(c)),
    "modeling_persimmon.py _split_heads: view(b, s, num_heads, 3, head_dim)")
BLOOM = FusedQKVFamily(
    "Bloom", "query_key_value", lambda c: QKVLayout.interleaved(heads(c), head_dim(c)),
    "modeling_bloom.py _reshape: view(b, s, num_heads, 3, head_dim)")
FALCON = FusedQKVFamily("Falcon", "query_key_value", _falcon_layout, "modeling_falcon.py _split_heads")
GPT2 = FusedQKVFamily(
    "GPT-2", "c_attn", lambda c: QKVLayout.concatenated(heads(c), heads(c), head_dim(c)),
    "modeling_gpt2.py: Conv1D c_attn(x).split(embed_dim, dim=2)")
GPT_BIGCODE = FusedQKVFamily("GPTBigCode", "c_attn", _gpt_bigcode_layout, "modeling_gpt_bigcode.py forward")
MPT = FusedQKVFamily(
    "MPT", "Wqkv", lambda c: QKVLayout.concatenated(heads(c), heads(c), head_dim(c)),
    "modeling_mpt.py: Wqkv(x).chunk(3, dim=2)")


class FusedQKVAdapter:
    """How to stop a shared layer from computing K/V when Q, K and V come from one fused projection: built
    once per model from its family's description and its (text) config. For a layer that reads another
    layer's K/V, KV sharing replaces ``attention.<projection>`` by ``skip_kv(attention)`` and puts the
    original back on detach."""

    def __init__(self, family: FusedQKVFamily, config):
        self.family = family
        self.config = config
        self.projection = family.projection  # attribute name of the fused projection on the attention module
        self.layout = family.layout(config)

    def problem(self, attention: nn.Module) -> str | None:
        """Why ``attention`` does not have the layout this adapter expects (None: it has)."""
        fused = getattr(attention, self.projection)
        if isinstance(fused, QOnlyProjection) and fused.layout == self.layout:
            return None  # its Q-only stand-in: KV sharing is attached (another method may be attaching after it)
        expected = self.layout.out_features
        kind = "Conv1D" if isinstance(fused, Conv1D) else "Linear"
        outputs = fused.nf if isinstance(fused, Conv1D) else getattr(fused, "out_features", None)
        if isinstance(fused, (nn.Linear, Conv1D)) and outputs == expected:
            return None
        return (f"{type(attention).__name__}.{self.projection} is not a {kind} with {expected} outputs "
                f"({self.layout.shape}); the {self.family.name} adapter does not know this layout")

    def skip_kv(self, attention: nn.Module) -> nn.Module:
        return QOnlyProjection(getattr(attention, self.projection), self.layout)


class InternLM2Adapter(FusedQKVAdapter):
    """InternLM2 (remote code ``modeling_internlm2.py``): one Linear ``attention.wqkv``, rows grouped per KV head.

    Layout, from InternLM's own sources: ``InternLM2Attention.forward`` rearranges the ``wqkv`` output
    ``"b q (h gs d) -> b q h gs d"`` with ``gs = 2 + num_key_value_groups``, takes
    ``qkv_states[..., :num_key_value_groups, :]`` as the query heads of each group, ``[..., -2, :]`` as
    the key and ``[..., -1, :]`` as the value; ``tools/convert2llama.py`` in github.com/InternLM/InternLM
    splits the weight the same way (``'(h gs d) dim -> h gs d dim'``, then ``torch.split(v,
    [num_key_value_groups, 1, 1], dim=1)``). ``wqkv`` has a bias when ``config.bias`` is set. Recent
    versions of ``modeling_internlm2.py`` (those that import ``transformers.cache_utils.Cache``) store
    K/V with ``past_key_value.update(key_states, value_states, self.layer_idx, cache_kwargs)``, which is
    where a shared layer gets its source's K/V; older versions concatenate tuples and cannot share.
    """

    def __init__(self, config):
        super().__init__(INTERNLM2, config)
        self.kv_heads, self.head_dim = kv_heads(config), head_dim(config)
        self.groups = heads(config) // self.kv_heads

    def skip_kv(self, attention: nn.Module) -> nn.Module:
        return GroupedQOnlyProjection(getattr(attention, self.projection), self.kv_heads, self.groups, self.head_dim)


def _adapter(family: FusedQKVFamily) -> Callable[[object], FusedQKVAdapter]:
    return partial(FusedQKVAdapter, family)


# model class name -> adapter factory (called with the model's text config). Register a new fused layout here.
FUSED_QKV_ADAPTERS: dict[str, Callable[[object], FusedQKVAdapter]] = {
    "InternLM2ForCausalLM": InternLM2Adapter,
    "Phi3ForCausalLM": _adapter(PHI3),  # Phi-3 and Phi-4 (text) checkpoints
    "GPTNeoXForCausalLM": _adapter(GPT_NEOX),
    "PersimmonForCausalLM": _adapter(PERSIMMON),
    "BloomForCausalLM": _adapter(BLOOM),
    "FalconForCausalLM": _adapter(FALCON),
    "GPT2LMHeadModel": _adapter(GPT2),
    "GPTBigCodeForCausalLM": _adapter(GPT_BIGCODE),
    "MptForCausalLM": _adapter(MPT),
}

# text config model_type -> the registry's class name: a multimodal model whose text decoder is one of these
# families (Fuyu's is Persimmon) finds its adapter through its text config
BY_MODEL_TYPE: dict[str, str] = {"phi3": "Phi3ForCausalLM", "gpt_neox": "GPTNeoXForCausalLM",
                                 "persimmon": "PersimmonForCausalLM", "bloom": "BloomForCausalLM",
                                 "falcon": "FalconForCausalLM", "gpt2": "GPT2LMHeadModel",
                                 "gpt_bigcode": "GPTBigCodeForCausalLM", "mpt": "MptForCausalLM"}


def adapter_factory(model_class: str, config) -> Callable[[object], FusedQKVAdapter] | None:
    """The adapter of a model class, else of its text decoder's family (``config``: its text config)."""
    return FUSED_QKV_ADAPTERS.get(model_class) or FUSED_QKV_ADAPTERS.get(
        BY_MODEL_TYPE.get(getattr(config, "model_type", None), ""))


# fused architectures looked at and left without an adapter: model class name -> why
FUSED_QKV_REFUSED: dict[str, str] = {
    "ZayaForCausalLM": (
        "Zaya's qkv_proj is a compressed convolutional attention (ZayaCCAProjection), not one matrix: Q and K "
        "pass a causal convolution whose state the cache keeps per layer, V a delayed recurrent state, so "
        "there are no K/V rows a shared layer could skip"),
}
