"""Issue 12, defect "load-balancing loss weighted twice or not at all": the weight has one owner
(the MoE's router settings, or a stock model's ``router_aux_loss_coef``). Measured per router: the
term a training step adds to the task loss divided by the routers' raw load-balancing loss."""

from __future__ import annotations

import pytest
import torch
import transformers

from ckptforge.modeling import ViTMoEConfig, ViTMoEForImageClassification
from ckptforge.moe.routers import load_balancing_loss
from ckptforge.training import set_aux_weight, training_loss


def _vit(router: dict) -> ViTMoEForImageClassification:
    torch.manual_seed(0)
    config = ViTMoEConfig(image_size=28, patch_size=7, num_channels=1, num_labels=3, hidden_size=32,
                          num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, moe_layers=[0, 1],
                          num_experts=4, num_experts_per_tok=2, expert_intermediate_size=32, moe_router=router)
    return ViTMoEForImageClassification(config).train()


def _raw_load_balancing(model) -> torch.Tensor:
    blocks = [m for m in model.modules() if getattr(m, "last_routing", None) is not None]
    assert blocks
    return sum(load_balancing_loss(b.last_routing.probs, b.last_routing.expert_index, b.last_routing.probs.shape[-1])
               for b in blocks)


def _effective(model, batch, task: str) -> float:
    total, losses, _ = training_loss(model, batch, task)
    return float((total - losses.mean()).detach() / _raw_load_balancing(model).detach())


BATCH = [torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 0])]


@pytest.mark.parametrize("router", [{"type": "topk"}, {"type": "mh", "heads": 2}])
@pytest.mark.parametrize("weight", [None, 0.2])
def test_the_stored_weight_is_the_effective_coefficient(router, weight):
    stored = router if weight is None else {**router, "aux_loss_weight": weight}
    model = _vit(stored)
    assert _effective(model, BATCH, "image-classification") == pytest.approx(0.01 if weight is None else 0.2, rel=1e-5)


@pytest.mark.parametrize("router", [{"type": "topk"}, {"type": "mh", "heads": 2}])
def test_finetune_aux_weight_replaces_the_stored_weight_not_multiplies_it(router):
    model = _vit({**router, "aux_loss_weight": 0.2})
    set_aux_weight(model, 0.5)
    assert _effective(model, BATCH, "image-classification") == pytest.approx(0.5, rel=1e-5)


@pytest.mark.parametrize("router", [{"type": "expert-choice"}, {"type": "soft"}, {"type": "sphero"}])
def test_routers_without_a_load_balancing_loss_add_nothing(router):
    total, losses, aux = training_loss(_vit(router), BATCH, "image-classification")
    assert aux is None or float(aux) == 0.0
    assert torch.equal(total, losses.mean() + (aux if aux is not None else 0.0))


def test_a_stock_mixtral_uses_its_router_aux_loss_coef_once():
    torch.manual_seed(0)
    config = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, router_aux_loss_coef=0.2)
    model = transformers.MixtralForCausalLM(config).eval()
    blocks = [torch.randint(0, 64, (2, 9))]
    raw = model(input_ids=blocks[0][:, :-1], use_cache=False, output_router_logits=True).aux_loss
    total, losses, _ = training_loss(model, blocks, "causal-lm")
    assert float((total - losses.mean()) / raw) == pytest.approx(0.2, rel=1e-5)


@pytest.mark.parametrize("flags", [{}, {"aux_loss_weight": 0.05}])
def test_a_stock_output_stores_the_router_settings_weight(tmp_path, flags):
    """A Mixtral output trains with the router settings' load-balancing weight (default 0.01, or
    --aux-loss-weight), not transformers' own config default (0.001)."""
    import json

    import ckptforge
    from ckptforge.moe.settings import TopKSettings
    from conftest import build_tiny

    src = build_tiny("llama", tmp_path / "dense")
    options = ckptforge.UpcycleOptions(num_experts=4, layers="all", router={"type": "topk", **flags})
    ckptforge.upcycle(src, tmp_path / "moe", options)
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert config["model_type"] == "mixtral"
    assert config["router_aux_loss_coef"] == flags.get("aux_loss_weight", TopKSettings().aux_loss_weight)
