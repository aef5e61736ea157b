#!/usr/bin/env bash
# Memory and speed vs sharing rate (and cache methods) on a lent GPU, with random-initialised models of
# real shapes in fp16 (kvsharer.models.shapes: weights do not change the cost, so nothing is downloaded).
#
#   bash benchmarks/gpu_profile.sh [OUT_DIR]           # on a CUDA GPU (default OUT_DIR results/gpu_profile)
#   MODELS="llama-2-7b mistral-7b" bash benchmarks/gpu_profile.sh
#   bash benchmarks/gpu_profile.sh --smoke [OUT_DIR]   # the same pipeline at toy size on the CPU
#
# Writes OUT_DIR/<model>.csv (the profile stage's CSV: model, rate, intra, budget, batch, context,
# kv_bytes, peak_bytes, prefill_s, decode_tok_s, ...), OUT_DIR/figures/profile_{memory,throughput}.{png,pdf},
# and OUT_DIR/ratios.json: every setting's KV bytes, peak memory, decode throughput and largest batch as
# ratios to the plain model measured in the same run (printed too).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

if [ "${1:-}" = "--smoke" ]; then
  shift
  OUT=${1:-results/gpu_profile_smoke}
  MODELS=tiny-llama DEVICE=cpu DTYPE=float32
  GRID=(--rates 0,0.5 --cache none,h2o:0.5,int4 --batch-sizes 1,2 --contexts 32 --new-tokens 2 --repeats 1
        --memory-gb 0.05)
else
  OUT=${1:-results/gpu_profile}
  MODELS=${MODELS:-"llama-2-7b llama-3.1-8b"} DEVICE=cuda DTYPE=float16
  "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else
            'gpu_profile.sh: no CUDA GPU on this machine (--smoke runs the same pipeline at toy size on the CPU)')"
  # H2O/PyramidInfer score with eager fp32 attention: their large prefills may not fit and are kept as
  # empty *_oom rows rather than ending the run.
  GRID=(--rates 0,0.125,0.25,0.375,0.5 --cache none,h2o:0.5,pyramidinfer:0.5,int8,int4,minicache:0.25
        --batch-sizes 1,8 --contexts 1024,4096 --new-tokens 64 --repeats 2 --memory-gb 80 --max-measured-batch 64)
fi

mkdir -p "$OUT"
for model in $MODELS; do
  echo "gpu_profile: $model ($DTYPE on $DEVICE) -> $OUT/$model.csv"
  "$PY" -m kvsharer profile --model "random:$model" --name "$model" --dtype "$DTYPE" --device "$DEVICE" \
    "${GRID[@]}" --out "$OUT/$model.csv"
done
"$PY" -m kvsharer figures --profile "$OUT"/*.csv --out-dir "$OUT/figures"
"$PY" benchmarks/profile_ratios.py "$OUT"/*.csv --out "$OUT/ratios.json"
