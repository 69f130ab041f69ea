"""Issue 12: the plan is the single truth of a conversion's MoE layers. It carries each layer's block
layout and the output scale folded into its down weights; the executor makes every tensor as the
plan says (one handler per :class:`TensorOp`) and recomputes neither."""

from __future__ import annotations

import dataclasses

import pytest
from safetensors import safe_open

from ckptforge.config import UpcycleOptions
from ckptforge.execute import _MAKERS, upcycle
from ckptforge.io.source import open_checkpoint
from ckptforge.moe.layout import moe_tensor_layout
from ckptforge.plan import MoELayerPlan, TensorOp, build_plan


def _read(directory, name):
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        return f.get_tensor(name)


def test_every_tensor_operation_has_one_maker():
    assert set(_MAKERS) == set(TensorOp)


@pytest.mark.parametrize(("source", "router", "strategy", "stored"), [
    ("examples/tiny-llama-pydoc", {"type": "topk"}, {"name": "granular"}, False),  # qwen2_moe: folded in
    ("examples/tiny-vit-mnist", {"type": "sphero"}, {"name": "granular"}, True),  # vit_moe: moe_output_scale
    ("examples/tiny-vit-mnist", {"type": "mh", "heads": 2}, {"name": "copy-all"}, True),
])
def test_the_plan_carries_each_moe_layers_layout_and_folded_scale(source, router, strategy, stored):
    options = UpcycleOptions(num_experts=4, strategy=strategy["name"], router=router)
    plan = build_plan(open_checkpoint(source), options)
    assert sorted(plan.moe) == plan.moe_layers
    scale = 2.0  # granular's default output scale is k (2); copy-all's is 1
    for block in plan.moe.values():
        assert block.layout == moe_tensor_layout(router, plan.dims.hidden_size, 4, plan.expert_width)
        assert block.down_scale == (1.0 if stored or strategy["name"] == "copy-all" else scale)
    assert all(isinstance(t.op, TensorOp) for t in plan.tensors)
    assert ("moe_output_scale" in plan.output_config) is stored


def test_the_executor_follows_the_plans_folded_scale(tmp_path):
    ckpt = open_checkpoint("examples/tiny-llama-pydoc")
    options = UpcycleOptions(num_experts=4, strategy="granular")
    plan = build_plan(ckpt, options)
    layer = plan.moe_layers[0]
    assert plan.moe[layer].down_scale == 2.0
    upcycle(ckpt, tmp_path / "planned", options, plan=plan)
    unscaled = dataclasses.replace(plan, moe={i: MoELayerPlan(b.layout, 1.0) for i, b in plan.moe.items()})
    upcycle(open_checkpoint("examples/tiny-llama-pydoc"), tmp_path / "unscaled", options, plan=unscaled)
    name = next(t.name for t in plan.tensors if t.layer == layer and t.role == "down" and t.expert == 1)
    planned, plain = _read(tmp_path / "planned", name), _read(tmp_path / "unscaled", name)
    assert (planned.float() == (plain.float() * 2.0).to(plain.dtype).float()).all() and not planned.equal(plain)


def test_the_executor_follows_the_plans_block_layout(tmp_path):
    """A plan whose sphero block recycles universal experts from further experts is written as planned."""
    ckpt = open_checkpoint("examples/tiny-vit-mnist")
    options = UpcycleOptions(num_experts=2, router={"type": "sphero", "universal_experts": 2}, strategy="random")
    plan = build_plan(ckpt, options)
    upcycle(ckpt, tmp_path / "moe", options, plan=plan)
    layer = plan.moe_layers[0]
    group = plan.moe[layer].layout.groups[1]
    universal = _read(tmp_path / "moe", f"vit.encoder.layer.{layer}.moe.universal_experts.w1")
    assert universal.shape[0] == group.count and universal.shape[1] == group.width
