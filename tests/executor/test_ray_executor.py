"""The ray executor on a one-node Ray cluster with CPU actors: the executor contract, the
same pixels as uni, tensor parallel across two actors, a killed actor, placement errors,
and the batch job killed mid-run and resumed through ``omni-diffuse generate --executor ray``."""

# ruff: noqa: PLC0415 - optional extras load only where used (ray)

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from gates import JobGate
from helpers import max_pixel_difference, same_pixels, small_requests
from launch import BIN, generate_here

from spmd_diffusion import DiffusionEngine, OmniDiffusionConfig
from spmd_diffusion.errors import ExecutorClosedError, WorkerDiedError, WorkerError
from spmd_diffusion.executor.ray_executor import RayDiffusionExecutor

pytest.importorskip("ray", reason="the ray executor's tests need Ray: pip install '.[ray]'")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_engine(ray_address, tiny_unet):
    with DiffusionEngine(OmniDiffusionConfig(executor_class="ray", num_gpus=2)) as engine:
        yield engine


@pytest.fixture(scope="module")
def uni_engine(tiny_unet):
    with DiffusionEngine(OmniDiffusionConfig(executor_class="uni")) as engine:
        yield engine


def test_ray_actors_give_the_same_pixels_as_uni_over_both_replicas(ray_engine, uni_engine):

    assert (
        isinstance(ray_engine.executor, RayDiffusionExecutor)
        and ray_engine.executor.num_replicas == 2
    )
    requests = small_requests(4)
    assert same_pixels(ray_engine.generate(requests), uni_engine.generate(requests))
    pids = {place[0] for place in ray_engine.executor.worker_places()}
    assert len(pids) == 2 and os.getpid() not in pids


def test_collective_rpc_health_sleep_and_errors(ray_engine):
    assert ray_engine.collective_rpc(lambda worker: worker.rank) == [0, 1]
    assert ray_engine.collective_rpc(lambda worker: worker.rank * 10, unique_reply_rank=1) == 10
    ray_engine.check_health()
    ray_engine.executor.sleep(level=1)
    ray_engine.executor.wake_up()

    def fail_on_rank_1(worker):
        if worker.rank == 1:
            raise KeyError("only here")
        return worker.rank

    with pytest.raises(WorkerError) as caught:
        ray_engine.collective_rpc(fail_on_rank_1)
    assert caught.value.ranks == [1] and caught.value.exc_types == ["KeyError"]
    assert "fail_on_rank_1" in str(caught.value)  # the remote traceback travels with it
    assert ray_engine.generate(small_requests(1))  # the executor still serves


def _largest_difference(first_outputs, second_outputs) -> float:
    pairs = [
        (a, b)
        for first, second in zip(first_outputs, second_outputs, strict=True)
        for images_a, images_b in zip(first.images, second.images, strict=True)
        for a, b in zip(images_a, images_b, strict=True)
    ]
    assert pairs
    return max(max_pixel_difference(a, b) for a, b in pairs)


def test_tensor_parallel_across_two_actors_matches_one_rank(ray_address, tiny_dit):
    requests = small_requests(2, extra={"output_type": "np"})
    with DiffusionEngine(OmniDiffusionConfig(model="tiny-dit", executor_class="uni")) as single:
        reference = single.generate(requests)
    with DiffusionEngine(
        OmniDiffusionConfig(
            model="tiny-dit", executor_class="ray", num_gpus=2, tensor_parallel_size=2
        )
    ) as engine:
        assert engine.executor.num_replicas == 1
        parallel = engine.generate(requests)
    assert _largest_difference(parallel, reference) < 1e-3


