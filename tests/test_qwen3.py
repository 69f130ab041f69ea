"""Qwen3 → stock Qwen3-MoE: exact copy-all, clean loading, transformers' own tensor names; never
for LLaMA-like sources."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

from ckptforge import UpcycleOptions, upcycle
from ckptforge.errors import PlanError

from conftest import read_json, run_cli


def _keys(directory: Path) -> set[str]:
    keys: set[str] = set()
    for f in directory.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            keys |= set(h.keys())
    return keys


def _padded_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding
    mask[2, :4] = 0  # left padding
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("layers,dense_layers,step", [("all", [], 1), ("1,2", [0, 3], 1), ("every-2", [], 2),
                                                     ("0,3", [1, 2], 1), ("every-3", [], 3)])
def test_qwen3_copy_all_is_exact_through_the_real_class(tiny, tmp_path, layers, dense_layers, step):
    src = tiny("qwen3", num_hidden_layers=4)
    out = tmp_path / "moe"
    upcycle(src, out, UpcycleOptions(num_experts=4, top_k=2, layers=layers, router_init_std=1.0))
    config = read_json(out / "config.json")
    assert config["architectures"] == ["Qwen3MoeForCausalLM"] and config["mlp_only_layers"] == dense_layers
    assert config["decoder_sparse_step"] == step  # every-N is transformers' own decoder_sparse_step N
    moe, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, dtype=torch.float32)
    assert type(moe).__name__ == "Qwen3MoeForCausalLM"
    assert {k: v for k, v in info.items() if v} == {}
    dense = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    batch = _padded_batch()
    with torch.no_grad():
        want, got = dense(**batch).logits, moe.eval()(**batch).logits
    real = batch["attention_mask"].bool()
    assert torch.allclose(got[real], want[real], atol=1e-5, rtol=1e-5)
    assert (got[real] - want[real]).norm() / want[real].norm() <= 1e-5


def test_qwen3_moe_tensor_names_are_what_transformers_saves(tiny, tmp_path):
    out = tmp_path / "moe"
    upcycle(tiny("qwen3", num_hidden_layers=3), out, UpcycleOptions(num_experts=4, layers="1,2"))
    config = read_json(out / "config.json")
    reference = transformers.Qwen3MoeForCausalLM(transformers.AutoConfig.for_model(**config))
    reference.save_pretrained(tmp_path / "reference")
    assert _keys(out) == _keys(tmp_path / "reference")
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in _keys(out)
    assert "model.layers.0.self_attn.q_norm.weight" in _keys(out)


def test_qwen3_inspect_knows_the_output(tiny, tmp_path):
    from ckptforge.inspection import inspect_source

    out = tmp_path / "moe"
    upcycle(tiny("qwen3", num_hidden_layers=3), out, UpcycleOptions(num_experts=4, layers="every-2"))
    info = inspect_source(str(out))
    assert (info["family"], info["is_moe"], info["moe_layers"], info["num_experts"]) == ("qwen3", True, [1], 4)


def test_qwen3_sliding_window_source_is_refused(tiny, tmp_path):
    src = tiny("qwen3", use_sliding_window=True, sliding_window=8)
    with pytest.raises(PlanError, match="use_sliding_window=True"):
        upcycle(src, tmp_path / "moe", UpcycleOptions(num_experts=4))
    assert not (tmp_path / "moe").exists()


def test_qwen3_cli_dry_run_names_the_architecture(tiny):
    proc = run_cli("upcycle", str(tiny("qwen3")), "--experts", "4", "--layers", "all", "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    assert '"architecture": "Qwen3MoeForCausalLM"' in proc.stdout


@pytest.mark.parametrize("kind,fmt", [("qwen3", "Qwen3MoeForCausalLM"), ("llama", "Qwen2MoeForCausalLM")])
def test_every_nth_layer_is_written_as_decoder_sparse_step(tiny, tmp_path, kind, fmt):
    """--layers every-2 → decoder_sparse_step 2 (no mlp_only_layers list); the stock class builds the
    same layers, loads every weight, computes the dense function, and verify / inspect read it."""
    from ckptforge.families.formats import moe_layers_of
    from ckptforge.inspection import inspect_source

    src = tiny(kind, num_hidden_layers=4)
    out = tmp_path / "moe"
    upcycle(src, out, UpcycleOptions(num_experts=4, top_k=2, layers="every-2", router_init_std=1.0))
    config = read_json(out / "config.json")
    assert (config["architectures"], config["decoder_sparse_step"], config["mlp_only_layers"]) == ([fmt], 2, [])
    assert moe_layers_of(config) == [1, 3]
    moe, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, dtype=torch.float32)
    assert {k: v for k, v in info.items() if v} == {}
    assert [i for i, layer in enumerate(moe.model.layers) if hasattr(layer.mlp, "experts")] == [1, 3]
    dense = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    batch = _padded_batch()
    with torch.no_grad():
        want, got = dense(**batch).logits, moe.eval()(**batch).logits
    real = batch["attention_mask"].bool()
    assert (got[real] - want[real]).norm() / want[real].norm() <= 1e-5
    assert inspect_source(str(out))["moe_layers"] == [1, 3]
    from ckptforge.verify import verify_model

    report = verify_model(out, src)
    assert report.passed and sorted(report.layers) == [1, 3]
