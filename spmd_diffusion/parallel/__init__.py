"""Tensor-, sequence- and CFG-parallel denoising for diffusers pipelines.

The world splits as dp x cfg x sp x tp (see :mod:`.mesh`; sp = ring x ulysses): ``dp``
independent replicas, each of ``cfg`` x ``sp`` x ``tp`` ranks that make the same images
together. Call contract for the worker, on every rank, in this order::

    from spmd_diffusion.parallel import ParallelLayout, build_device_mesh, parallelize_pipeline

    # once per job, after torch.distributed.init_process_group (gloo on CPU, nccl or
    # "cpu:gloo,cuda:nccl" on GPU) and, on GPU, torch.cuda.set_device(local_rank):
    layout = config.parallel_layout(world_size)
    mesh = build_device_mesh(layout, device.type)          # collective: every rank calls it

    # after pipeline = load_pipeline(...).to(device)  (weights on their final device):
    report = parallelize_pipeline(pipeline, layout, mesh)   # no collective; logs report.summary()

Every rank must have loaded the same weights: each shards its own copy, nothing is broadcast.

Then every rank of one replica (``layout.replica_ranks(layout.replica_index(rank))``) must
make the same pipeline calls with the same arguments (prompts, seeds, sizes, steps): the
denoiser runs collectives over the tp, sp and cfg groups inside every step. Every rank of the
replica ends with the same images; only the leader (``layout.is_replica_leader(rank)``)
needs to report them. The engine schedules work per replica, not per rank.

Not supported on a parallelized pipeline: moving it to another device (``sleep(1)``'s
``pipeline.to("cpu")``) -- the sharded weights are DTensors bound to the mesh's device --
and reloading it without calling :func:`parallelize_pipeline` again (``sleep(2)``/``wake_up``
must re-run it on the new pipeline, with the same mesh). Count parameter memory with
:func:`param_bytes`: ``numel()`` of a DTensor is its global size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from spmd_diffusion.models.options import denoiser_of
from spmd_diffusion.parallel.cfg_parallel import (
    CFGParallel,
    cfg_parallel_of,
    disable_cfg_parallel,
    enable_cfg_parallel,
)
from spmd_diffusion.parallel.mesh import (
    MESH_DIM_NAMES,
    ParallelLayout,
    build_device_mesh,
    check_mesh,
    is_replica_leader,
    replica_index,
)
from spmd_diffusion.parallel.sequence_parallel import SPReport, enable_sequence_parallel
from spmd_diffusion.parallel.tensor_parallel import (
    TPReport,
    apply_tensor_parallel,
    build_tp_plan,
    gated_row_order,
    param_bytes,
)
from spmd_diffusion.parallel.vae_parallel import VAEReport, enable_vae_parallel

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = [
    "MESH_DIM_NAMES",
    "CFGParallel",
    "ParallelLayout",
    "ParallelReport",
    "SPReport",
    "TPReport",
    "apply_tensor_parallel",
    "build_device_mesh",
    "build_tp_plan",
    "cfg_parallel_of",
    "denoiser_of",
    "disable_cfg_parallel",
    "enable_cfg_parallel",
    "enable_sequence_parallel",
    "gated_row_order",
    "is_replica_leader",
    "parallelize_pipeline",
    "merge_parallel_stats",
    "param_bytes",
    "parallel_cfg",
    "parallel_sp",
    "parallel_summary",
    "parallel_tp",
    "parallel_vae",
    "replica_index",
    "start_parallel",
]


@dataclass
class ParallelReport:
    """What :func:`parallelize_pipeline` did to the denoiser of this rank."""

    layout: ParallelLayout
    denoiser: str  # "unet" or "transformer"
    tp: TPReport | None
    cfg: CFGParallel | None
    sp: SPReport | None = None
    vae: VAEReport | None = None

    def summary(self) -> str:
        layout = self.layout
        lines = [
            f"parallel layout dp={layout.dp} cfg={layout.cfg} ring={layout.ring} "
            f"ulysses={layout.ulysses} "
            f"tp={layout.tp} (pipeline.{self.denoiser})"
        ]
        if self.tp is not None:
            lines.append(self.tp.summary())
        if self.sp is not None:
            lines.append(self.sp.summary())
        if self.vae is not None:
            lines.append(self.vae.summary())
        if self.cfg is not None:
            lines.append(
                "cfg parallel on the pair: guided calls split (doubled batches halved, "
                "branch calls paired); "
                "what ran is counted in run.json"
            )
        return "\n".join(lines)

    def describe(self) -> dict[str, Any]:
        """run.json's ``"parallel"`` for this rank: what each mode did (so far)."""
        data: dict[str, Any] = {"layout": self.layout.describe(), "denoiser": self.denoiser}
        if self.tp is not None:
            data["tp"] = self.tp.describe()
        if self.cfg is not None:
            data["cfg"] = {"split_calls": self.cfg.split_calls, "whole_calls": self.cfg.whole_calls}
        if self.sp is not None:
            data["sp"] = self.sp.describe()
        if self.vae is not None:
            data["vae"] = self.vae.describe()
        return data


