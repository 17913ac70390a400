#!/usr/bin/env bash
# The GPU check (issue 15): one prepared script, ~5 minutes on a one-GPU, 16-core machine.
#
#   bash scripts/gpu_check.sh [--cpu-smoke] [--parts a,b,c,d] [--dp-ranks 1,2,4,8] [--rpc-ranks 8]
#
# (a) tiny-unet / tiny-dit: `omni-diffuse generate` with no launcher and under `mpiexec -n 2`
#     (two replicas on the one GPU), PNGs compared; (b) an SD-1.5-sized random-weight fp16
#     pipeline built locally, a plain diffusers loop vs `generate` (no launcher, mpiexec -n 1,
#     mpiexec -n 2) at 512x512, 30 steps, batch 4; (c) `--tp 2` / `--cfg-parallel` under
#     mpiexec -n 2 on one GPU (a clear refusal expected, not a hang) and with --device cpu;
#     (d) data-parallel scaling on the CPU cores at 1/2/4/8 ranks and the RPC round trip at
#     8 ranks. Details: scripts/gpu_check.py. Without a GPU every part runs at smoke sizes on
#     the CPU and the GPU-only steps are skipped, with the reason.
#
# Output: $OUT when set (the device machine's folder that comes back), else out/gpu_check/:
#   gpu_check.log (everything printed), summary.md, results.json, logs.tar.gz.
# Work files (models, images): $GPU_CHECK_WORK, default /tmp/gpu_check_work under $OUT,
# else out/gpu_check/work.
#
# Python: $GPU_CHECK_PYTHON if set; else this repo's .venv when it has diffusers, torch and
# mpi4py (a developer machine after `source scripts/setup.sh`); else a venv made at
# $GPU_CHECK_VENV (default /tmp/gpu_check_venv) from the machine's torch Python
# (`python3`, or /opt/torch/.venv/bin/python3) with --system-site-packages, plus the wheels
# in $GPU_CHECK_WHEELS (default .whl/: diffusers, mpich, mpi4py for cp312) and this repo
# (editable). The wheels go into a venv, not `pip install --target`: --target drops the
# mpich wheel's lib/ folder and mpi4py then cannot find libmpi. GPU_CHECK_SETUP=wheels
# forces that venv path. Total budget: $GPU_CHECK_BUDGET_S seconds (default 340), from start:
# steps that no longer fit are skipped and reported as such.
#
# On the device machine (wheels fetched once here, see benchmarks/RESULTS.md, GPU check):
#   run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=370)
# (~45 s more for the machine's start; on an H200 the first version of this script needed
# ~60 s before its first step and ~24 s per step, hence the concurrent first phase.)
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
START_S=$(date +%s)
export GPU_CHECK_DEADLINE=$((START_S + ${GPU_CHECK_BUDGET_S:-340}))
if [[ -n "${OUT:-}" ]]; then
    OUT_DIR="$OUT"
    WORK="${GPU_CHECK_WORK:-/tmp/gpu_check_work}"
else
    OUT_DIR="$ROOT/out/gpu_check"
    WORK="${GPU_CHECK_WORK:-$ROOT/out/gpu_check/work}"
fi
mkdir -p "$OUT_DIR" "$WORK"

has_stack() {  # has_stack PYTHON: torch, diffusers, mpi4py (with a loadable libmpi) and this package
    "$1" -c "import torch, diffusers, spmd_diffusion; from mpi4py import MPI" >/dev/null 2>&1
}

