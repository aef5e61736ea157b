#!/usr/bin/env bash
# The rehearsal of config/paper.yaml (kvsharer.rehearsal) at full width on one CUDA GPU, without Slurm:
# stand-ins with heads 128 wide (the real hidden and MLP sizes: Llama-2-7B's 6.74B parameters, Mistral-7B's
# 7.25B) and random fp16 weights, the `ci` cut's grid, two models: llama2-7b-chat (MHA 32/32) and
# mistral-7b-instruct (GQA 32/8). Sized for about 10 minutes on one 80+ GB GPU.
#
#   bash benchmarks/gpu_rehearsal.sh [OUT_DIR]        # default OUT_DIR results-gpu-rehearsal
#
# Needs the project's packages (`pip install -e '.[pipeline]'` over a CUDA build of torch) or the source tree
# on PYTHONPATH (this script adds src/) with snakemake, lm-eval, datasets, transformers importable.
# Environment:
#   PYTHON=python3         the interpreter (default: python3); the rules call `python`, so a `python` that
#                          runs it is put first on PATH
#   GPU_JOBS=1             model jobs that share the GPU at once (2 fit an 80 GB GPU at this size; 1 keeps
#                          the profile's timings alone on the GPU)
#   THREADS=4              CPU threads per model job (prepare-model draws a stand-in's random weights on the GPU
#                          it sees: on the CPU a 7B stand-in took 5 minutes)
#   REHEARSAL_DEVICE=cpu   the same script on a CPU (heads 8 wide, fp32, one thread, no GPU): checks the plumbing
# The jobs fork from one warm process (kvsharer.warm_worker: imports once, never touches CUDA itself;
# PYTORCH_NVML_BASED_CUDA_CHECK keeps torch.cuda.is_available() from initialising CUDA before a fork).
# Writes OUT_DIR/gpu_rehearsal.json: wall seconds, the evaluation results and tables written, the GPU, torch's
# version; tables in OUT_DIR/results/tables.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=$(command -v "${PYTHON:-python3}") || { echo "gpu_rehearsal.sh: no ${PYTHON:-python3} here" >&2; exit 1; }
case $PY in /*) ;; *) PY="$ROOT/$PY" ;; esac  # the jobs run in OUT_DIR
OUT=${1:-results-gpu-rehearsal}
mkdir -p "$OUT/.bin"
OUT=$(cd "$OUT" && pwd)
printf '#!/bin/sh\nexec "%s" "$@"\n' "$PY" > "$OUT/.bin/python"  # a script, not a link: a venv finds itself by its path
chmod +x "$OUT/.bin/python"
export PATH="$OUT/.bin:$PATH" PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 \
  HF_DATASETS_OFFLINE=1 PYTORCH_NVML_BASED_CUDA_CHECK=1

if [ "${REHEARSAL_DEVICE:-cuda}" = cpu ]; then
  WIDTH=8 DTYPE=float32 GPUS=0 THREADS=1
else
  python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu_rehearsal.sh: no CUDA GPU here (REHEARSAL_DEVICE=cpu runs it on a CPU)')"
  WIDTH=128 DTYPE=float16 GPUS=1 THREADS=${THREADS:-4}
fi
python -c "import snakemake, lm_eval, datasets, transformers" 2>/dev/null || {
  echo "gpu_rehearsal.sh: snakemake, lm-eval, datasets and transformers must be importable by $PY (pip install -e '.[pipeline]')" >&2
  exit 1
}

start=$(date +%s)
python -m kvsharer rehearsal-config --paper config/paper.yaml --cut ci --models llama2-7b-chat,mistral-7b-instruct \
  --head-dim "$WIDTH" --dtype "$DTYPE" --gpus "$GPUS" --threads "$THREADS" --out "$OUT/config.yaml"
# one GPU: GPU_JOBS model jobs at a time (--resources gpu=N); CPU jobs beside them
python -m kvsharer warm-worker -- python -m snakemake --snakefile "$ROOT/Snakefile" --directory "$OUT" \
  --configfile "$OUT/config.yaml" --cores all --resources gpu="${GPU_JOBS:-1}" --keep-going
python -m snakemake --snakefile "$ROOT/Snakefile" --directory "$OUT" --configfile "$OUT/config.yaml" \
  --report "$OUT/report.html"
end=$(date +%s)

python - "$OUT" $((end - start)) <<'EOF'
import json, sys
from pathlib import Path

import torch

out, wall = Path(sys.argv[1]), int(sys.argv[2])
summary = {
    "wall_s": wall,
    "results": sorted(str(p.relative_to(out)) for p in (out / "results").rglob("*.json") if "/eval/" in str(p)),
    "tables": sorted(p.name for p in (out / "results" / "tables").glob("*.md")),
    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    "torch": torch.__version__,
}
(out / "gpu_rehearsal.json").write_text(json.dumps(summary, indent=1) + "\n")
print(f"gpu_rehearsal: {wall} s wall on {summary['gpu'] or 'CPU'}; {len(summary['results'])} evaluation results, "
      f"{len(summary['tables'])} tables in {out}/results/tables; report {out}/report.html")
EOF
