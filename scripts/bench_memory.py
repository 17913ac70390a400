"""Benchmark: what each --quantize kind saves and costs on a deep DiT, in one process.

A PixArt-shaped transformer (12 blocks, 8 heads x 64 = 512 wide, 1024 image tokens, 120
caption tokens, random weights, fp32, one torch thread) is quantized per kind through
diffusers' own path (``TorchAoConfig`` over the saved model, as ``--quantize`` loads it);
for each kind: the denoiser's weights as stored (quantized tensors counted by what they
really hold) against fp32, one denoiser call's median time against the unquantized one, and
the PSNR of the output (the noise prediction, on its own range) against the unquantized
output. Kinds this machine cannot run (the probe of ``--quantize``) are reported as refused.

Run::

    export OMP_NUM_THREADS=1
    timeout 1800 python scripts/bench_memory.py --json /tmp/memory.json
"""

# ruff: noqa: PLC0415 - heavy modules load on first use (diffusers)

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from spmd_diffusion.models.quantization import KINDS, backend_config, probe, storage_bytes


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kinds", default="int8wo,int8dq,float8wo,int4wo,float8dq")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", default=None)
    return parser.parse_args()


def build(directory: Path) -> None:
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    PixArtTransformer2DModel(
        num_attention_heads=8,
        attention_head_dim=64,
        num_layers=12,
        in_channels=4,
        out_channels=8,
        cross_attention_dim=512,
        caption_channels=512,
        sample_size=32,
        patch_size=1,
    ).save_pretrained(directory)


def inputs() -> dict:
    generator = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(1, 4, 32, 32, generator=generator),
        "encoder_hidden_states": torch.randn(1, 120, 512, generator=generator),
        "timestep": torch.tensor([500]),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        "return_dict": False,
    }


def run(model: torch.nn.Module, rounds: int) -> tuple[torch.Tensor, float]:
    args, seconds = inputs(), []
    with torch.inference_mode():
        output = model(**args)[0]
        for _ in range(rounds):
            start = time.perf_counter()
            model(**args)
            seconds.append(time.perf_counter() - start)
    return output, statistics.median(seconds)


def psnr(reference: torch.Tensor, other: torch.Tensor) -> float:
    peak = float(reference.max() - reference.min())
    error = float(((reference - other) ** 2).mean())
    return float("inf") if error == 0 else 10 * torch.log10(torch.tensor(peak**2 / error)).item()


def main() -> None:
    from diffusers import PixArtTransformer2DModel

    args = parse_args()
    torch.set_num_threads(1)
    results: dict = {"kinds": {}}
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp))
        plain = PixArtTransformer2DModel.from_pretrained(tmp, torch_dtype=torch.float32).eval()
        reference, base_s = run(plain, args.rounds)
        base_bytes = storage_bytes(plain)
        results["fp32"] = {"weight_bytes": base_bytes, "seconds": base_s}
        print(
            "| kind | weights (MiB) | vs fp32 | denoiser call (s) | speed vs fp32 "
            "| PSNR vs fp32 (dB) |"
        )
        print("|---|---:|---:|---:|---:|---:|")
        print(f"| fp32 | {base_bytes / 2**20:.1f} | 1.00x | {base_s:.3f} | 1.00x | - |")
        for kind in args.kinds.split(","):
            if kind not in KINDS:
                sys.exit(f"unknown kind {kind}")
            try:
                probe(kind, "cpu")
            except ValueError as exc:
                results["kinds"][kind] = {"refused": str(exc)}
                print(f"| {kind} | refused: {exc} | | | | |")
                continue
            model = PixArtTransformer2DModel.from_pretrained(
                tmp, torch_dtype=torch.float32, quantization_config=backend_config(kind)
            ).eval()
            output, seconds = run(model, args.rounds)
            stored = storage_bytes(model)
            row = {
                "weight_bytes": stored,
                "weight_fraction": stored / base_bytes,
                "seconds": seconds,
                "speed": base_s / seconds,
                "psnr_db": psnr(reference, output),
            }
            results["kinds"][kind] = row
            print(
                f"| {kind} | {stored / 2**20:.1f} | {row['weight_fraction']:.2f}x "
                f"| {seconds:.3f} | {row['speed']:.2f}x | {row['psnr_db']:.1f} |",
                flush=True,
            )
    line = json.dumps(results)
    print(line)
    if args.json:
        Path(args.json).write_text(line + "\n")


if __name__ == "__main__":
    main()
