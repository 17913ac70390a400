"""``omni-diffuse generate``: prompts in, images and a manifest out, resumably.

Rank 0 plans the job by reading the input once, a record at a time (checks every item, fixes
its seed, counts the fixed batches and what a previous run finished) before any model
loads; then reads it again while the job runs, cutting fixed batches as it goes and handing
them to replicas as they free up. Neither pass holds the item list: rank 0 keeps the
batches in flight and a few counters, so a million-prompt job costs it no more memory than
a small one. Each replica's leader writes its own images (files, or WebDataset shards);
rank 0 receives one small record per image and keeps the books: the manifest, the progress
bar, and at the end ``run.json``, a contact sheet, a summary, and the check that every
planned image has a record -- a batch that went missing makes the run incomplete (exit 3),
never a success.

The parts, one responsibility each: :mod:`.requests` (an item's validated request),
:mod:`.plan` (the planning pass and the batches), :mod:`.records` (an image's record and a
shard's events, written and read), :mod:`.books` (what rank 0 awaits and has received),
:mod:`.history` (``run.json``) and :mod:`.job` (the run). This module names the entry points.
"""

from spmd_diffusion.jobs.history import RunHistory, previous_run
from spmd_diffusion.jobs.job import GenerateJob
from spmd_diffusion.jobs.options import GenerateOptions
from spmd_diffusion.jobs.plan import GeneratePlan, plan_generation, run_settings
from spmd_diffusion.jobs.requests import (
    RequestBuilder,
    build_request,
    build_requests,
    check_pipeline_takes,
    check_sequence_split,
    required_inputs,
)

__all__ = [
    "GenerateJob",
    "GenerateOptions",
    "GeneratePlan",
    "RequestBuilder",
    "RunHistory",
    "build_request",
    "build_requests",
    "check_pipeline_takes",
    "check_sequence_split",
    "plan_generation",
    "previous_run",
    "required_inputs",
    "run_settings",
]
