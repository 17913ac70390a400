"""The GPU-like stand-in pipeline of ``scripts/bench_overhead.py``, installed in every process
of a job (the engine, spawned ``mp`` workers, MPI and torchrun ranks) through ``PYTHONPATH``:
when ``$BENCH_OVERHEAD`` (a JSON of the stand-in's parameters) is set, the worker's
``load_pipeline`` returns the stand-in instead of loading anything. Inert otherwise; nothing
of the project is imported before the project imports it."""

# ruff: noqa: PLC0415 - this runs in every process at start-up: numpy, torch and PIL load
# only when the stand-in is built

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import os
import sys
import time
from types import SimpleNamespace

SETUP = "spmd_diffusion.worker.model_setup"  # where the worker loads its pipeline


class _Config(dict):
    """A model config as diffusers has it: a dict whose keys are also attributes."""

    __getattr__ = dict.__getitem__


class GpuLikeStandIn:
    """Per step: ``launch_ms`` of Python holding the GIL (kernel launches), then ``device_ms``
    asleep with the GIL released (the device computing). Returns natural-looking images: 1/f
    bases rolled and flipped per seed (``bench_output.variant``), so PNG encoding costs what a
    photo's does."""

    vae_scale_factor = 8

    def __init__(self, settings: dict) -> None:
        import numpy as np

        self.bases = np.load(settings["bases"])
        self.launch_s = settings["launch_ms"] / 1000
        self.device_s = settings["device_ms"] / 1000
        self.tiny_images = bool(settings.get("tiny_images"))
        import torch

        self.unet = torch.nn.Module()  # no weights: only its config is read
        self.unet.config = _Config(sample_size=self.bases.shape[1] // 8)
        self.components: dict = {}

    def to(self, *args, **kwargs):
        return self

    def set_progress_bar_config(self, **kwargs) -> None:
        pass

    def __call__(
        self,
        prompt=None,
        negative_prompt=None,
        height=None,
        width=None,
        num_inference_steps=20,
        guidance_scale=7.5,
        num_images_per_prompt=1,
        generator=None,
        callback_on_step_end=None,
        output_type="pil",
    ):
        import numpy as np
        from PIL import Image

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        count = len(prompts) * num_images_per_prompt
        generators = generator if isinstance(generator, list) else [generator] * count
        seeds = [g.initial_seed() if g is not None else i for i, g in enumerate(generators[:count])]
        for step in range(num_inference_steps):
            busy_until = time.perf_counter() + self.launch_s
            while time.perf_counter() < busy_until:  # Python work: holds the GIL
                pass
            time.sleep(self.device_s)  # the device's share: the GIL is free
            if callback_on_step_end is not None:
                callback_on_step_end(self, step, 0, {})
        images = []
        for seed in seeds:
            rng = np.random.default_rng(seed)
            base = self.bases[seed % len(self.bases)]
            if self.tiny_images:  # --no-output-work: encoding and writing cost ~nothing
                base = base[:8, :8]
            dy, dx = (int(v) for v in rng.integers(0, base.shape[0], size=2))
            images.append(
                Image.fromarray(np.ascontiguousarray(np.roll(base, (dy, dx), axis=(0, 1))), "RGB")
            )
        return SimpleNamespace(images=images)


def _patch(module) -> None:
    if not hasattr(module, "load_pipeline"):  # the loading moved: fail, never bench the real model
        raise RuntimeError(f"{SETUP} no longer calls load_pipeline: update the stand-in's patch")
    settings = json.loads(os.environ["BENCH_OVERHEAD"])
    module.load_pipeline = lambda *args, **kwargs: GpuLikeStandIn(settings)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != SETUP:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("BENCH_OVERHEAD"):
    sys.meta_path.insert(0, _PatchOnImport())
