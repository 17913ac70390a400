#!/usr/bin/env bash
# Set up (first run) and run the main job on the embedded tiny model: a small batch
# generation under mpirun with 2 ranks. Output: out/demo/ (images/, manifest.jsonl,
# run.json, contact_sheet.png). Extra arguments go to `omni-diffuse generate`.
set -euo pipefail
# shellcheck disable=SC1091
source "$(dirname "$0")/setup.sh"

mpirun -n 2 omni-diffuse generate \
    --prompts scripts/demo_prompts.txt --output out/demo \
    --steps 8 --height 64 --width 64 --batch-size 2 "$@"
echo "done: see out/demo/contact_sheet.png and out/demo/manifest.jsonl"
