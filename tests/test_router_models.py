"""Every router inside vit_moe and bert_moe, and through ``ckptforge upcycle --router`` (issue 4)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from ckptforge.modeling import BertMoEConfig, BertMoEForSequenceClassification, ViTMoEConfig, ViTMoEForImageClassification
from ckptforge.cli import main
from ckptforge.moe import ROUTER_TYPES

from conftest import cli_env

ROUTER_FLAGS = {"topk": ["--capacity-factor", "1.5"], "expert-choice": [], "soft": ["--slots", "2"],
                "sphero": ["--universal-experts", "4", "--combine", "entmax15"], "mh": ["--heads", "2"]}


def _model(family: str, router: dict):
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, moe_layers=[1],
                  num_experts=4, num_experts_per_tok=2, expert_intermediate_size=32, moe_router=router)
    if family == "vit":
        model = ViTMoEForImageClassification(ViTMoEConfig(image_size=28, patch_size=7, num_channels=1, num_labels=3, **common))
        return model, {"pixel_values": torch.randn(2, 1, 28, 28)}
    model = BertMoEForSequenceClassification(BertMoEConfig(vocab_size=50, max_position_embeddings=16, num_labels=3, **common))
    return model, {"input_ids": torch.randint(0, 50, (2, 7))}


@pytest.mark.parametrize("family", ["vit", "bert"])
@pytest.mark.parametrize("kind", sorted(ROUTER_TYPES))
def test_router_in_model_trains_saves_and_reloads(family, kind, tmp_path):
    torch.manual_seed(0)
    router = {"type": kind, "heads": 2} if kind == "mh" else {"type": kind}
    model, inputs = _model(family, router)
    out = model(**inputs, labels=torch.tensor([0, 2]))
    loss = out.loss + (out.aux_loss if out.aux_loss is not None else 0)
    loss.backward()
    moe = model.base_model.encoder.layer[1].moe
    assert all(p.grad is not None for p in moe.parameters() if p.requires_grad)
    model.save_pretrained(tmp_path)
    reloaded, info = type(model).from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert json.loads((tmp_path / "config.json").read_text())["moe_router"]["type"] == kind
    torch.testing.assert_close(reloaded.eval()(**inputs).logits, model.eval()(**inputs).logits)


@pytest.mark.slow
def test_upcycle_with_every_router_loads_without_ckptforge(tiny, tmp_path):
    dense = tiny("vit")
    for kind in ROUTER_TYPES:
        assert main(["upcycle", str(dense), "--out", str(tmp_path / kind), "--experts", "4", "--router", kind,
                     *ROUTER_FLAGS[kind], "--quiet"]) == 0
        assert json.loads((tmp_path / kind / "config.json").read_text())["moe_router"]["type"] == kind
        assert sorted(p.name for p in (tmp_path / kind).glob("*.py")) == ["configuration_vit_moe.py", "modeling_vit_moe.py"]
    script = f"""
