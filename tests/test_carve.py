"""Carved shared expert (CMoE-style, issue 14): most active units shared, the rest partitioned; all
routed experts active + the shared expert equals the dense FFN."""

from __future__ import annotations

import pytest
import torch
import transformers

from ckptforge.errors import PlanError
from ckptforge.multisource.carve import carve_shared_expert, carve_widths

from calib_helpers import add_tokenizer, text_file
from conftest import build_tiny, read_json, run_cli


@pytest.mark.parametrize("layers", ["all", "1"])
def test_carved_shared_expert_with_every_expert_active_equals_dense(tmp_path, layers):
    src = add_tokenizer(build_tiny("llama", tmp_path / "m", num_hidden_layers=3))
    calib = text_file(tmp_path / "c.txt", lines=20)
    record = carve_shared_expert(src, tmp_path / "out", num_experts=4, top_k=4, calibration=str(calib),
                                 layers=layers, router_init="zeros")
    config = read_json(tmp_path / "out" / "config.json")
    assert (config["moe_intermediate_size"], config["shared_expert_intermediate_size"]) == carve_widths(64, 4) == (12, 16)
    dense = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    moe, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32,
                                                                  output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    ids = torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    mask[2, :3] = 0
    with torch.no_grad():
        want, got = dense(input_ids=ids, attention_mask=mask).logits, moe(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert ((got[real] - want[real]).norm() / want[real].norm()).item() <= 1e-5
    # the shared units are the most often active ones, and the parts cover the rest exactly once
    stats = record["calibration"]["statistics"]["layers"]
    assert set(stats) == set(record["carve"])
    for layer, carve in record["carve"].items():
        assert len(carve["shared_units"]) == 16


def test_carve_units_partition_the_rest_by_count(tmp_path):
    from ckptforge.calibration import LayerStats
    from ckptforge.multisource.carve import carve_units

    stats = LayerStats(10, 4, needs={"scores", "coactivation"})
    acts = torch.zeros(6, 10)
    acts[:, [3, 7]] = 1.0  # units 3 and 7 fire on every token
    acts[:3, [0, 1, 2, 4]] = 1.0
    acts[3:, [5, 6, 8, 9]] = 1.0
    stats.update(acts)
    units = carve_units(stats, 2, 2)
    assert units["shared"].tolist() == [3, 7]
    parts = sorted(p.tolist() for p in units["experts"])
    assert parts == [[0, 1, 2, 4], [5, 6, 8, 9]]


def test_carve_cli_and_refusals(tmp_path):
    src = add_tokenizer(build_tiny("llama", tmp_path / "m", num_hidden_layers=2))
    calib = text_file(tmp_path / "c.txt", lines=12)
    out = tmp_path / "out"
    proc = run_cli("upcycle", str(src), "--shared-expert", "carved", "--calibration", str(calib), "--experts", "3",
                   "--top-k", "3", "--router-init", "zeros", "--layers", "all", "--out", str(out), "--verify", "--json")
    assert proc.returncode == 0, proc.stderr
    assert '"passed": true' in proc.stdout
    no_data = run_cli("upcycle", str(src), "--shared-expert", "carved", "--out", str(tmp_path / "x"))
    assert no_data.returncode == 2 and not (tmp_path / "x").exists()
    assert no_data.stderr.strip() == ("error: --shared-expert carved needs SOURCE, --calibration DATA (which units fire "
                                      "most) and --out DIR")
    mixed = run_cli("upcycle", str(src), "--shared-expert", "carved", "--expert-source", str(src),
                    "--out", str(tmp_path / "z"))
    assert mixed.returncode == 2 and not (tmp_path / "z").exists()
    assert "--shared-expert carved splits the base's own FFN" in mixed.stderr
    qwen3 = add_tokenizer(build_tiny("qwen3", tmp_path / "q3"))
    with pytest.raises(PlanError, match="a carved shared expert needs an output format with one"):
        carve_shared_expert(qwen3, tmp_path / "y", num_experts=2, top_k=2, calibration=str(calib))
    assert not (tmp_path / "y").exists()
