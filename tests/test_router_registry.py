"""Facts about a router type live in its registry entry and settings (issue 12): which routers keep
copy-all experts exactly dense, and the one check of a router's values."""

from __future__ import annotations

import pytest
import torch

from ckptforge.moe import build_moe_layer, exact_routing
from ckptforge.moe.layer import ROUTERS

ROUTER_CASES = [
    {"type": "topk"}, {"type": "topk", "normalize": False}, {"type": "topk", "capacity_factor": 0.5},
    {"type": "expert-choice"}, {"type": "soft"}, {"type": "sphero"}, {"type": "mh", "heads": 2},
]


def _copy_all_block(router: dict) -> tuple[torch.nn.Module, torch.nn.Module]:
    """An MoE block whose 4 experts are all the same dense FFN, and that FFN."""
    torch.manual_seed(0)
    dense = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    block = build_moe_layer(8, 16, 4, 2, "gelu", router).eval()
    experts = [m for name, m in block.named_modules() if name.endswith("experts") and hasattr(m, "w1")]
    if router["type"] == "mh":  # experts of width d/h: not copies of the dense FFN
        return block, dense
    with torch.no_grad():
        for group in experts:
            group.w1.copy_(dense[0].weight[: group.w1.shape[1]])
            group.b1.copy_(dense[0].bias[: group.w1.shape[1]])
            group.w2.copy_(dense[2].weight[:, : group.w1.shape[1]])
            group.b2.copy_(dense[2].bias)
    return block, dense


def test_every_router_type_is_covered():
    assert {case["type"] for case in ROUTER_CASES} == set(ROUTERS)


@pytest.mark.parametrize("router", ROUTER_CASES, ids=str)
def test_exact_routers_reproduce_the_dense_ffn_and_the_others_do_not(router):
    block, dense = _copy_all_block(router)
    x = torch.randn(3, 10, 8)
    with torch.no_grad():
        same = torch.allclose(block(x), dense(x), atol=1e-5)
    assert exact_routing(router) is same
    assert exact_routing(router) is (router in ({"type": "topk"},))


def test_stored_router_without_settings_is_exact_renormalised_topk():
    assert exact_routing(None) and exact_routing({"type": "topk", "normalize": True})


@pytest.mark.parametrize(("router", "message"), [
    ({"type": "soft", "combine": "sparsemax"}, "--combine 'sparsemax' is not one of softmax, entmax15"),
    ({"type": "sphero", "slots": 0}, "--slots 0 must be positive"),
    ({"type": "mh", "heads": 3}, "--heads 3 does not divide hidden size 8; use a divisor of 8"),
])
def test_a_bad_router_value_is_refused_by_its_settings_when_a_block_is_built(router, message):
    with pytest.raises(ValueError, match=message):
        build_moe_layer(8, 16, 4, 2, "gelu", router)
