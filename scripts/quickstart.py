"""Generate a few images with the embedded tiny model through two worker processes.

    .venv/bin/python scripts/quickstart.py [OUTPUT_DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

from spmd_diffusion import DiffusionEngine, OmniDiffusionConfig, OmniDiffusionRequest

PROMPTS = ["a lighthouse at dusk", "a red bicycle", "a bowl of ramen", "a snowy forest"]


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "out/quickstart")
    out.mkdir(parents=True, exist_ok=True)
    requests = [
        OmniDiffusionRequest(prompt=p, num_inference_steps=4, height=64, width=64, request_id=f"{i:02d}")
        for i, p in enumerate(PROMPTS)
    ]
    with DiffusionEngine(OmniDiffusionConfig(model="tiny-unet", num_gpus=2)) as engine:
        for output in engine.generate(requests):
            if output.error:
                print(f"{output.request_id}: error: {output.error}")
                continue
            path = out / f"{output.request_id}.png"
            output.images[0][0].save(path)
            print(f"{output.request_id}: seed {output.seeds[0][0]} -> {path}")


if __name__ == "__main__":
    main()
