"""OmniDiffusionConfig and DiffusionOutput: validation, attribute options, round trips."""

from __future__ import annotations

import dataclasses
import json
import pickle

import numpy as np
import pytest
from PIL import Image

from spmd_diffusion.data import DiffusionOutput, OmniDiffusionConfig, ParallelConfig, RuntimeConfig
from spmd_diffusion.engine.seeding import derive_seed, with_seed
from spmd_diffusion.request import OmniDiffusionRequest


def test_design_example_config_needs_no_model():
    config = OmniDiffusionConfig(model_class_name="MyModel", num_gpus=2)
    assert config.executor_class is None and config.num_gpus == 2


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"model": ""}, "model"),
        ({"model_class_name": "not a class"}, "model_class_name"),
        ({"executor_class": 3}, "executor_class"),
        ({"executor_config": []}, "executor_config"),
        ({"num_gpus": 0}, "num_gpus"),
        ({"tensor_parallel_size": 0}, "tensor_parallel_size"),
        ({"cfg_parallel": "yes"}, "cfg_parallel"),
        ({"dtype": "float8"}, "dtype"),
        ({"device": "tpu"}, "device"),
        ({"seed": -3}, "seed"),
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"torch_num_threads": 0}, "torch_num_threads"),
        ({"rpc_timeout": 0}, "rpc_timeout"),
        ({"generate_timeout": -1}, "generate_timeout"),
        ({"startup_timeout": "soon"}, "startup_timeout"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        OmniDiffusionConfig(**kwargs)


def test_dtype_aliases_and_replica_size():
    config = OmniDiffusionConfig(dtype="fp16", tensor_parallel_size=2, cfg_parallel=True)
    assert config.dtype == "float16" and config.replica_size == 4


def test_parallel_layout_splits_the_world_or_names_what_does_not_divide():
    config = OmniDiffusionConfig(tensor_parallel_size=2, cfg_parallel=True)
    layout = config.parallel_layout(8)
    assert layout.shape == (2, 2, 1, 1, 2) and layout.leader_ranks() == [0, 4]
    with pytest.raises(
        ValueError, match=r"world_size=6 is not divisible by tp\*cfg=4 \(tp=2, cfg=2\)"
    ):
        config.parallel_layout(6)


def test_executor_options_read_as_attributes_and_survive_pickle():
    config = OmniDiffusionConfig(executor_config={"cloud_api_key": "k", "cloud_region": "eu"})
    assert config.cloud_api_key == "k" and config.cloud_region == "eu"
    with pytest.raises(AttributeError, match="nothing_here"):
        config.nothing_here  # noqa: B018 - the read is what is tested
    assert pickle.loads(pickle.dumps(config)) == config


def test_config_round_trip_and_unknown_keys_become_executor_options():
    class Custom:  # stands in for an executor class: recorded by dotted path
        pass

    config = OmniDiffusionConfig(model="tiny-dit", executor_class=Custom, seed=5)
    data = json.loads(json.dumps(config.to_dict()))
    assert data["executor_class"].endswith("Custom")
    rebuilt = OmniDiffusionConfig.from_dict({**data, "base_url": "http://x"})
    assert rebuilt.seed == 5 and rebuilt.base_url == "http://x"


def _output() -> DiffusionOutput:
    rgb = Image.fromarray(np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3))
    array = np.random.default_rng(0).random((8, 8, 3)).astype(np.float32)
    return DiffusionOutput(
        request_ids=["a", "b", "c"],
        images=[[rgb, rgb], [array], []],
        errors=[None, None, "ValueError: boom"],
        seeds=[[1, 2], [3], [4]],
        metadata=[{"num_inference_steps": 4}, {}, {}],
        timings={"total_s": 0.5},
        rank=0,
    )


def test_output_round_trip_is_json_safe_and_bit_exact():
    output = _output()
    back = DiffusionOutput.from_dict(json.loads(json.dumps(output.to_dict())))
    assert back.request_ids == output.request_ids and back.errors == output.errors
    assert (
        back.seeds == output.seeds
        and back.metadata == output.metadata
        and back.timings == output.timings
    )
    assert np.array_equal(np.asarray(back.images[0][1]), np.asarray(output.images[0][1]))
    assert back.images[1][0].dtype == np.float32
    assert np.array_equal(back.images[1][0], output.images[1][0])
    assert not back.ok


def test_output_split_and_single_accessors():
    parts = _output().split()
    assert [p.request_id for p in parts] == ["a", "b", "c"]
    assert parts[2].error == "ValueError: boom" and parts[0].ok and len(parts[0].images[0]) == 2
    with pytest.raises(ValueError, match="one request"):
        _output().request_id  # noqa: B018 - the read is what is tested


def test_output_lengths_must_agree():
    with pytest.raises(ValueError, match="errors"):
        DiffusionOutput(request_ids=["a"], errors=[None, None])
    with pytest.raises(ValueError, match="unknown DiffusionOutput field"):
        DiffusionOutput.from_dict({"request_ids": [], "bogus": 1})


def test_derived_seed_depends_on_run_seed_and_id_only():
    assert derive_seed(0, "item-1") == derive_seed(0, "item-1")
    assert derive_seed(0, "item-1") != derive_seed(1, "item-1") != derive_seed(0, "item-2")
    request = OmniDiffusionRequest(prompt="x", request_id="item-1")
    assert with_seed(request, 0).seed == derive_seed(0, "item-1")
    own = OmniDiffusionRequest(prompt="x", seed=9)
    assert with_seed(own, 0) is own


def test_config_parts_and_flat_names_are_one_config():
    flat = OmniDiffusionConfig(model="tiny-dit", tensor_parallel_size=2, max_batch_size=8)
    parts = OmniDiffusionConfig(
        model_config=flat.model_config,
        parallel_config=ParallelConfig(tensor_parallel_size=2),
        runtime_config=RuntimeConfig(max_images_per_batch=8),
    )
    assert parts == flat and flat.parallel_config.tensor_parallel_size == 2
    assert flat.runtime_config.max_images_per_batch == flat.max_batch_size == 8
    both = OmniDiffusionConfig(parallel_config=ParallelConfig(num_gpus=2), tensor_parallel_size=2)
    assert both.num_gpus == 2 and both.tensor_parallel_size == 2  # the keyword overrides
    assert dataclasses.replace(flat, seed=7).seed == 7 and flat.seed == 0
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        OmniDiffusionConfig(bogus=1)


def test_old_names_are_taken_and_read():
    config = OmniDiffusionConfig(max_batch_size=3)
    assert config.max_images_per_batch == config.max_batch_size == 3
    assert OmniDiffusionConfig.from_dict(config.to_dict()) == config
    assert OmniDiffusionConfig.from_dict({"max_batch_size": 5}).max_images_per_batch == 5


def test_schedule_is_the_old_name_of_batch_policy():
    config = OmniDiffusionConfig(schedule="fifo")
    assert config.batch_policy == config.schedule == "fifo"
    assert config.to_dict()["batch_policy"] == "fifo" and "schedule" not in config.to_dict()
    assert OmniDiffusionConfig.from_dict({"schedule": "cost"}).batch_policy == "cost"
    with pytest.raises(ValueError, match="batch_policy"):
        OmniDiffusionConfig(batch_policy="")


def test_checks_across_parts_name_both_options():
    with pytest.raises(ValueError, match="lora is not supported with tensor parallelism"):
        OmniDiffusionConfig(lora=["a.safetensors"], tensor_parallel_size=2)
    with pytest.raises(ValueError, match="vae_parallel"):
        OmniDiffusionConfig(vae_parallel=True)
