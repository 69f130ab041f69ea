"""Properties of the runtime MoE layers (issue 4): capacity, BPR, expert choice, soft/sphero, MH-MoE."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ckptforge.moe import (
    ROUTER_TYPES, ExpertChoiceRouter, MoEFeedForward, MultiHeadMoEFeedForward, SlotRouter, SoftMoEFeedForward,
    TopKRouter, build_moe_layer, entmax15,
)
from ckptforge.moe.routers import capacity_mask


def _assign_counts(index: torch.Tensor, num_experts: int) -> torch.Tensor:
    flat = index.reshape(-1)
    return torch.bincount(flat[flat >= 0], minlength=num_experts)


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 1.25])
def test_topk_capacity_is_never_exceeded(capacity_factor):
    torch.manual_seed(0)
    router = TopKRouter(16, 4, 2, capacity_factor=capacity_factor)
    router.weight.data[0] += 1.0  # skew the router so expert 0 overflows
    r = router(torch.randn(50, 16) + 0.5)
    cap = router.capacity(50)
    assert cap == round(2 * 50 * capacity_factor / 4)
    counts = _assign_counts(r.expert_index, 4)
    assert counts.max() <= cap
    assert (r.weights[r.expert_index < 0] == 0).all()
    if capacity_factor < 1:
        assert (r.expert_index < 0).any()


def test_topk_large_capacity_drops_nothing():
    torch.manual_seed(1)
    router = TopKRouter(16, 4, 2, capacity_factor=100.0)
    router.weight.data[1] += 1.0
    r = router(torch.randn(40, 16) + 0.5)
    assert (r.expert_index >= 0).all()


def test_bpr_keeps_highest_priority_tokens_not_first_positions():
    # all 4 tokens want expert 0; capacity 2; priorities rise with position
    index = torch.zeros(4, 1, dtype=torch.long)
    priority = torch.tensor([0.1, 0.2, 0.9, 0.8])
    assert capacity_mask(index, 2, 2, priority)[:, 0].tolist() == [False, False, True, True]
    assert capacity_mask(index, 2, 2, None)[:, 0].tolist() == [True, True, False, False]


def test_bpr_in_the_router_uses_max_routing_weight():
    router = TopKRouter(2, 2, 1, capacity_factor=0.5, bpr=True, noise_std=0.0)  # capacity round(1·4·0.5/2)=1
    router.weight.data = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    x = torch.tensor([[0.1, 0.0], [0.2, 0.0], [3.0, 0.0], [1.0, 0.0]])  # all prefer expert 0; token 2 most
    r = router.eval()(x)
    assert (r.expert_index[:, 0] >= 0).tolist() == [False, False, True, False]
    router.bpr = False
    assert (router(x).expert_index[:, 0] >= 0).tolist() == [True, False, False, False]


def test_first_choices_are_served_before_second_choices():
    index = torch.tensor([[1, 0], [0, 1]])  # token 0's second choice and token 1's first choice both expert 0
    keep = capacity_mask(index, 2, 1, torch.tensor([0.9, 0.6]))
    assert keep.tolist() == [[True, False], [True, False]]


def test_k1_router_gets_gradients():
    torch.manual_seed(0)
    moe = MoEFeedForward(8, 16, 4, 1, "gelu", {"type": "topk", "normalize": False})
    moe(torch.randn(2, 5, 8)).sum().backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0


def test_training_noise_changes_routing_only_in_training():
    torch.manual_seed(0)
    router = TopKRouter(8, 4, 2)
    assert router.noise_std == pytest.approx(0.25)
    x = torch.randn(30, 8)
    assert torch.equal(router.eval()(x).probs, router(x).probs)
    assert not torch.equal(router.train()(x).probs, router.eval()(x).probs)


def test_aux_loss_is_weighted():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    torch.manual_seed(0)
    plain = MoEFeedForward(8, 16, 4, 2, "gelu", {"type": "topk", "aux_loss_weight": 1.0}).eval()
    torch.manual_seed(0)
    weighted = MoEFeedForward(8, 16, 4, 2, "gelu", {"type": "topk"}).eval()
    plain(x), weighted(x)
    assert weighted.aux_loss.item() == pytest.approx(0.01 * plain.aux_loss.item())


def _dense_ffn(d=8, d_ff=16):
    torch.manual_seed(0)
    return nn.Linear(d, d_ff), nn.Linear(d_ff, d)


def _copy_all(moe_experts, fc1, fc2):
    with torch.no_grad():
        moe_experts.w1.copy_(fc1.weight.expand_as(moe_experts.w1))
        moe_experts.b1.copy_(fc1.bias.expand_as(moe_experts.b1))
        moe_experts.w2.copy_(fc2.weight.expand_as(moe_experts.w2))
        moe_experts.b2.copy_(fc2.bias.expand_as(moe_experts.b2))


def test_renormalised_topk_with_copy_all_experts_is_the_dense_ffn():
    fc1, fc2 = _dense_ffn()
    moe = MoEFeedForward(8, 16, 4, 2, "gelu", {"type": "topk", "normalize": True}).eval()
    _copy_all(moe.experts, fc1, fc2)
    x = torch.randn(3, 7, 8)
    torch.testing.assert_close(moe(x), fc2(nn.functional.gelu(fc1(x))), rtol=1e-5, atol=1e-6)


def test_expert_choice_each_expert_processes_exactly_its_capacity():
    torch.manual_seed(0)
    router = ExpertChoiceRouter(8, 4, capacity_factor=2.0)
    r = router(torch.randn(10, 8))
    assert router.capacity(10) == 5
    assert _assign_counts(r.expert_index, 4).tolist() == [5, 5, 5, 5]
    per_token = (r.expert_index >= 0).sum(1)
    assert per_token.min() >= 0 and per_token.max() <= 4 and per_token.sum() == 20


def test_expert_choice_token_may_get_several_or_no_experts():
    router = ExpertChoiceRouter(2, 3, capacity_factor=1.0)  # capacity ⌈1·3/3⌉ = 1 of 3 tokens
    router.weight.data = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    # token 0: uniform 1/3 (wins experts 1, 2); tokens 1 and 2 both want expert 0, token 1 more
    r = router(torch.tensor([[0.0, 0.0], [3.0, 0.0], [2.0, 0.0]]))
    assert (r.expert_index >= 0).sum(1).tolist() == [2, 1, 0]


def test_slot_router_weights_sum_to_one_and_logits_are_bounded():
    torch.manual_seed(0)
    router = SlotRouter(8, 6)
    x = torch.randn(2, 5, 8) * 10
    dispatch, combine = router(x)
    torch.testing.assert_close(dispatch.sum(1), torch.ones(2, 6))
    torch.testing.assert_close(combine.sum(2), torch.ones(2, 5))
    logits = router.cosine(x) / router.dispatch_temperature
    assert logits.abs().max() <= 1 / 0.5 + 1e-5


@pytest.mark.parametrize("combine", ["softmax", "entmax15"])
def test_temperatures_receive_gradients(combine):
    torch.manual_seed(0)
    moe = SoftMoEFeedForward(8, 16, 2, "gelu", slots=2, universal_experts=4, universal_width=4, combine=combine)
    moe(torch.randn(2, 5, 8)).pow(2).sum().backward()
    assert moe.router.dispatch_temperature.grad.abs() > 0
    assert moe.router.combine_temperature.grad.abs() > 0


def test_entmax15_sums_to_one_and_is_sparse():
    p = entmax15(torch.tensor([[2.0, 1.9, -3.0, -4.0]]))
    torch.testing.assert_close(p.sum(-1), torch.ones(1))
    assert (p == 0).any() and (p > 0).sum() == 2


def test_dual_path_shapes():
    moe = build_moe_layer(8, 16, 3, 1, "gelu", {"type": "sphero", "slots": 2})
    assert moe.experts.w1.shape == (3, 16, 8)
    assert moe.universal_experts.w1.shape == (6, 4, 8)
    assert moe.router.slots.shape == (18, 8)
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    assert moe(x).shape == x.shape
    assert build_moe_layer(8, 16, 3, 1, "gelu", {"type": "soft"}).universal_experts is None


def test_mh_moe_with_one_head_and_identity_projections_is_topk_moe():
    torch.manual_seed(0)
    mh = MultiHeadMoEFeedForward(8, 16, 4, 2, "gelu", heads=1).eval()
    with torch.no_grad():
        for proj in (mh.head_proj, mh.merge_proj):
            proj.weight.copy_(torch.eye(8))
            proj.bias.zero_()
    topk = MoEFeedForward(8, 16, 4, 2, "gelu", {"type": "topk"}).eval()
    topk.load_state_dict({k: v for k, v in mh.state_dict().items() if not k.startswith(("head_", "merge_"))})
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(mh(x), topk(x))


def test_mh_moe_shapes_for_several_heads():
    mh = MultiHeadMoEFeedForward(8, 16, 4, 2, "gelu", heads=4)
    assert mh.experts.w1.shape == (4, 16, 2) and mh.router.weight.shape == (4, 2)
    x = torch.randn(3, 5, 8, requires_grad=True)
    mh(x).sum().backward()
    assert mh.last_routing.expert_index.shape == (3 * 5 * 4, 2)
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("kind", sorted(ROUTER_TYPES))
def test_every_router_type_forward_backward(kind):
    torch.manual_seed(0)
    moe = build_moe_layer(8, 16, 4, 2, "gelu", {"type": kind, "heads": 2})
    x = torch.randn(2, 5, 8, requires_grad=True)
    moe(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_unknown_router_type_is_refused():
    with pytest.raises(ValueError, match="router type 'nope' is not available"):
        build_moe_layer(8, 16, 4, 2, "gelu", {"type": "nope"})
