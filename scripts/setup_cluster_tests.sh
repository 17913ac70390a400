#!/usr/bin/env bash
# Install what the real-cluster tests need, where this machine allows it (root + apt-get):
#   slurm-wlm + munge  -> tests/cluster/test_slurm_jobs.py (-m slurm): a one-node Slurm the test starts
#   iproute2           -> tests/cluster/test_two_nodes.py (-m netns): two nodes simulated by network namespaces
# Elsewhere it says why and succeeds: those tests then skip with the same reason.
# CI runs it from .ci/run; nothing else calls it (scripts/setup.sh never touches the system).
set -uo pipefail

if [[ "$(id -u)" != 0 ]]; then
    echo "setup_cluster_tests: not root: the Slurm and two-node tests will be skipped"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup_cluster_tests: no apt-get: install slurm-wlm and munge yourself, or the Slurm tests skip"
    exit 0
fi
if command -v slurmctld >/dev/null 2>&1 && command -v munged >/dev/null 2>&1 && command -v ip >/dev/null 2>&1; then
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
packages=(slurm-wlm munge iproute2)
apt-get install -y -q "${packages[@]}" >/dev/null \
    || { apt-get update -q >/dev/null && apt-get install -y -q "${packages[@]}" >/dev/null; } \
    || echo "setup_cluster_tests: could not install ${packages[*]}: the Slurm tests will be skipped"
exit 0
