"""Tensor-parallel plan and CFG wrapper in one process.

The sharded arithmetic of gated feed-forwards is simulated here (each "rank" is a slice of
the weights); the real multi-rank runs are in tests/multirank/parallel_checks.py.
"""

# ruff: noqa: PLC0415 - heavy modules load on first use (diffusers, torch)

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from spmd_diffusion.models import load_pipeline
from spmd_diffusion.parallel import (
    ParallelLayout,
    ParallelReport,
    apply_tensor_parallel,
    build_tp_plan,
    cfg_parallel_of,
    disable_cfg_parallel,
    enable_cfg_parallel,
    gated_row_order,
    parallel_sp,
    param_bytes,
)
from spmd_diffusion.parallel.cfg_parallel import CFGParallel
from spmd_diffusion.parallel.tensor_parallel import packed_column_order
from spmd_diffusion.parallel.tp_layers import ShardedRMSNorm


def tiny_dit():
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    return PixArtTransformer2DModel(
        num_attention_heads=4,
        attention_head_dim=8,
        num_layers=2,
        in_channels=4,
        out_channels=8,
        cross_attention_dim=32,
        caption_channels=32,
        sample_size=8,
        norm_num_groups=8,
    ).eval()


def dit_inputs(batch: int = 2):
    torch.manual_seed(1)
    return {
        "hidden_states": torch.randn(batch, 4, 8, 8),
        "encoder_hidden_states": torch.randn(batch, 5, 32),
        "timestep": torch.full((batch,), 500),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }


# -- plan ------------------------------------------------------------------------------------
def test_plan_shards_every_attention_and_feedforward_of_a_dit():
    plan = build_tp_plan(tiny_dit(), 2)
    assert list(plan.attention) == [
        f"transformer_blocks.{i}.attn{j}" for i in range(2) for j in (1, 2)
    ]
    assert plan.feedforward == ["transformer_blocks.0.ff", "transformer_blocks.1.ff"]
    assert plan.gated == {} and plan.skipped == {}
    block = {
        path: style
        for path, style in plan.styles.items()
        if path.startswith("transformer_blocks.0.")
    }
    assert block == {
        "transformer_blocks.0.attn1.to_q": "colwise",
        "transformer_blocks.0.attn1.to_k": "colwise",
        "transformer_blocks.0.attn1.to_v": "colwise",
        "transformer_blocks.0.attn1.to_out.0": "rowwise",
        "transformer_blocks.0.attn2.to_q": "colwise",
        "transformer_blocks.0.attn2.to_k": "colwise",
        "transformer_blocks.0.attn2.to_v": "colwise",
        "transformer_blocks.0.attn2.to_out.0": "rowwise",
        "transformer_blocks.0.ff.net.0.proj": "colwise",
        "transformer_blocks.0.ff.net.2": "rowwise",
    }


def test_plan_of_sd3_joint_attention_shards_the_context_projections():
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
        caption_projection_dim=32, pooled_projection_dim=16, qk_norm="rms_norm",
    )  # fmt: skip
    plan = build_tp_plan(model, 2)
    first = {
        path.split("attn.")[1]: style for path, style in plan.styles.items() if ".0.attn." in path
    }
    assert first == {
        **{
            name: "colwise"
            for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
        },
        "to_out.0": "rowwise",
        "to_add_out": "rowwise",
    }
    # the last block's context branch ends early: no to_add_out, nothing to reduce there
    assert "transformer_blocks.1.attn.to_add_out" not in plan.styles
    assert "transformer_blocks.1.attn.add_q_proj" in plan.styles and plan.skipped == {}


def test_plan_finds_the_gated_feedforwards_of_the_sd_unet(tiny_unet):

    unet = load_pipeline(tiny_unet, None, torch.float32).unet
    plan = build_tp_plan(unet, 2)
    assert len(plan.gated) == len(plan.feedforward) == 4  # GEGLU everywhere
    assert all(path.endswith(".ff.net.0.proj") for path in plan.gated)
    assert len(plan.attention) == 8 and plan.skipped == {}


