"""Engine with the uni and mp executors on the tiny model: images, errors, deaths, timeouts."""

# ruff: noqa: PLC0415 - optional extras load only where used (psutil)

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import hammer_from_two_threads, same_pixels, small_requests

from spmd_diffusion import DiffusionEngine, OmniDiffusionConfig
from spmd_diffusion.engine.seeding import derive_seed
from spmd_diffusion.errors import (
    ExecutorClosedError,
    ExecutorTimeoutError,
    WorkerDiedError,
    WorkerError,
)
from spmd_diffusion.executor import (
    DiffusionExecutor,
    MultiProcDiffusionExecutor,
    UniProcDiffusionExecutor,
)
from spmd_diffusion.request import OmniDiffusionRequest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def uni_engine(tiny_unet):
    with DiffusionEngine(OmniDiffusionConfig(executor_class="uni")) as engine:
        yield engine


@pytest.fixture(scope="module")
def mp_engine(tiny_unet):
    with DiffusionEngine(OmniDiffusionConfig(executor_class="mp", num_gpus=2)) as engine:
        yield engine


def test_engine_picks_the_named_executor(uni_engine, mp_engine):
    assert isinstance(uni_engine.executor, UniProcDiffusionExecutor)
    assert isinstance(mp_engine.executor, MultiProcDiffusionExecutor)


def test_uni_and_mp_give_identical_pixels(uni_engine, mp_engine):
    requests = small_requests(4)
    uni_outputs = uni_engine.generate(requests)
    mp_outputs = mp_engine.generate(requests)
    assert [o.request_id for o in mp_outputs] == [r.request_id for r in requests]
    assert all(o.ok for o in uni_outputs + mp_outputs)
    assert same_pixels(uni_outputs, mp_outputs)


def test_engine_fixes_seeds_from_run_seed_and_id(uni_engine):

    request = OmniDiffusionRequest(prompt="x", num_inference_steps=2, request_id="no-seed")
    (output,) = uni_engine.generate(request)
    assert output.seeds[0] == [derive_seed(0, "no-seed")]
    with pytest.raises(ValueError, match="duplicate request_id"):
        uni_engine.generate([request, request])


def test_collective_rpc_on_every_rank(mp_engine):
    assert mp_engine.collective_rpc(lambda worker: worker.rank) == [0, 1]
    assert mp_engine.collective_rpc(lambda worker: worker.rank, unique_reply_rank=1) == 1
    pids = mp_engine.collective_rpc(lambda worker: os.getpid())
    assert len(set(pids)) == 2 and os.getpid() not in pids
    stats = mp_engine.collective_rpc("get_cache_stats")
    assert [s["rank"] for s in stats] == [0, 1]
    mp_engine.check_health()
    with pytest.raises(ValueError, match="unique_reply_rank 5"):
        mp_engine.collective_rpc("check_health", unique_reply_rank=5)


@pytest.mark.parametrize("engine_fixture", ["uni_engine", "mp_engine"])
def test_worker_exception_is_one_typed_error_naming_the_rank(request, engine_fixture):
    engine = request.getfixturevalue(engine_fixture)
    last = len(engine.collective_rpc(lambda worker: 0)) - 1

    def fail_on_last(worker):
        if worker.rank == last:
            raise KeyError("missing thing")
        return "fine"

    with pytest.raises(WorkerError) as caught:
        engine.collective_rpc(fail_on_last)
    assert caught.value.ranks == [last] and caught.value.exc_types == ["KeyError"]
    assert "missing thing" in str(caught.value) and "fail_on_last" in str(caught.value)
    assert engine.collective_rpc(lambda worker: "still alive")[0] == "still alive"


def test_sleep_wake_through_the_executor(mp_engine):
    requests = small_requests(1)
    before = mp_engine.generate(requests)
    mp_engine.sleep(2)
    assert mp_engine.collective_rpc("check_health")[1]["status"] == "asleep"
    mp_engine.wake_up()
    assert same_pixels(before, mp_engine.generate(requests))


def test_timeout_fails_the_call_and_the_executor(tiny_unet, tmp_path):
    """The call waits for a file the test writes only afterwards: it can end only by timing out."""
    released = tmp_path / "released"

    def held(worker, path=str(released)):

        while not os.path.exists(path):
            time.sleep(0.02)

    engine = DiffusionEngine(OmniDiffusionConfig(executor_class="uni"))
    try:
        with pytest.raises(ExecutorTimeoutError, match="did not finish within 0.5 s on rank"):
            engine.collective_rpc(held, timeout=0.5)
        with pytest.raises(ExecutorClosedError):
            engine.collective_rpc("check_health")
    finally:
        released.touch()
        engine.close()


