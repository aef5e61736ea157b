#!/usr/bin/env bash
# Run by Snakemake inside envs/serving.yaml's environment right after creating it (from Snakemake's working
# directory: the repository root, where `snakemake --profile slurm ...` runs; elsewhere set KVSHARER_REPO).
set -euo pipefail
repo="${KVSHARER_REPO:-.}"
if [ ! -f "$repo/src/kvsharer/serving/vllm_plugin.py" ]; then
    echo "serving.post-deploy.sh: $repo is not the kvsharer-pipeline repository: set KVSHARER_REPO" >&2
    exit 1
fi
pip uninstall --quiet --yes torchvision torchaudio torchcodec
pip install --quiet --no-deps -e "$repo"
python -c "import vllm, kvsharer.serving.vllm_plugin; print('vllm', vllm.__version__)"