def test_indivisible_heads_are_refused_with_path_heads_and_tp():
    with pytest.raises(ValueError) as caught:
        build_tp_plan(tiny_dit(), 3)
    message = str(caught.value)
    assert "cannot shard PixArtTransformer2DModel over tp=3" in message
    assert "transformer_blocks.0.attn1 (Attention): heads=4 is not divisible by tp=3" in message
    assert (
        "transformer_blocks.0.ff (FeedForward): hidden width 128 is not divisible by tp=3"
        in message
    )


def test_indivisible_feedforward_width_is_refused():
    from diffusers.models.attention import BasicTransformerBlock

    block = BasicTransformerBlock(
        dim=16, num_attention_heads=4, attention_head_dim=4, ff_inner_dim=18
    )
    with pytest.raises(
        ValueError, match=r"ff \(FeedForward\): hidden width 18 is not divisible by tp=4"
    ):
        build_tp_plan(nn.ModuleDict({"block": block}), 4)
    assert "block.attn1" in build_tp_plan(nn.ModuleDict({"block": block}), 2).attention


def test_layouts_that_cannot_be_split_by_heads_stay_replicated():
    from diffusers.models.attention_processor import Attention

    gated = Attention(query_dim=16, heads=2, dim_head=8)
    gated.to_gate = nn.Linear(16, 16)
    modules = nn.ModuleDict(
        {
            "pre_only": Attention(query_dim=16, heads=2, dim_head=8, pre_only=True),
            "across": Attention(
                query_dim=16, heads=2, kv_heads=2, dim_head=8, qk_norm="layer_norm_across_heads"
            ),
            "gated": gated,
            "plain": Attention(query_dim=16, heads=2, dim_head=8),
        }
    )
    plan = build_tp_plan(modules, 2)
    assert list(plan.attention) == ["plain"]
    assert "pre_only" in plan.skipped["pre_only"]
    assert "normalises across heads" in plan.skipped["across"]
    assert "unknown projection 'to_gate'" in plan.skipped["gated"]


def tiny_flux_transformer():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),
    ).eval()


def test_the_derived_plan_equals_diffusers_own_tp_plan_where_a_model_has_one():
    """Flux's _tp_plan (double and single-stream blocks, PackedRowwiseParallel proj_out): the
    plan the tool derives from the module tree shards exactly the same Linears the same way."""
    model = tiny_flux_transformer()
    own, derived = build_tp_plan(model, 2), build_tp_plan(model, 2, use_model_plan=False)
    assert (own.source, derived.source) == ("model", "derived")
    assert own.styles == derived.styles and own.packed == derived.packed
    assert (
        sorted(own.attention) == sorted(derived.attention) and len(own.attention) == 4
    )  # 2 double + 2 single
    assert own.packed == {f"single_transformer_blocks.{i}.proj_out": [32, 128] for i in range(2)}
    assert own.skipped == {} and "single_transformer_blocks.0.proj_mlp" in own.feedforward
    assert (
        "single_transformer_blocks.0.norm.linear" in own.modulation
    )  # adaLN modulation, outputs gathered
    assert "transformer_blocks.1.norm1_context.linear" in own.modulation


def test_packed_columns_give_each_rank_its_attention_and_mlp_blocks():
    """proj_out reads cat([attention (8), mlp (16)]), both column-sharded over 2 ranks: the
    permuted columns split evenly are [attention half r; mlp half r], and the ranks' partial
    products sum to the unsharded output."""

    order = packed_column_order([8, 16], 2)
    assert order.tolist() == [*range(0, 4), *range(8, 16), *range(4, 8), *range(16, 24)]
    torch.manual_seed(0)
    out, attention, mlp = nn.Linear(24, 6), torch.randn(3, 8), torch.randn(3, 16)
    with torch.no_grad():
        expected = out(torch.cat([attention, mlp], dim=-1))
        weight = out.weight[:, order]
        total = out.bias.clone()
        for rank in range(2):
            local = torch.cat([attention.chunk(2, -1)[rank], mlp.chunk(2, -1)[rank]], dim=-1)
            total = total + F.linear(local, weight.chunk(2, dim=1)[rank])
    assert torch.allclose(total, expected, atol=1e-5)


