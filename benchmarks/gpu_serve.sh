#!/usr/bin/env bash
# benchmarks/serve.py on a lent CUDA GPU: plain vLLM vs vLLM serving spread sharing policies (12.5 / 25 /
# 37.5 % of the layers) at one fixed KV-cache budget, on a random-weight model of a real 7B/8B shape
# (vLLM's load_format=dummy: weights drawn from config.json alone, nothing downloaded, no tokenizer).
#
#   PYTHON=/path/to/venv-with-vllm/bin/python bash benchmarks/gpu_serve.sh [OUT_DIR]
#   MODELS="llama-2-7b llama-3.1-8b mistral-7b qwen2.5-7b" KV_MIB=8192 bash benchmarks/gpu_serve.sh
#   bash benchmarks/gpu_serve.sh --smoke [OUT_DIR]    # the same pipeline at toy size on the CPU (.venv-serve)
#
# The interpreter needs vLLM for CUDA (PyPI `vllm`, beside torch for CUDA) and this package installed
# --no-deps (`pip install --no-deps -e .`: the plugin's entry point). The searched SmolLM2 policies have 30
# layers and do not fit a 32-layer model: the arms are spread policies (blocks and concurrency depend only on
# how many layers share). Writes OUT_DIR/<model>/config.json (the shape) and OUT_DIR/<model>.json (serve.py's
# output: blocks, concurrency, tokens/s, latency per arm, ratios to plain).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

if [ "${1:-}" = "--smoke" ]; then
  shift
  PY=${PYTHON:-.venv-serve/bin/python}
  OUT=${1:-results/gpu_serve_smoke}
  MODELS=tiny-llama
  ARGS=(--dtype float32 --kv-cache-mib 4 --requests 8 --prompt-tokens 16 --new-tokens 8 --fp8 "" --one-at-a-time)
else
  PY=${PYTHON:-python}
  OUT=${1:-results/gpu_serve}
  MODELS=${MODELS:-"llama-2-7b llama-3.1-8b"}
  "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else
            'gpu_serve.sh: no CUDA GPU on this machine (--smoke runs the same pipeline at toy size on the CPU)')"
  # 8 GiB of KV cache for every arm; 512 requests of 512 prompt + 256 new tokens fill it several times over
  ARGS=(--dtype float16 --kv-cache-mib "${KV_MIB:-8192}" --block-size 16 --requests "${REQUESTS:-512}"
        --prompt-tokens 512 --new-tokens 256 --max-num-seqs 1024 --no-eager --fp8 "plain,spread25%" --one-at-a-time)
fi

mkdir -p "$OUT"
for model in $MODELS; do
  "$PY" - "$model" "$OUT/$model" <<'PYEOF'
import json, sys
from pathlib import Path
from kvsharer.models.shapes import SHAPES

name, folder = sys.argv[1], Path(sys.argv[2])
s = SHAPES[name]
arch = s.architecture or "LlamaForCausalLM"
config = {
    "architectures": [arch], "model_type": s.family, "vocab_size": s.vocab, "hidden_size": s.hidden,
    "intermediate_size": s.intermediate, "num_hidden_layers": s.layers, "num_attention_heads": s.heads,
    "num_key_value_heads": s.kv_heads, "max_position_embeddings": s.max_positions or 4096,
    "rope_theta": s.rope_theta, "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": s.tied_embeddings,
    "torch_dtype": "float16", "bos_token_id": 1, "eos_token_id": 2,
}
if s.head_dim:
    config["head_dim"] = s.head_dim
if s.qkv_bias:
    config["attention_bias"] = True
folder.mkdir(parents=True, exist_ok=True)
(folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
print(f"gpu_serve: {name} ({arch}, {s.layers} layers) -> {folder}")
PYEOF
  "$PY" benchmarks/serve.py --model "$OUT/$model" --load-format dummy "${ARGS[@]}" --out "$OUT/$model.json"
done