def test_killed_worker_is_noticed_quickly(tiny_unet):
    engine = DiffusionEngine(OmniDiffusionConfig(executor_class="mp", num_gpus=2))
    try:
        pid = engine.collective_rpc(lambda worker: os.getpid(), unique_reply_rank=1)
        start = time.monotonic()
        with pytest.raises(WorkerDiedError, match="rank 1 died") as caught:
            engine.collective_rpc(
                lambda worker: os.kill(pid, signal.SIGKILL) if worker.rank == 0 else time.sleep(60)
            )
        assert time.monotonic() - start < 10
        assert caught.value.rank == 1 and caught.value.exitcode == -signal.SIGKILL
        with pytest.raises(ExecutorClosedError):
            engine.generate(small_requests(1))
    finally:
        start = time.monotonic()
        engine.close()
        engine.close()  # idempotent
        assert time.monotonic() - start < 10
    assert not any(process.is_alive() for process in engine.executor.processes)


def test_worker_that_cannot_load_fails_startup_with_its_traceback(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(WorkerError) as caught:
        DiffusionEngine(OmniDiffusionConfig(model=str(tmp_path), executor_class="mp", num_gpus=1))
    assert caught.value.method == "load" and caught.value.ranks == [0]


def test_mp_refuses_a_tp_that_does_not_divide_its_workers_before_spawning():
    with pytest.raises(ValueError, match=r"world_size=3 is not divisible by tp\*cfg=2"):
        DiffusionEngine(
            OmniDiffusionConfig(executor_class="mp", num_gpus=3, tensor_parallel_size=2)
        )


def test_two_threads_on_one_mp_engine_each_get_their_own_results(mp_engine):

    assert hammer_from_two_threads(mp_engine, rounds=50) == []


def test_uni_refuses_several_workers_and_survives_shutdown_after_a_failed_start():
    with pytest.raises(ValueError, match="num_gpus=2"):
        DiffusionEngine(OmniDiffusionConfig(executor_class="uni", num_gpus=2))
    executor = UniProcDiffusionExecutor.__new__(UniProcDiffusionExecutor)
    with pytest.raises(ValueError, match="num_gpus=3"):
        executor.__init__(OmniDiffusionConfig(num_gpus=3))
    executor.shutdown()
    executor.shutdown()


def test_engine_passes_keywords_to_an_executor_written_with_keyword_parameters():

    class KeywordExecutor(DiffusionExecutor):
        def _init_executor(self) -> None:
            self.seen = []

        def collective_rpc(self, method, **kwargs):  # as the design document's MPIExecutor sketch
            self.seen.append((method, kwargs))
            return ["answer"]

    with DiffusionEngine(OmniDiffusionConfig(executor_class=KeywordExecutor)) as engine:
        assert engine.collective_rpc("ping", timeout=3, args=(1,), kwargs={"a": 2}) == ["answer"]
        assert engine.executor.seen == [
            ("ping", {"timeout": 3, "args": (1,), "kwargs": {"a": 2}, "unique_reply_rank": None})
        ]


def test_workers_die_with_a_killed_parent(tmp_path):
    """SIGTERM to a no-launcher job leaves no worker behind, even one in the middle of a long
    batch (500 steps at 512x512: about a minute here) that would only notice the closed pipe
    at its end."""

    import psutil

    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(200)))
    parent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "spmd_diffusion",
            "generate",
            "--prompts",
            str(prompts),
            "--output",
            str(tmp_path / "out"),
            "--num-gpus",
            "2",
            "--steps",
            "500",
            "--height",
            "512",
            "--width",
            "512",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (tmp_path / "out" / "manifest.jsonl").exists():
            time.sleep(0.2)
        workers = psutil.Process(parent.pid).children(recursive=True)
        assert len(workers) >= 2
        parent.send_signal(signal.SIGTERM)
        parent.wait(timeout=10)
        gone, alive = psutil.wait_procs(workers, timeout=10)
        for orphan in alive:
            orphan.kill()
        assert not alive, f"orphaned workers: {[p.pid for p in alive]}"
    finally:
        if parent.poll() is None:
            parent.kill()


def test_a_script_without_a_main_guard_is_told_what_to_do(tmp_path):

    script = tmp_path / "unguarded.py"
    script.write_text(
        "from spmd_diffusion import DiffusionEngine, OmniDiffusionConfig\n"
        "with DiffusionEngine(OmniDiffusionConfig(executor_class='mp')) as engine:\n"
        "    print(engine.collective_rpc('ping'))\n"
    )
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode != 0
    assert (
        'put the code that builds the engine under `if __name__ == "__main__":`' in done.stderr
    ), done.stderr[-2000:]
