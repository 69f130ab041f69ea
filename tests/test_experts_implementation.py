"""Experts on grouped GEMMs (issue 15): ``experts_implementation`` grouped_mm equals the per-expert loop
(forward and every gradient) for every router; the choice is a config field that loading honours."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import ckptforge
from ckptforge.moe import ROUTER_TYPES, StackedExperts, build_moe_layer
from ckptforge.moe.experts import EXPERTS_IMPLEMENTATIONS, grouped_mm_compute_dtype, set_experts_implementation

#: Router settings that make every path run: capacity drops (top-k, MH), expert choice, slots.
_ROUTERS = {
    "topk": {"type": "topk", "normalize": True, "capacity_factor": 0.75, "noise_std": 0.0},
    "expert-choice": {"type": "expert-choice", "capacity_factor": 1.5},
    "soft": {"type": "soft"},
    "sphero": {"type": "sphero"},
    "mh": {"type": "mh", "heads": 2, "capacity_factor": 1.0, "noise_std": 0.0},
}


class _CountingGroupedMM:
    """Counts calls to the real torch.nn.functional.grouped_mm and passes them through."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = nn.functional.grouped_mm

        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(nn.functional, "grouped_mm", counted)


class _count_expert_calls:
    """Counts calls to StackedExperts.forward (token-routed experts) and passes them through."""

    def __init__(self, monkeypatch):
        self.count = 0
        real = StackedExperts.forward

        def counted(module, *args, **kwargs):
            self.count += 1
            return real(module, *args, **kwargs)

        monkeypatch.setattr(StackedExperts, "forward", counted)


def _run(layer: nn.Module, x: torch.Tensor, mask: torch.Tensor, upstream: torch.Tensor):
    x = x.clone().requires_grad_(True)
    out = layer(x, mask)
    (out * upstream).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return out.detach(), x.grad.clone(), grads


def test_every_router_has_settings_here():
    assert set(_ROUTERS) == set(ROUTER_TYPES)


@pytest.mark.parametrize("router", sorted(ROUTER_TYPES))
def test_grouped_mm_equals_the_loop_forward_and_backward(router, monkeypatch):
    torch.manual_seed(0)
    eager = build_moe_layer(16, 24, 4, 2, "gelu", _ROUTERS[router], experts_implementation="eager")
    for p in eager.parameters():  # non-zero biases, so a bias applied to the wrong expert shows
        nn.init.normal_(p, std=0.3)
    grouped = copy.deepcopy(eager)
    set_experts_implementation(grouped, "grouped_mm")
    x, upstream = torch.randn(3, 7, 16), torch.randn(3, 7, 16)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 5:] = False  # a padded batch
    spy = _CountingGroupedMM(monkeypatch)
    ref_out, ref_dx, ref_grads = _run(eager.train(), x, mask, upstream)
    assert spy.calls == 0
    expert_calls = _count_expert_calls(monkeypatch)
    out, dx, grads = _run(grouped.train(), x, mask, upstream)
    token_routed = router in ("topk", "expert-choice", "mh")
    # two grouped GEMMs per experts call (real tokens, and for top-k the padded ones routed outside
    # the capacity accounting); soft/sphero run one bmm per group already
    assert spy.calls == (2 * expert_calls.count if token_routed else 0) and (expert_calls.count > 0) == token_routed
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and any("w1" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_grouped_mm_with_every_token_dropped_returns_zeros():
    experts = StackedExperts(4, 8, 16, "gelu", implementation="grouped_mm")
    out = experts(torch.randn(5, 8), torch.full((5, 2), -1), torch.zeros(5, 2))
    assert out.shape == (5, 8) and not out.any()


def test_auto_picks_grouped_mm_on_cpu_for_fp32_and_bf16_only():
    assert grouped_mm_compute_dtype(torch.randn(4, 8), 8, 16) == torch.float32
    assert grouped_mm_compute_dtype(torch.randn(4, 8, dtype=torch.bfloat16), 8, 16) == torch.bfloat16
    assert grouped_mm_compute_dtype(torch.randn(4, 8, dtype=torch.float16), 8, 16) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert grouped_mm_compute_dtype(torch.randn(4, 8), 8, 16) == torch.bfloat16


def test_auto_takes_the_loop_and_grouped_mm_refuses_unaligned_widths():
    x, index, weights = torch.randn(5, 6), torch.randint(0, 4, (5, 2)), torch.rand(5, 2)
    assert grouped_mm_compute_dtype(x, 6, 16) is None  # 6 fp32 values = 24 bytes
    assert StackedExperts(4, 6, 16, "gelu")(x, index, weights).shape == (5, 6)
    with pytest.raises(ValueError, match="hidden size 6 and expert width 16 in torch.float32 are not; use 'auto'"):
        StackedExperts(4, 6, 16, "gelu", implementation="grouped_mm")(x, index, weights)


def test_unknown_implementation_is_refused():
    with pytest.raises(ValueError, match="experts_implementation 'fast' is not one of auto, eager, grouped_mm"):
        StackedExperts(4, 8, 16, "gelu", implementation="fast")
    assert EXPERTS_IMPLEMENTATIONS == ("auto", "eager", "grouped_mm")


def test_from_pretrained_takes_the_implementation_and_outputs_match(tiny, tmp_path):
    from transformers import AutoModel

    out = tmp_path / "bert-moe"
    ckptforge.upcycle(tiny("bert"), out, ckptforge.UpcycleOptions(num_experts=4, layers="all", seed=3))
    ids = torch.randint(5, 120, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    outputs = {}
    for name in EXPERTS_IMPLEMENTATIONS:
        model = AutoModel.from_pretrained(out, experts_implementation=name).eval()
        assert model.config.experts_implementation == name
        assert {m.implementation for m in model.modules() if isinstance(m, StackedExperts)} == {name}
        with torch.no_grad():
            outputs[name] = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(outputs["grouped_mm"], outputs["eager"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outputs["auto"], outputs["grouped_mm"], rtol=0, atol=0)  # auto → grouped_mm on CPU
    model.set_experts_implementation("eager")
    assert {m.implementation for m in model.modules() if isinstance(m, StackedExperts)} == {"eager"}
    with pytest.raises(ValueError, match="is not one of auto, eager, grouped_mm"):
        AutoModel.from_pretrained(out, experts_implementation="fast")
    assert '`"grouped_mm"` or `"eager"`' in (out / "README.md").read_text()


def test_stock_moe_card_says_how_to_pick_transformers_experts_backend(tiny, tmp_path):
    out = tmp_path / "mixtral"
    ckptforge.upcycle(tiny("llama"), out, ckptforge.UpcycleOptions(num_experts=4, layers="all"))
    card = (out / "README.md").read_text()
    assert "`experts_implementation` in `from_pretrained`" in card and '`"batched_mm"`' in card


@pytest.mark.parametrize("router", sorted(ROUTER_TYPES))
def test_every_router_runs_forward_and_backward_in_bf16(router):
    torch.manual_seed(0)
    layer = build_moe_layer(16, 24, 4, 2, "gelu", _ROUTERS[router]).to(torch.bfloat16)
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16, requires_grad=True)
    out = layer(x)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()