make_venv() {
    local venv="${GPU_CHECK_VENV:-/tmp/gpu_check_venv}" wheels="${GPU_CHECK_WHEELS:-$ROOT/.whl}" base site
    if [[ -x "$venv/bin/python" ]] && has_stack "$venv/bin/python"; then
        echo "reusing $venv"
        PY="$venv/bin/python"
        return 0
    fi
    base="${GPU_CHECK_BASE_PYTHON:-python3}"
    if ! "$base" -c "import torch" >/dev/null 2>&1 && [[ -x /opt/torch/.venv/bin/python3 ]]; then
        base=/opt/torch/.venv/bin/python3
    fi
    echo "base python: $(command -v "$base") ($("$base" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)' 2>&1))"
    rm -rf "$venv"
    if ! "$base" -m venv --system-site-packages "$venv"; then
        echo "venv with pip failed; making one without pip and installing with the base pip"
        "$base" -m venv --without-pip --system-site-packages "$venv" || return 1
        PIP=("$base" -m pip --python "$venv/bin/python")
    else
        PIP=("$venv/bin/python" -m pip)
    fi
    # --system-site-packages reaches the interpreter the base venv was made from, not the
    # base venv's own site-packages (where torch lives when the base is itself a venv):
    # add those explicitly, after the new venv's own (so the carried wheels win).
    site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    "$base" -c 'import site; print("\n".join(site.getsitepackages()))' | while read -r dir; do
        echo "import site; site.addsitedir('$dir')"
    done >"$site/_gpu_check_base_site.pth"
    ls "$wheels"/*.whl || { echo "no wheels in $wheels"; return 1; }
    # --ignore-installed: the image's own mpi4py (linked to an unknown MPI) must not satisfy it.
    "${PIP[@]}" install -q --no-index --no-deps --no-compile --no-cache-dir --ignore-installed \
        "$wheels"/*.whl || return 1
    if ! "${PIP[@]}" install -q --no-index --no-deps --no-build-isolation -e "$ROOT"; then
        echo "editable install failed: putting the repo on the path and writing an omni-diffuse wrapper"
        echo "$ROOT" >"$site/_spmd_diffusion_repo.pth"
        printf '#!%s\nimport sys\nfrom spmd_diffusion.cli import main\nsys.exit(main())\n' \
            "$venv/bin/python" >"$venv/bin/omni-diffuse"
        chmod +x "$venv/bin/omni-diffuse"
    fi
    PY="$venv/bin/python"
}

main() {
    echo "== gpu_check $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname 2>/dev/null || cat /etc/hostname), $(nproc) CPUs, repo $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo "== nvidia-smi"
    timeout 30 nvidia-smi || echo "(nvidia-smi not available here: rc=$?)"
    echo "== python environment"
    PY=""
    if [[ -n "${GPU_CHECK_PYTHON:-}" ]]; then
        PY="$GPU_CHECK_PYTHON"
    elif [[ "${GPU_CHECK_SETUP:-auto}" != wheels && -x "$ROOT/.venv/bin/python" ]] && has_stack "$ROOT/.venv/bin/python"; then
        PY="$ROOT/.venv/bin/python"
    else
        local setup_start=$SECONDS
        make_venv || { echo "FATAL: could not set up the Python environment"; return 2; }
        echo "venv set up in $((SECONDS - setup_start)) s"
    fi
    echo "python: $PY"
    # One import check that also prints the versions (each Python start costs seconds there).
    if ! "$PY" -c "import sys, torch, diffusers, transformers, mpi4py, spmd_diffusion; from mpi4py import MPI
print('python', sys.version.split()[0], '| torch', torch.__version__, 'cuda', torch.version.cuda,
      '| diffusers', diffusers.__version__, '| transformers', transformers.__version__,
      '| mpi4py', mpi4py.__version__, '|', MPI.Get_library_version().splitlines()[0].strip())"; then
        echo "FATAL: $PY lacks torch/diffusers/transformers/mpi4py (with libmpi)/spmd_diffusion"
        return 2
    fi
    echo "mpiexec: $(dirname "$PY")/mpiexec"
    "$PY" "$ROOT/scripts/gpu_check.py" --out "$OUT_DIR" --work "$WORK" "$@"
}

main "$@" 2>&1 | tee "$OUT_DIR/gpu_check.log"
rc=${PIPESTATUS[0]}
echo "== gpu_check finished: exit $rc after $(( $(date +%s) - START_S )) s; summary: $OUT_DIR/summary.md" | tee -a "$OUT_DIR/gpu_check.log"
exit "$rc"
