"""Quantized weights (``--quantize KIND``) through diffusers' own quantization configs.

Each rank loads the checkpoint with ``from_pretrained(..., quantization_config=
PipelineQuantizationConfig(quant_mapping={component: <backend config>}))``: the weights are
quantized while they are read, every rank its own copy, so a replica of any layout gets the
same weights. Kinds and what they map to:

==========  ==================================================  ======================
kind        backend config                                      runs on
==========  ==================================================  ======================
int8wo      torchao ``Int8WeightOnlyConfig()``                   CPU, GPU
int8dq      torchao ``Int8DynamicActivationInt8WeightConfig()``  CPU, GPU
int4wo      torchao ``Int4WeightOnlyConfig()``                   torchao's int4 kernels
float8wo    torchao ``Float8WeightOnlyConfig()``                 CPU, GPU
float8dq    torchao ``Float8DynamicActivationFloat8WeightConfig()``
                                                                GPUs of compute cap. 8.9+
bnb-nf4     bitsandbytes ``load_in_4bit``, NF4                   bitsandbytes (CUDA)
bnb-int8    bitsandbytes ``load_in_8bit`` (LLM.int8())           bitsandbytes (CUDA)
==========  ==================================================  ======================

Before any model loads, rank 0 checks the kind: a known name, its package installed, and a
probe -- a small Linear quantized the same way and run once on the job's device -- so a kind
the machine cannot run is refused with the backend's own reason (the GPU capability, the
missing kernel package) instead of failing on every rank after loading.
"""

# ruff: noqa: PLC0415 - heavy modules load on first use (bitsandbytes, diffusers, torch, torchao)

from __future__ import annotations

import importlib.util
import logging
from typing import Any

KINDS = {  # kind -> (package, torchao config class or bitsandbytes mode)
    "int8wo": ("torchao", "Int8WeightOnlyConfig"),
    "int8dq": ("torchao", "Int8DynamicActivationInt8WeightConfig"),
    "int4wo": ("torchao", "Int4WeightOnlyConfig"),
    "float8wo": ("torchao", "Float8WeightOnlyConfig"),
    "float8dq": ("torchao", "Float8DynamicActivationFloat8WeightConfig"),
    "bnb-nf4": ("bitsandbytes", "nf4"),
    "bnb-int8": ("bitsandbytes", "int8"),
}
DENOISER = "denoiser"  # the component name that stands for the pipeline's transformer or unet


def check_kind(kind: str) -> None:
    """A known kind (no import of its package yet)."""
    if kind not in KINDS:
        raise ValueError(f"quantize {kind!r} is not one of {', '.join(KINDS)}")


def check_package(kind: str) -> None:
    """The kind's package is installed (found, not imported)."""
    package = KINDS[kind][0]
    if importlib.util.find_spec(package) is None:
        install = (
            "pip install 'spmd-diffusion[quant]'"
            if package == "torchao"
            else "pip install bitsandbytes"
        )
        raise ValueError(
            f"quantize {kind} needs the {package} package, which is not installed: {install}"
        )


def _import_torchao() -> Any:
    # torchao logs a warning for every prebuilt CUDA kernel library it cannot load on a
    # machine without those GPUs; they are not used here.
    logging.getLogger("torchao").setLevel(logging.ERROR)
    import torchao.quantization

    return torchao.quantization


def backend_config(kind: str) -> Any:
    """The diffusers quantization config of one component for ``kind``."""
    package, name = KINDS[kind]
    if package == "torchao":
        from diffusers import TorchAoConfig

        return TorchAoConfig(getattr(_import_torchao(), name)())
    from diffusers import BitsAndBytesConfig

    if name == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    return BitsAndBytesConfig(load_in_8bit=True)


def pipeline_config(kind: str, components: list[str]) -> Any:
    """``PipelineQuantizationConfig`` over the named components (already resolved)."""
    from diffusers import PipelineQuantizationConfig

    return PipelineQuantizationConfig(
        quant_mapping={name: backend_config(kind) for name in components}
    )


def resolve_components(components: list[str], available: list[str]) -> list[str]:
    """``denoiser`` -> the pipeline's transformer (or unet); every name must be a component."""
    resolved = []
    for name in components:
        if name == DENOISER:
            name = next(
                (candidate for candidate in ("transformer", "unet") if candidate in available), name
            )
        if name not in available:
            raise ValueError(
                f"quantize_components: {name!r} is not a component of this pipeline "
                f"({', '.join(available)})"
            )
        resolved.append(name)
    return resolved


def probe(kind: str, device: str) -> None:
    """Quantize a small Linear as ``kind`` and run it once on ``device``; the backend's own
    error (as a ValueError) when this machine cannot run the kind."""
    import torch

    package, name = KINDS[kind]
    if package == "bitsandbytes":
        if not device.startswith("cuda"):
            raise ValueError(
                f"quantize {kind} needs a GPU: diffusers' bitsandbytes quantizer runs on CUDA only "
                "(on CPUs use int8wo or int8dq)"
            )
        check_package(kind)
        try:
            import bitsandbytes  # noqa: F401 - the backend imports and finds its CUDA library
        except Exception as exc:  # noqa: BLE001
            raise ValueError(
                f"quantize {kind} cannot run here: bitsandbytes failed to load ({exc})"
            ) from None
        return
    check_package(kind)
    try:
        layer = torch.nn.Sequential(torch.nn.Linear(128, 256)).to(device)
        from torchao.quantization import quantize_

        quantize_(layer, getattr(_import_torchao(), name)())
        with torch.inference_mode():
            layer(torch.randn(2, 128, device=device, dtype=next(layer.parameters()).dtype))
    except Exception as exc:  # noqa: BLE001 - any backend failure is the refusal's reason
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"quantize {kind} cannot run on {device} here: {reason}") from None


def storage_bytes(module: Any) -> int:
    """Bytes this rank holds for ``module``'s parameters and buffers, counting what quantized
    tensors really store (their inner data and scales; diffusers' memory footprint counts a
    quantized weight at its nominal dtype) and only the local shard of a DTensor."""
    from torch.distributed.tensor import DTensor

    seen: set[int] = set()
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += _tensor_bytes(tensor.to_local() if isinstance(tensor, DTensor) else tensor)
    return total


def _tensor_bytes(tensor: Any) -> int:
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is not None:
        names, _ = tensor.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(tensor, name)) for name in names)
    data = getattr(tensor, "data", tensor)
    return data.numel() * data.element_size()