def test_a_killed_actor_is_named_within_10_s_and_the_cluster_survives_shutdown(
    ray_address, tiny_unet
):
    import ray

    engine = DiffusionEngine(OmniDiffusionConfig(executor_class="ray", num_gpus=2))
    try:
        pid = engine.executor.worker_places()[1][0]
        start = time.monotonic()
        with pytest.raises(WorkerDiedError, match="rank 1 died") as caught:
            engine.collective_rpc(
                lambda worker: os.kill(pid, signal.SIGKILL) if worker.rank == 0 else time.sleep(60)
            )
        assert time.monotonic() - start < 10
        assert caught.value.rank == 1
        with pytest.raises(ExecutorClosedError):
            engine.generate(small_requests(1))
    finally:
        start = time.monotonic()
        engine.close()
        assert time.monotonic() - start < 15
    # The user's cluster is still up, and the executor's placement group is gone.
    assert ray.is_initialized() and ray.cluster_resources().get("CPU") == 4
    group = engine.executor.placement_group
    assert ray.util.placement_group_table(group)["state"] == "REMOVED"


def test_a_cluster_too_small_fails_fast_with_what_it_has(ray_address, tiny_unet):
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"could not place 3 worker\(s\).*--num-gpus"):
        DiffusionEngine(
            OmniDiffusionConfig(
                executor_class="ray",
                num_gpus=3,
                executor_config={"num_cpus_per_worker": 2, "placement_timeout": 2},
            )
        )
    assert time.monotonic() - start < 30
    with pytest.raises(ValueError, match="placement_strategy 'NEAR'"):
        DiffusionEngine(
            OmniDiffusionConfig(
                executor_class="ray", num_gpus=2, executor_config={"placement_strategy": "near"}
            )
        )


def _actor_pids(stream_lines: list[str]) -> dict[int, int]:
    for line in stream_lines:
        if "Ray worker actor(s)" in line:
            return {int(rank): int(pid) for rank, pid in re.findall(r"rank (\d+): pid (\d+)", line)}
    return {}


def test_generate_killed_actor_exits_naming_the_rank_then_resume_completes(ray_address, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt number {i}\n" for i in range(10)))
    args = [
        "generate",
        "--prompts",
        str(prompts),
        "--batch-size",
        "1",
        "--steps",
        "12",
        "--height",
        "32",
        "--width",
        "32",
        "--model",
        "tiny-unet",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # The reference: the no-launcher job in this process (uni = mpiexec bytes: test_generate_cli).
    assert generate_here(*args[1:], "--output", str(tmp_path / "uni")) == 0

    output = tmp_path / "ray"
    command = [
        str(BIN / "omni-diffuse"),
        *args,
        "--executor",
        "ray",
        "--num-gpus",
        "2",
        "--output",
        str(output),
    ]
    gate = JobGate(
        tmp_path / "gate", after=2
    )  # the engine holds after two images: the kill lands mid-run
    job = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=gate.env(env)
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(job.stderr), daemon=True)
    reader.start()
    try:
        gate.wait_held(job)
        pids = _actor_pids(list(lines))
        assert set(pids) == {0, 1}, "".join(lines)[-3000:]
        os.kill(pids[1], signal.SIGKILL)
    finally:
        gate.release()
    killed_at = time.monotonic()
    code = job.wait(timeout=60)
    reader.join(10)
    assert time.monotonic() - killed_at < 10  # the death is noticed, not waited out
    text = "".join(lines)
    assert code != 0 and "worker rank 1 died" in text, text[-3000:]
    manifest = output / "manifest.jsonl"
    made = len(manifest.read_text().splitlines())
    assert 2 <= made < 10, "the kill lands mid-run"
    assert json.loads((output / "run.json").read_text())["status"] == "failed"

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run = json.loads((output / "run.json").read_text())
    assert (
        run["totals"]["images_skipped_as_done"] == made
        and run["layout"]["executor"] == "RayDiffusionExecutor"
    )
    pngs = {name: _pngs(tmp_path / name) for name in ("ray", "uni")}
    assert len(pngs["ray"]) == 10
    assert pngs["ray"] == pngs["uni"]  # byte-identical through ray and uni


def _pngs(output: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted((output / "images").glob("*.png"))}
