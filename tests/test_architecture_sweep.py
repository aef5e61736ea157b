"""KV sharing on every causal-LM architecture transformers ships: each shares exactly, or is refused at attach.

One test per ``model_type`` of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` (the machinery, and what "shares"
means — three modes equal to an independent K/V-substitution reference within 1e-4 of the logit scale —
is in ``tests/arch_sweep.py``). Every architecture must ``share`` unless it is listed below:

* ``REFUSED``       — must be refused at attach, with a message containing the reason given here;
* ``NOT_RUNNABLE``  — the plain tiny model does not build/run in this transformers (out of scope);
* ``NO_REFERENCE``  — no independent reference applies (attention outside the attention interface with
  no fallback in ``arch_sweep``): it must still run with sharing attached, neither crash nor be refused;
* ``KNOWN_BROKEN``  — today it crashes or differs from the reference: a strict xfail, so the test
  fails once it shares — then delete the entry.

A new architecture in a future transformers that crashes, or that this list does not know, fails.
Rerun one: ``.venv/bin/python -m pytest tests/test_architecture_sweep.py -k <model_type>``;
the whole table: ``.venv/bin/python tests/arch_sweep.py``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from arch_sweep import MODEL_TYPES, sweep_one

FUSED = "computes Q, K and V with one fused projection"
NO_KV_PROJ = "has no attention module with k_proj/v_proj"
NO_LAYER_LIST = "expected exactly one nn.ModuleList"
MLA = "multi-head latent attention (kv_lora_rank)"
UNKNOWN_KIND = "unknown layer type(s)"
NO_KV = "has no per-token K/V"

REFUSED = {
    # fused QKV projections without an adapter
    "codegen": FUSED, "dbrx": FUSED, "gpt_neox_japanese": FUSED, "openai-gpt": FUSED,
    "phi4_multimodal": FUSED, "zaya": FUSED,
    # its modeling code refuses any cache but its own class (MiniMaxCache, which grows its layers lazily)
    "minimax": "keeps its states in a cache class of its own",
    # attention modules without k_proj/v_proj (BERT-style encoders used as decoders, others)
    "bert": NO_KV_PROJ, "bert-generation": NO_KV_PROJ, "big_bird": NO_KV_PROJ, "camembert": NO_KV_PROJ,
    "cpmant": NO_KV_PROJ, "ctrl": NO_KV_PROJ, "data2vec-text": NO_KV_PROJ, "electra": NO_KV_PROJ,
    "ernie": NO_KV_PROJ, "jetmoe": NO_KV_PROJ, "megatron-bert": NO_KV_PROJ, "prophetnet": NO_KV_PROJ,
    "rembert": NO_KV_PROJ, "roberta": NO_KV_PROJ, "roberta-prelayernorm": NO_KV_PROJ, "roc_bert": NO_KV_PROJ,
    "roformer": NO_KV_PROJ, "xlm-roberta": NO_KV_PROJ, "xlm-roberta-xl": NO_KV_PROJ, "xlnet": NO_KV_PROJ,
    "xmod": NO_KV_PROJ,
    # no single decoder layer list where kvsharer looks
    "git": NO_LAYER_LIST, "hrm_text": NO_LAYER_LIST, "longcat_flash": NO_LAYER_LIST, "musicgen": NO_LAYER_LIST,
    "musicgen_melody": NO_LAYER_LIST, "xlm": NO_LAYER_LIST,
    "blt": "the config has no num_hidden_layers",
    # multi-head latent attention: a layer's latent is meaningless under another layer's up-projection
    "axk1": MLA, "axk2": MLA, "bailing_hybrid": MLA, "deepseek_v2": MLA, "deepseek_v3": MLA, "deepseek_v32": MLA,
    "glm4_moe_lite": MLA, "glm_moe_dsa": MLA, "hy_v4": MLA, "kimi_linear": MLA, "minicpm3": MLA, "youtu": MLA,
    # attention kinds kvsharer does not know (compressed / indexed sparse attention)
    "deepseek_v4": UNKNOWN_KIND, "dots3_note": UNKNOWN_KIND, "dots3_note_text": UNKNOWN_KIND,
    "qwen4_exp": UNKNOWN_KIND, "qwen4_exp_text": UNKNOWN_KIND,
    # no attention at all (state-space / recurrent blocks): nothing to share
    "falcon_mamba": NO_KV, "mamba": NO_KV, "mamba2": NO_KV,
    "rwkv": NO_KV_PROJ, "xlstm": NO_KV_PROJ,
    # attention outside the transformers Cache API (no per-layer index)
    "gpt_neo": "has no layer_idx", "zamba": "layer_idx=None", "zamba2": "layer_idx=-1",
}

NOT_RUNNABLE = {  # the plain tiny model, without kvsharer
    "bamba": "disagrees with itself",  # decode differs from the uncached forward by ~0.02
    "cohere_compass_text": "KeyError: 'full_attention'",
    "gemma3n": "requires the timm library",
    # draft models: every layer reads the target model's K/V (num_kv_shared_layers = all); no standalone build
    "gemma4_assistant": "hidden_size_per_layer_input must be 0",
    "gemma4_unified_assistant": "set of layer types producing a cache",
    "moshi": "disagrees with itself",
    "recurrent_gemma": "carries no cache",  # keeps its state inside the model
    "reformer": "axial_pos_embds",
}

NO_REFERENCE: dict[str, str] = {  # model_type: why no independent reference applies (none today)
}

KNOWN_BROKEN: dict[str, str] = {}  # model_type: what goes wrong today (delete an entry when its fix lands)


@functools.lru_cache(maxsize=None)
def outcome(model_type: str):
    """The sweep of one architecture (once per session), on one thread: tiny models run faster so."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return sweep_one(model_type)
    finally:
        torch.set_num_threads(threads)


