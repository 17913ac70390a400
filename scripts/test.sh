#!/usr/bin/env bash
# Set up (first run) and run the whole test suite:
#   - creates/uses the virtual environment .venv (or the one already active),
#   - installs the CPU build of torch where no NVIDIA GPU is present,
#   - installs the package with its mpi and test extras,
#   - runs the single-process tests, then the multi-rank tests under mpiexec and torchrun,
#     each under a hard timeout so a hang fails fast.
# Extra arguments go to the single-process pytest run (e.g. -k worker).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${VIRTUAL_ENV:-}" ]]; then
    [[ -x .venv/bin/python ]] || python3 -m venv .venv
    # shellcheck disable=SC1091
    source .venv/bin/activate
fi

if ! python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        python -m pip install "torch>=2.4,<3"
    else
        python -m pip install "torch==2.13.0" || python -m pip install "torch>=2.4,<3" --index-url https://download.pytorch.org/whl/cpu
    fi
fi
python -m pip install -q -e ".[mpi,test]"

export SPMD_DIFFUSION_CACHE="${SPMD_DIFFUSION_CACHE:-$PWD/.cache/spmd_diffusion}"
export TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

echo "== single-process tests"
timeout 900 python -m pytest -q "$@"

echo "== multi-rank tests: mpiexec -n 2 (pytest-mpi)"
timeout 600 mpiexec -n 2 python -m pytest -q -p no:cacheprovider --with-mpi tests/multirank/test_mpi_executor.py

echo "== multi-rank tests: torchrun --nproc-per-node 2"
timeout 600 torchrun --nproc-per-node 2 -m pytest -q -p no:cacheprovider tests/multirank/test_torchrun_executor.py
