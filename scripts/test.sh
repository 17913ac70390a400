#!/usr/bin/env bash
# Set up (first run) and run the whole test suite: the single-process tests (which also
# start real mpiexec/torchrun jobs), then the multi-rank pytest runs under mpiexec -n 2
# (pytest-mpi) and torchrun --nproc-per-node 2, each under a hard timeout so a hang fails
# fast. Each multi-rank run skips the other launcher's modules. Extra arguments go to the
# single-process pytest run (e.g. -k worker). The cluster tests (-m slurm, -m netns) run
# apart, under their own timeout; they skip, saying why, where they cannot run (not root,
# Slurm not installed: scripts/setup_cluster_tests.sh).
set -euo pipefail
# shellcheck disable=SC1091
source "$(dirname "$0")/setup.sh"

echo "== single-process tests (they launch real 2-rank jobs too)"
timeout 900 python -m pytest -q -m "not slurm and not netns" "$@"

echo "== cluster tests: the jobs/ scripts on a one-node Slurm, two nodes in network namespaces (root only)"
timeout 900 python -m pytest -q -p no:cacheprovider -m "slurm or netns"

echo "== multi-rank tests: mpiexec -n 2 (pytest-mpi)"
timeout 600 mpiexec -n 2 python -m pytest -q -p no:cacheprovider --with-mpi tests/multirank

echo "== multi-rank tests: torchrun --nproc-per-node 2"
timeout 600 torchrun --nproc-per-node 2 -m pytest -q -p no:cacheprovider tests/multirank
