"""Run inside a fresh venv that has only the installed wheel (tests/test_install.py): share_kv on a tiny random
Llama, Qwen2 and Mistral must store 6/8 of the plain KV bytes with 2 of 8 layers shared, an identity policy must
leave the logits bit-equal, and leaving the block must restore the model. Prints one JSON line (versions and what
it found) and exits 1 when anything differs."""

from __future__ import annotations

import json
import sys

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

import kvsharer
from kvsharer import SharingPolicy, cache_nbytes, share_kv

FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
            "mistral": (MistralConfig, MistralForCausalLM)}


def tiny(config_cls, model_cls):
    config = config_cls(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0)
    torch.manual_seed(0)
    return model_cls(config).eval()


def main() -> int:
    """One JSON line: the versions, and per family the KV ratio (6/8 expected), whether an identity policy kept
    the logits bit-equal and whether leaving the block restored the model. Exit 1 unless all hold."""
    tokens = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    families = {}
    for name, (config_cls, model_cls) in FAMILIES.items():
        model = tiny(config_cls, model_cls)
        with torch.no_grad():
            plain = model(tokens, use_cache=True)
            with share_kv(model, SharingPolicy.identity(8)):
                identity = torch.equal(model(tokens).logits, plain.logits)
            with share_kv(model, SharingPolicy.from_pairs(8, {3: 1, 6: 2})):
                shared = model(tokens, use_cache=True)
                generated = model.generate(tokens, max_new_tokens=4, do_sample=False, pad_token_id=0)
            restored = torch.equal(model(tokens).logits, plain.logits)
        families[name] = {"kv_ratio": cache_nbytes(shared.past_key_values) / cache_nbytes(plain.past_key_values),
                          "identity_bit_equal": identity, "restored": restored,
                          "generated": list(generated.shape)}
    ok = all(f == {"kv_ratio": 0.75, "identity_bit_equal": True, "restored": True, "generated": [2, 16]}
             for f in families.values())
    print(json.dumps({"python": sys.version.split()[0], "torch": torch.__version__,
                      "transformers": transformers.__version__, "kvsharer": kvsharer.__file__, "ok": ok,
                      "families": families}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
