#!/usr/bin/env bash
# Set up (first run) and run the whole test suite: the single-process tests (which also
# start real mpiexec/torchrun jobs), then the multi-rank pytest runs under mpiexec -n 2
# (pytest-mpi) and torchrun --nproc-per-node 2, each under a hard timeout so a hang fails
# fast. Each multi-rank run skips the other launcher's modules. Extra arguments go to the
# single-process pytest run (e.g. -k worker). The cluster tests (-m slurm, -m netns) skip,
# saying why, where they cannot run (not root, Slurm not installed:
# scripts/setup_cluster_tests.sh).
set -euo pipefail
# shellcheck disable=SC1091
source "$(dirname "$0")/setup.sh"
SUITE_START=$SECONDS
trap 'echo "== test suite: $(( (SECONDS - SUITE_START) / 60 )) min $(( (SECONDS - SUITE_START) % 60 )) s (exit $?)"' EXIT

echo "== lint: ruff check and ruff format --check (rules and line length in pyproject.toml)"
ruff check .
ruff format --check .

echo "== single-process tests (they launch real 2-rank jobs, a Ray cluster, Slurm and two-node jobs too)"
# Two pytest workers, a test file each at a time: most tests start processes (mpiexec,
# torchrun, Ray, Slurm) and wait on them, so two files overlap even on two cores. Most of the
# time is job start-up (each rank imports diffusers and a pipeline before any work).
timeout 1500 python -m pytest -q -n 2 --dist loadfile --ignore=tests/multirank --durations=15 "$@"

echo "== multi-rank tests: mpiexec -n 2 (pytest-mpi)"
timeout 600 mpiexec -n 2 python -m pytest -q -p no:cacheprovider --with-mpi tests/multirank

echo "== multi-rank tests: torchrun --nproc-per-node 2"
timeout 600 torchrun --nproc-per-node 2 -m pytest -q -p no:cacheprovider tests/multirank

echo "== multi-rank tests: torchrun --nproc-per-node 4 (every family: tp 2 x dp 2, cfg 2 x dp 2, tp 2 x cfg 2;"
echo "   every DiT family: ulysses 2 x ring 2, sp 2 x tp 2, sp 2 x cfg 2, sp 2 x dp 2)"
timeout 600 torchrun --nproc-per-node 4 -m pytest -q -p no:cacheprovider tests/multirank/test_parallel_torchrun.py \
    -k "tp2_matches_single_rank or cfg_parallel_matches_single_rank or tp2_and_cfg2 or sequence_parallel or every_guided or every_block or tp2_with_cfg2 or vae_parallel or quantized"