def merge_parallel_stats(ranks: list[dict[str, Any]]) -> dict[str, Any] | None:
    """run.json's ``"parallel"`` from every rank's ``get_cache_stats()``: the layout, the TP
    plan (the same on every rank), and the CFG and sequence-parallel call counts of the
    replica leaders summed (every rank of a replica makes the same calls)."""
    reports = [
        rank["parallel"] for rank in ranks if isinstance(rank, dict) and rank.get("parallel")
    ]
    if not reports:
        return None
    layout = ParallelLayout(
        **{k: reports[0]["layout"][k] for k in ("world_size", "tp", "cfg", "ulysses", "ring")}
    )
    leaders = [
        rank["parallel"]
        for rank in ranks
        if rank.get("parallel") and layout.is_replica_leader(rank["rank"])
    ]
    merged = {
        key: value for key, value in reports[0].items() if key in ("layout", "denoiser", "tp")
    }
    if "cfg" in reports[0]:
        merged["cfg"] = {
            name: sum(report["cfg"][name] for report in leaders)
            for name in ("split_calls", "whole_calls")
        }
    if "vae" in reports[0]:
        merged["vae"] = dict(reports[0]["vae"])
        for name in ("split_decoder_calls", "whole_decoder_calls"):
            merged["vae"][name] = sum(report["vae"][name] for report in leaders)
    if "sp" in reports[0]:
        merged["sp"] = dict(reports[0]["sp"])
        merged["sp"]["sequence_parallel_attention_calls"] = sum(
            report["sp"]["sequence_parallel_attention_calls"] for report in leaders
        )
    return merged


def parallel_summary(merged: dict[str, Any]) -> list[tuple[str, str]]:
    """Rows for a job's summary: what each parallel flag did."""
    rows = []
    if "tp" in merged:
        tp = merged["tp"]
        rows.append(
            (
                "tensor parallel",
                f"tp={tp['degree']}: {len(tp['sharded']['attention'])} attention + "
                f"{len(tp['sharded']['feedforward'])} feed-forward, "
                f"{len(tp['sharded']['modulation'])} "
                f"modulation sharded ({tp['plan']} plan), {len(tp['replicated'])} replicated, "
                f"{tp['param_fraction']:.2f}x denoiser parameters per rank",
            )
        )
    if "sp" in merged:
        sp = merged["sp"]
        rows.append(
            (
                "sequence parallel",
                f"ulysses={sp['ulysses']} ring={sp['ring']}: "
                f"{sp['sequence_parallel_attention_calls']} attention calls over the whole "
                "sequence",
            )
        )
    if "vae" in merged:
        vae = merged["vae"]
        rows.append(
            (
                "vae parallel",
                f"{vae['split_decoder_calls']} decoder calls split over {vae['ranks']} ranks "
                f"(a video's: one per latent frame), {vae['whole_decoder_calls']} whole",
            )
        )
    if "cfg" in merged:
        cfg = merged["cfg"]
        rows.append(
            (
                "cfg parallel",
                f"{cfg['split_calls']} guided denoiser calls split over the pair, "
                f"{cfg['whole_calls']} whole",
            )
        )
    return rows


def start_parallel(pipeline: Any, layout: ParallelLayout, mesh: DeviceMesh) -> ParallelReport:
    """An empty report for ``pipeline``'s denoiser, which the ``parallel_*`` steps fill."""
    check_mesh(layout, mesh)
    name, _ = denoiser_of(pipeline, "parallelize")
    return ParallelReport(layout=layout, denoiser=name, tp=None, cfg=None)


def parallel_tp(pipeline: Any, report: ParallelReport, mesh: DeviceMesh) -> None:
    """Shard the denoiser over the tp group (tp > 1)."""
    if report.layout.tp > 1:
        report.tp = apply_tensor_parallel(getattr(pipeline, report.denoiser), mesh["tp"])


def parallel_sp(pipeline: Any, report: ParallelReport, mesh: DeviceMesh) -> None:
    """Split the denoiser's sequence over ring x ulysses (> 1): diffusers' context-parallel
    hooks, which wrap the (sharded) blocks."""
    layout = report.layout
    if layout.sp > 1:
        denoiser = getattr(pipeline, report.denoiser)
        if cfg_parallel_of(denoiser) is not None:  # its hook would run inside CFG's
            raise RuntimeError("sequence parallel must be enabled before CFG parallel")
        report.sp = enable_sequence_parallel(denoiser, mesh, layout.ulysses, layout.ring)


def parallel_cfg(pipeline: Any, report: ParallelReport, mesh: DeviceMesh) -> None:
    """Split guided calls over the cfg pair (cfg == 2); its hook wraps the hooks above."""
    if report.layout.cfg == 2:
        report.cfg = enable_cfg_parallel(getattr(pipeline, report.denoiser), mesh["cfg"])


def parallel_vae(pipeline: Any, report: ParallelReport, mesh: DeviceMesh) -> None:
    """Split the VAE's decodes over the replica (more than one rank)."""
    if report.layout.replica_size > 1:
        replica = mesh["cfg", "ring", "ulysses", "tp"]._flatten("replica")
        report.vae = enable_vae_parallel(
            pipeline.vae, replica.get_group(), replica.get_local_rank(), replica.size()
        )


def parallelize_pipeline(
    pipeline: Any, layout: ParallelLayout, mesh: DeviceMesh, vae_parallel: bool = False
) -> ParallelReport:
    """Apply tensor parallelism (tp > 1), sequence parallelism (ring x ulysses > 1) and CFG
    parallelism (cfg == 2) to the pipeline's denoiser, in place, in that order (the CFG split
    of the batch wraps everything), and with ``vae_parallel`` split the VAE's decodes over
    the replica. ``mesh`` comes from :func:`build_device_mesh` (layout); call it after
    ``pipeline.to(device)``, on every rank. A dp-only layout changes nothing. The worker runs
    the same steps among its own (:mod:`spmd_diffusion.worker.model_setup`)."""
    report = start_parallel(pipeline, layout, mesh)
    parallel_tp(pipeline, report, mesh)
    parallel_sp(pipeline, report, mesh)
    parallel_cfg(pipeline, report, mesh)
    if vae_parallel:
        parallel_vae(pipeline, report, mesh)
    return report
