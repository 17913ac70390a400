#!/usr/bin/env bash
# Set up a working environment on a fresh machine (idempotent); meant to be sourced:
#   source scripts/setup.sh
# - creates/uses the virtual environment .venv (or the one already active),
# - installs the CPU build of torch where no NVIDIA GPU is present (a plain `torch`
#   requirement could pull a multi-GB CUDA build),
# - installs this package with its mpi (mpi4py + mpich), serve, datasets (pyarrow, datasets,
#   webdataset), lora (peft), ray, video (imageio-ffmpeg), quant (torchao) and test extras.
set -euo pipefail
SPMD_DIFFUSION_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$SPMD_DIFFUSION_ROOT"

if [[ -z "${VIRTUAL_ENV:-}" ]]; then
    [[ -x .venv/bin/python ]] || python3 -m venv .venv
    # shellcheck disable=SC1091
    source .venv/bin/activate
fi

if ! python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        python -m pip install "torch>=2.4,<3"
    else
        python -m pip install "torch==2.13.0" \
            || python -m pip install "torch>=2.4,<3" --index-url https://download.pytorch.org/whl/cpu
    fi
fi
python -m pip install -q -e ".[mpi,serve,datasets,lora,ray,video,quant,test]"

export SPMD_DIFFUSION_CACHE="${SPMD_DIFFUSION_CACHE:-$SPMD_DIFFUSION_ROOT/.cache/spmd_diffusion}"
export TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
