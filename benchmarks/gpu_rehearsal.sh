#!/usr/bin/env bash
# The rehearsal of config/paper.yaml (kvsharer.rehearsal) at full width on one CUDA GPU, without Slurm:
# stand-ins with heads 128 wide (the real hidden and MLP sizes: Llama-2-7B's 6.74B parameters, Mistral-7B's
# 7.25B) and random fp16 weights, the `ci` cut's grid, two models: llama2-7b-chat (MHA 32/32) and
# mistral-7b-instruct (GQA 32/8). Meant to take under 10 minutes on an 80 GB GPU; not run on the CPU
# machine it was written on.
#
#   bash benchmarks/gpu_rehearsal.sh [OUT_DIR]        # default OUT_DIR results-gpu-rehearsal
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${1:-results-gpu-rehearsal}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu_rehearsal.sh: no CUDA GPU here')"

"$PY" -m kvsharer rehearsal-config --paper config/paper.yaml --cut ci --models llama2-7b-chat,mistral-7b-instruct \
  --head-dim 128 --dtype float16 --gpus 1 --out "$OUT/config.yaml"
# one GPU: one model job at a time (--resources gpu=1); CPU jobs beside it
"$PY" -m snakemake --snakefile "$PWD/Snakefile" --directory "$OUT" --configfile "$OUT/config.yaml" \
  --cores all --resources gpu=1 --keep-going
"$PY" -m snakemake --snakefile "$PWD/Snakefile" --directory "$OUT" --configfile "$OUT/config.yaml" \
  --report "$PWD/$OUT/report.html"
echo "gpu_rehearsal: tables in $OUT/results/tables, report $OUT/report.html"