def test_qk_norm_across_heads_is_sharded_when_it_is_an_rms_norm(tiny_video):

    plan = build_tp_plan(load_pipeline(tiny_video, None, torch.float32).transformer, 2)
    assert (
        plan.skipped == {} and len(plan.attention) == 4
    )  # Wan: self- and cross-attention of 2 blocks
    assert sorted(plan.norms) == sorted(
        f"blocks.{b}.attn{a}.norm_{qk}" for b in (0, 1) for a in (1, 2) for qk in "qk"
    )
    assert set(plan.norms.values()) == {32}  # 4 heads x 8


def test_sana_glumbconv_is_sharded():
    from diffusers import SanaTransformer2DModel

    model = SanaTransformer2DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=4,
        attention_head_dim=8,
        num_layers=2,
        num_cross_attention_heads=4,
        cross_attention_head_dim=8,
        cross_attention_dim=32,
        caption_channels=32,
        sample_size=8,
    )
    plan = build_tp_plan(model, 2)
    assert (
        plan.convs == ["transformer_blocks.0.ff", "transformer_blocks.1.ff"] and plan.skipped == {}
    )
    assert set(plan.convs) <= set(plan.feedforward) and len(plan.attention) == 4


def test_sharded_rms_norm_equals_the_whole_one():
    """Each rank's part of an RMSNorm over all heads, scaled by the all-reduced sum of
    squares (summed here by hand), is the whole norm's output block."""

    torch.manual_seed(0)
    norm = nn.RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16))
    x = torch.randn(2, 3, 16)
    shards = [ShardedRMSNorm(norm, 16, rank, 2, group=None) for rank in range(2)]
    squares = sum(part.pow(2).sum(-1, keepdim=True) for part in x.chunk(2, -1))
    with torch.no_grad():
        parts = [
            (piece * torch.rsqrt(squares / 16 + 1e-6)) * shard.weight
            for piece, shard in zip(x.chunk(2, -1), shards, strict=True)
        ]
        assert torch.allclose(torch.cat(parts, -1), norm(x), atol=1e-5)


# -- gated feed-forward arithmetic, simulated over tp "ranks" --------------------------------
def test_gated_row_order_pairs_each_hidden_block_with_its_gate_block():
    assert gated_row_order(4, 2).tolist() == [0, 1, 4, 5, 2, 3, 6, 7]
    assert gated_row_order(6, 3).tolist() == [0, 1, 6, 7, 2, 3, 8, 9, 4, 5, 10, 11]
    assert gated_row_order(4, 1).tolist() == list(range(8))


def simulate_tp(ff: nn.Module, x: torch.Tensor, tp: int, permute: bool) -> torch.Tensor:
    """What tp ranks compute: rank r holds rows block r of the (permuted) projection and
    columns block r of the output linear; the partial outputs are summed (the all-reduce)."""
    act, out = ff.net[0], ff.net[2]
    weight, bias = act.proj.weight, act.proj.bias
    if permute:
        order = gated_row_order(out.in_features, tp)
        weight, bias = weight[order], bias[order]
    total = out.bias.clone()
    for rank in range(tp):
        projected = F.linear(x, weight.chunk(tp)[rank], bias.chunk(tp)[rank])
        hidden, gate = projected.chunk(2, dim=-1)  # what GEGLU/SwiGLU do on the local shard
        local = hidden * (F.gelu(gate) if type(act).__name__ == "GEGLU" else F.silu(gate))
        total = total + F.linear(local, out.weight.chunk(tp, dim=1)[rank])
    return total