def _param(model_type: str):
    if model_type in KNOWN_BROKEN:
        return pytest.param(model_type, marks=pytest.mark.xfail(strict=True, reason=KNOWN_BROKEN[model_type]))
    return model_type


def test_expectation_lists_name_real_architectures():
    listed = [*REFUSED, *NOT_RUNNABLE, *NO_REFERENCE, *KNOWN_BROKEN]
    assert not set(listed) - set(MODEL_TYPES), "listed but not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"
    assert len(listed) == len(set(listed)), "an architecture is in two lists"


@pytest.mark.parametrize("model_type", [_param(mt) for mt in MODEL_TYPES])
def test_architecture(model_type):
    result = outcome(model_type)
    summary = f"{model_type}: {result.outcome} — {result.detail}"
    if model_type in REFUSED:
        assert result.outcome == "refused", summary
        assert REFUSED[model_type] in result.detail, summary
    elif model_type in NOT_RUNNABLE:
        assert result.outcome == "not runnable", summary
        assert NOT_RUNNABLE[model_type] in result.detail, summary
    elif model_type in NO_REFERENCE:
        assert result.outcome == "no reference", summary
        assert NO_REFERENCE[model_type] in result.detail, summary
    else:
        assert result.outcome == "shares", summary


@pytest.mark.parametrize("model_type", ["llama", "xglm", "bloom"])  # interface, projection, cache reference
def test_reference_tells_sources_apart(model_type):
    """The reference is not loose: sharing 2->0, 3->1 does not match the reference for 2->1, 3->0."""
    from arch_sweep import SharingPolicy, build_model, prompt_ids, reference_for, run_modes, share_kv, tolerance

    model, ids = build_model(model_type), prompt_ids()
    with share_kv(model, SharingPolicy.from_pairs(4, {2: 0, 3: 1})):
        shared = run_modes(model, ids)["uncached"]  # [2, 48, V]
    other, _ = reference_for(model_type, model, ids, [0, 1, 1, 0])
    assert (shared - other).abs().max().item() > 100 * tolerance(other)


def test_fallback_references_agree_with_the_attention_interface_one():
    """Where all three apply (Llama: attention interface, k/v_proj, full attention), they give the same logits."""
    from arch_sweep import (build_model, cache_reference_logits, projection_reference_logits, prompt_ids,
                            reference_logits, tolerance)

    model, ids = build_model("llama"), prompt_ids()
    share_map = [0, 1, 0, 1]
    want, _ = reference_logits(model, ids, share_map)  # [2, 48, V]
    for fallback in (projection_reference_logits, cache_reference_logits):
        got = fallback(model, ids, share_map)
        assert (got - want).abs().max().item() <= tolerance(want), fallback.__name__


# ------------------------------------------------------------------------------------------------
# docs/adding-a-model.md lists what this sweep shows (regenerate: python tests/test_architecture_sweep.py)
# ------------------------------------------------------------------------------------------------

DOC = Path(__file__).resolve().parents[1] / "docs" / "adding-a-model.md"
BEGIN = "<!-- architectures: generated by `python tests/test_architecture_sweep.py` from its expectation lists -->"
END = "<!-- /architectures -->"


def architectures_section() -> str:
    """The page's list: the architectures that share (every one the lists do not name; ``test_architecture``
    holds each to its list), then the refused ones with their reason."""
    import transformers

    sharing = [mt for mt in MODEL_TYPES if mt not in {**REFUSED, **NOT_RUNNABLE, **NO_REFERENCE, **KNOWN_BROKEN}]
    reasons: dict[str, list[str]] = {}
    for model_type, reason in REFUSED.items():
        reasons.setdefault(reason, []).append(model_type)
    lines = [BEGIN, "",
             f"Tested on transformers {transformers.__version__}: {len(sharing)} of the {len(MODEL_TYPES)} causal-LM "
             "architectures share (uncached, cached and token-by-token decoding equal an independent K/V "
             "substitution inside attention, prompts longer than the sliding windows):", "",
             ", ".join(f"`{mt}`" for mt in sharing), "",
             f"Refused before any job, with the reason ({len(REFUSED)}):", ""]
    lines += [f"- {reason}: " + ", ".join(f"`{mt}`" for mt in sorted(types)) for reason, types in reasons.items()]
    lines += ["", f"Not runnable as tiny models here, with or without kvsharer ({len(NOT_RUNNABLE)}): "
              + ", ".join(f"`{mt}`" for mt in NOT_RUNNABLE), "", END]
    return "\n".join(lines)


def rewrite(text: str) -> str:
    head, rest = text.split(BEGIN, 1)
    return head + architectures_section() + rest.split(END, 1)[1]


def test_the_adding_a_model_page_lists_the_architectures_of_this_sweep():
    text = DOC.read_text()
    assert BEGIN in text and END in text, f"{DOC} has no generated architectures section"
    assert text == rewrite(text), "docs/adding-a-model.md is stale: run python tests/test_architecture_sweep.py"


if __name__ == "__main__":
    DOC.write_text(rewrite(DOC.read_text()))
    print(f"wrote the architectures section of {DOC}")
