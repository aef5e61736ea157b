"""The architecture table (kvsharer.models.shapes): every model of the paper config is in it, and its numbers agree."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kvsharer.models.shapes import ARCHITECTURES, SHAPES, architecture_of

REPO = Path(__file__).resolve().parents[1]
PAPER = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())


@pytest.mark.parametrize("hub_id", sorted(ARCHITECTURES))
def test_parameter_counts_follow_from_the_shape(hub_id):
    """The stored counts are the checkpoints' (Llama-2 7B: 6,738,415,616, ...); the shape must reproduce them
    exactly, so a mistyped layer count, width or vocabulary shows up here."""
    shape = ARCHITECTURES[hub_id]
    if shape.architecture.endswith("ForConditionalGeneration"):  # the count includes a vision tower: not stored
        assert shape.params is None
        pytest.skip(f"{hub_id}: a multimodal checkpoint, only its text decoder is described")
    assert shape.params is not None
    assert shape.param_count() == shape.params


def test_every_paper_model_is_in_the_table():
    sources = {m["source"] for m in PAPER["models"].values()}
    missing = [s for s in sources if architecture_of(s) is None]
    assert not missing, f"add these to kvsharer.models.shapes.ARCHITECTURES: {missing}"


def test_llama2_70b_is_the_published_shape():
    s = ARCHITECTURES["meta-llama/Llama-2-70b-chat-hf"]
    assert (s.layers, s.hidden, s.heads, s.kv_heads, s.intermediate, s.vocab, s.max_positions) == \
        (80, 8192, 64, 8, 28672, 32000, 4096)
    assert s.gated and not s.fused_qkv and s.head_size == 128
    # fp16 KV of one token: 2 x 80 layers x 8 KV heads x 128 x 2 bytes = 320 KiB
    assert s.kv_bytes(1, 1, 2) == 320 * 1024


def test_fused_qkv_models_have_an_adapter_and_name_their_packages():
    from kvsharer.models.loading import FUSED_QKV_ADAPTERS

    fused = {k: s for k, s in ARCHITECTURES.items() if s.fused_qkv}
    assert fused  # InternLM2
    for hub_id, shape in fused.items():
        assert shape.architecture in FUSED_QKV_ADAPTERS, hub_id
        if shape.remote_code:  # InternLM2's modeling file imports them; Phi-4 is transformers' own code
            assert {"einops", "sentencepiece"} <= set(shape.packages), hub_id


def test_random_shapes_are_table_entries():
    assert SHAPES["llama-2-7b"] is ARCHITECTURES["meta-llama/Llama-2-7b-chat-hf"]
    assert architecture_of("random:llama-2-13b") is ARCHITECTURES["meta-llama/Llama-2-13b-chat-hf"]
    assert architecture_of("org/unknown-model") is None


def test_the_table_imports_no_torch():
    code = "import sys, kvsharer.models.shapes; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO / "src")})
    assert proc.returncode == 0, proc.stderr


def test_embedded_models_are_in_the_table():
    from kvsharer.models.loading import EMBEDDED_MODELS

    for name in EMBEDDED_MODELS:
        shape = architecture_of(f"embedded:{name}")
        assert shape is not None and shape.max_positions == 8192  # SmolLM2: 8192-token window


def test_embedded_entry_matches_the_shipped_checkpoint():
    """The one checkpoint on disk here: the table must say what its config says."""
    from kvsharer.models.loading import ModelError, embedded_gguf

    try:
        gguf = embedded_gguf("smollm2-135m-instruct")
    except ModelError as err:
        pytest.skip(str(err))
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    s = architecture_of("embedded:smollm2-135m-instruct")
    assert (s.layers, s.hidden, s.intermediate, s.heads, s.kv_heads, s.vocab, s.max_positions, s.tied_embeddings) == (
        c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads,
        c.vocab_size, c.max_position_embeddings, c.tie_word_embeddings)