@pytest.mark.parametrize("activation", ["geglu", "swiglu"])
@pytest.mark.parametrize("tp", [2, 4])
def test_permuted_gated_projection_is_exact_and_a_plain_split_is_not(activation, tp):
    from diffusers.models.attention import FeedForward

    torch.manual_seed(0)
    ff = FeedForward(16, activation_fn=activation).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        expected = ff(x)
        permuted = simulate_tp(ff, x, tp, permute=True)
        plain = simulate_tp(ff, x, tp, permute=False)
    assert torch.allclose(permuted, expected, atol=1e-5)
    assert (plain - expected).abs().max() > 1e-2


# -- the real DTensor path, on a one-rank group ----------------------------------------------
@pytest.fixture(scope="module")
def one_rank_mesh():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if dist.is_initialized():
        pytest.skip("a default process group is already up in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1, 1, 1), mesh_dim_names=("dp", "cfg", "tp"))
    finally:
        dist.destroy_process_group()


def test_one_way_tensor_parallel_runs_the_dtensor_path_unchanged(one_rank_mesh):
    from torch.distributed.tensor import DTensor

    model, inputs = tiny_dit(), dit_inputs()
    with torch.inference_mode():
        expected = model(**inputs, return_dict=False)[0]
    report = apply_tensor_parallel(model, one_rank_mesh["tp"])
    assert isinstance(model.transformer_blocks[0].attn1.to_q.weight, DTensor)
    assert report.param_bytes_before == report.param_bytes_after == param_bytes(model)
    assert "sharded 4 attention and 2 feed-forward" in report.summary()
    with torch.inference_mode():
        got = model(**inputs, return_dict=False)[0]
    assert torch.allclose(got, expected, atol=1e-6)


def test_cfg_wrapper_keeps_the_forward_signature_and_can_be_removed(one_rank_mesh):
    model = tiny_dit()
    inputs = dit_inputs(batch=2)
    signature = inspect.signature(model.forward)
    with torch.inference_mode():
        expected = model(**inputs)
        handle = enable_cfg_parallel(model, one_rank_mesh["cfg"])
        assert cfg_parallel_of(model) is handle
        assert inspect.signature(model.forward) == signature  # pipelines inspect it
        got = model(**inputs)
    assert type(got) is type(expected) and torch.equal(got.sample, expected.sample)
    assert (handle.split_calls, handle.whole_calls) == (0, 1)  # a 1-rank cfg group never splits
    with pytest.raises(RuntimeError, match="already enabled"):
        enable_cfg_parallel(model, one_rank_mesh["cfg"])
    assert disable_cfg_parallel(model) and "forward" not in model.__dict__
    assert not disable_cfg_parallel(model)


def test_sequence_parallel_after_cfg_parallel_is_refused(one_rank_mesh):
    """Context parallel's hooks must sit inside CFG's split: enabling them after it fails."""

    model = tiny_dit()
    enable_cfg_parallel(model, one_rank_mesh["cfg"])
    report = ParallelReport(ParallelLayout(world_size=2, ulysses=2), "transformer", None, None)
    with pytest.raises(RuntimeError, match="before CFG parallel"):
        parallel_sp(SimpleNamespace(transformer=model), report, one_rank_mesh)


def test_split_decision_and_output_rebuild():
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    class TwoRanks:
        def size(self):
            return 2

        def get_local_rank(self):
            return 1

    wrapper = CFGParallel(nn.Identity(), TwoRanks())
    latents = torch.randn(2, 4, 8, 8)
    assert wrapper.should_split(torch.cat([latents] * 2))  # how guided pipelines build it
    assert not wrapper.should_split(latents)  # two different samples: guidance off
    assert not wrapper.should_split(latents[:1])  # odd batch
    assert not wrapper.should_split(torch.tensor(3.0))
    assert CFGParallel(nn.Identity(), TwoRanks(), any_even_batch=True).should_split(latents)
    output = Transformer2DModelOutput(sample=latents)
    rebuilt = pytree.tree_map_only(
        torch.Tensor, lambda tensor: tensor * 2, (output, {"a": [latents]})
    )
    assert type(rebuilt[0]) is Transformer2DModelOutput and torch.equal(
        rebuilt[0].sample, latents * 2
    )
    assert torch.equal(rebuilt[1]["a"][0], latents * 2)