import sys, torch
sys.modules['ckptforge'] = None
from transformers import AutoModelForImageClassification
for kind in {list(ROUTER_TYPES)!r}:
    m, info = AutoModelForImageClassification.from_pretrained({str(tmp_path)!r} + '/' + kind, trust_remote_code=True,
                                                              output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert type(m.vit.encoder.layer[1].moe).__module__.startswith('transformers_modules')
    print(m.config.moe_router['type'], tuple(m(torch.randn(1, 1, 28, 28)).logits.shape))
"""
    env = cli_env()
    env["PYTHONPATH"] = ""
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [w for kind in ROUTER_TYPES for w in (kind, "(1,", "10)")]


def test_sphero_universal_experts_are_uniform_subsets_of_recycled_experts(tiny, tmp_path):
    from safetensors.torch import load_file

    dense = tiny("vit")
    out = tmp_path / "sphero"
    assert main(["upcycle", str(dense), "--out", str(out), "--experts", "2", "--router", "sphero", "--layers", "1", "-q"]) == 0
    moe, src = load_file(out / "model.safetensors"), load_file(dense / "model.safetensors")
    fc1 = src["vit.encoder.layer.1.intermediate.dense.weight"]
    keep = torch.linspace(0, 63, 16).round().long()
    assert moe["vit.encoder.layer.1.moe.universal_experts.w1"].shape == (4, 16, 32)
    torch.testing.assert_close(moe["vit.encoder.layer.1.moe.universal_experts.w1"][3], fc1[keep])
    torch.testing.assert_close(moe["vit.encoder.layer.1.moe.experts.w1"][0], fc1)
    slots = moe["vit.encoder.layer.1.moe.router.slots"]
    torch.testing.assert_close(slots @ slots.T, torch.eye(6), atol=1e-5, rtol=0)
    assert moe["vit.encoder.layer.1.moe.router.dispatch_temperature"].item() == 0.5


def test_mh_router_with_one_head_reproduces_the_dense_model(tiny, tmp_path, capsys):
    code = main(["upcycle", str(tiny("vit")), "--out", str(tmp_path / "mh"), "--experts", "4", "--router", "mh",
                 "--heads", "1", "--verify", "--json"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["verify"]["final"]["relative"] < 1e-5


@pytest.mark.parametrize(("args", "message"), [
    (["--router", "sphero"], "error: --router sphero is not available for the llama family: its output loads with the "
     "stock transformers router (topk); drop --router or convert a ViT or BERT model"),
    (["--router", "moe"], "error: --router 'moe' is not one of topk, expert-choice, soft, sphero, mh"),
])
def test_llama_and_unknown_routers_are_refused(tiny, tmp_path, args, message, capsys):
    assert main(["upcycle", str(tiny("llama")), "--out", str(tmp_path / "o"), "--experts", "4", *args]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == message
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--router", "mh", "--heads", "5"], "error: --heads 5 does not divide hidden size 32; use a divisor of 32"),
    (["--router", "soft", "--bpr"], "error: --bpr does not apply to --router soft; it is a setting of --router topk or "
     "--router mh: drop it or use that router"),
    (["--router", "topk", "--capacity-factor", "0"], "error: --capacity-factor 0.0 must be positive"),
    (["--router", "sphero", "--drop-path", "1.5"], "error: --drop-path 1.5 must be in [0, 1)"),
])
def test_bad_router_options_exit_2(tiny, tmp_path, args, message, capsys):
    assert main(["upcycle", str(tiny("vit")), "--out", str(tmp_path / "o"), *args]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == message
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("router", [
    {"type": "topk", "capacity_factor": 1.0}, {"type": "expert-choice"}, {"type": "soft", "slots": 2},
    {"type": "sphero"}, {"type": "mh", "heads": 2, "capacity_factor": 1.0},
], ids=lambda r: r["type"])
def test_padding_changes_no_real_token_of_a_bert_moe(router):
    """Routers that look across tokens (capacity, expert choice, soft slots) ignore padded positions."""
    torch.manual_seed(0)
    model, inputs = _model("bert", router)
    model.eval()
    ids = inputs["input_ids"]
    padded = torch.cat([ids, torch.randint(0, 50, (2, 5))], dim=1)
    mask = torch.cat([torch.ones_like(ids), torch.zeros(2, 5, dtype=ids.dtype)], dim=1)
    with torch.no_grad():
        plain = model.bert(ids).last_hidden_state
        with_padding = model.bert(padded, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(with_padding[:, : ids.shape[1]], plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("router, share", [
    ({"type": "topk"}, 2 / 4), ({"type": "expert-choice"}, 2.0 / 4), ({"type": "mh", "heads": 2}, 1.0),
    ({"type": "soft"}, 1.0), ({"type": "sphero"}, 1.0),
], ids=lambda v: v["type"] if isinstance(v, dict) else None)
def test_active_parameters_follow_the_router_type(dense, tmp_path, router, share):
    """Top-k uses k of E experts per token, expert choice C of E on average, MH-MoE up to h·k of E,
    soft / sphero every expert; the plan and ``inspect`` of the output agree."""
    from ckptforge import inspect_source, upcycle
    from ckptforge.config import UpcycleOptions

    plan = upcycle(dense, tmp_path / "moe", UpcycleOptions(num_experts=4, top_k=2, router=router)).plan
    expert = sum(t.numel for t in plan.tensors if t.op == "expert")
    assert expert > 0
    assert plan.params_active == plan.params_total - expert + round(expert * share)
    assert inspect_source(str(tmp_path / "moe"))["params_active"] == plan.params_active
