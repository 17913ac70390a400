"""The design document's custom-executor examples run as written under spmd_diffusion names."""

# ruff: noqa: PLC0415 - test-local or optional helpers (my_package)

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from spmd_diffusion.data import OmniDiffusionConfig
from spmd_diffusion.request import OmniDiffusionRequest

sys.path.insert(0, str(Path(__file__).parent / "design_examples"))

from my_package import MyCustomExecutor  # noqa: E402

from spmd_diffusion import DiffusionEngine  # noqa: E402


def test_custom_executor():
    # "Testing Your Executor", as written in the design document.
    from my_package import MyCustomExecutor

    config = OmniDiffusionConfig(
        model_class_name="MyModel",
        num_gpus=2,
    )

    executor = MyCustomExecutor(config)

    try:
        # Test health check
        executor.check_health()

        # Test RPC
        result = executor.collective_rpc("test_method")
        assert result is not None

        # Test model execution

        request = OmniDiffusionRequest(prompt="test")
        output = executor.execute_model([request])
        assert output is not None

    finally:
        executor.shutdown()
    assert result == ["ok from 0", "ok from 1"]
    assert output.request_ids == [request.request_id]


@pytest.mark.parametrize("executor_class", [MyCustomExecutor, "my_package.MyCustomExecutor"])
def test_custom_executor_through_the_engine_as_class_and_string(executor_class):
    config = OmniDiffusionConfig(model_class_name="MyModel", executor_class=executor_class)
    with DiffusionEngine(config) as engine:
        assert type(engine.executor).__name__ == "MyCustomExecutor"
        (output,) = engine.generate(
            __import__("spmd_diffusion").OmniDiffusionRequest(prompt="a", height=32)
        )
        assert output.ok and output.images[0][0].size == (64, 32)
        assert engine.collective_rpc("test_method", unique_reply_rank=0) == "ok from 0"
    assert engine.executor.closed


def test_executor_without_collective_rpc_says_what_to_override():
    from my_package import HTTPDiffusionExecutor

    executor = HTTPDiffusionExecutor(
        OmniDiffusionConfig(executor_config={"base_url": "http://nowhere"})
    )
    with pytest.raises(NotImplementedError, match="does not implement collective_rpc"):
        executor.collective_rpc("check_health")
    executor.shutdown()
    executor.shutdown()
