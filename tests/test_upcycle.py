"""End-to-end conversions of tiny models of every family, loaded through the real transformers classes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

import ckptforge
from ckptforge import UpcycleOptions, upcycle, verify_model
from ckptforge.loading import load_model

from conftest import TINY, cli_env, read_json

KINDS = sorted(TINY)


def _keys(directory: Path) -> set[str]:
    keys: set[str] = set()
    for f in directory.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            keys |= set(h.keys())
    return keys


def _digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layers", ["every-2", "all"])
def test_copy_all_matches_dense_and_loads_cleanly(tiny, tmp_path, kind, layers):
    dense = tiny(kind)
    out = tmp_path / "moe"
    result = upcycle(dense, out, UpcycleOptions(num_experts=4, top_k=2, layers=layers), verify=True)
    assert result.verify.passed and result.verify.exact_expected
    assert result.verify.final.relative <= 1e-5
    assert all(e.relative <= 1e-5 for e in result.verify.layers.values())
    config = read_json(out / "config.json")
    cls = ckptforge.loading.model_class(config)
    model, info = cls.from_pretrained(out, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    assert sum(isinstance(m, ckptforge.moe.MoEFeedForward) for m in model.modules()) in (0, len(result.plan.moe_layers))


@pytest.mark.parametrize("kind,expected", [("llama", "MixtralForCausalLM"), ("mistral", "MixtralForCausalLM"),
                                           ("qwen2", "Qwen2MoeForCausalLM")])
def test_llama_family_every_layer_writes_what_transformers_writes(tiny, tmp_path, kind, expected):
    """Our on-disk names equal what the installed transformers' save_pretrained writes for the class."""
    out = tmp_path / "moe"
    upcycle(tiny(kind), out, UpcycleOptions(num_experts=4, layers="all"))
    config = read_json(out / "config.json")
    assert config["architectures"] == [expected]
    reference = getattr(transformers, expected)(transformers.AutoConfig.for_model(**config))
    reference.save_pretrained(tmp_path / "reference")
    assert _keys(out) == _keys(tmp_path / "reference")
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == expected


def test_partial_llama_is_qwen2_moe_with_dense_layers_and_zero_shared_expert(tiny, tmp_path):
    out = tmp_path / "moe"
    upcycle(tiny("llama"), out, UpcycleOptions(num_experts=4, layers="1"))
    config = read_json(out / "config.json")
    assert config["model_type"] == "qwen2_moe" and config["mlp_only_layers"] == [] and config["decoder_sparse_step"] == 2
    reference = transformers.Qwen2MoeForCausalLM(transformers.AutoConfig.for_model(**config))
    reference.save_pretrained(tmp_path / "reference")
    assert _keys(out) == _keys(tmp_path / "reference")
    with safe_open(str(out / "model.safetensors"), "pt") as h:
        assert not h.get_tensor("model.layers.1.mlp.shared_expert.down_proj.weight").any()


@pytest.mark.parametrize("kind", ["vit", "bert", "bert-mlm"])
def test_own_formats_store_exactly_the_names_the_class_declares(tiny, tmp_path, kind):
    out = tmp_path / "moe"
    upcycle(tiny(kind), out, UpcycleOptions(num_experts=4))
    model = load_model(out)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})  # save_pretrained leaves these out too
    assert _keys(out) == set(model.state_dict()) - tied


@pytest.mark.parametrize("kind", ["vit", "bert", "bert-mlm"])
def test_remote_code_loads_without_ckptforge(tiny, tmp_path, kind):
    out = tmp_path / "moe"
    result = upcycle(tiny(kind), out, UpcycleOptions(num_experts=4))
    arch = result.plan.output_config["architectures"][0]
    auto = {"ViTMoEForImageClassification": "AutoModelForImageClassification",
            "BertMoEForSequenceClassification": "AutoModelForSequenceClassification",
            "BertMoEForMaskedLM": "AutoModelForMaskedLM"}[arch]
    inputs = "pixel_values=torch.randn(1, 1, 28, 28)" if kind == "vit" else "input_ids=torch.tensor([[1, 5, 7]])"
    script = f"""
import sys
sys.modules["ckptforge"] = None  # ckptforge cannot be imported in this process
import torch, transformers
model, info = transformers.{auto}.from_pretrained({str(out)!r}, trust_remote_code=True, output_loading_info=True)
assert not any(info.values()), info
assert "ckptforge" not in type(model).__module__, type(model).__module__
print(type(model).__name__, tuple(model({inputs}).logits.shape))
"""
    env = cli_env()
    env.pop("PYTHONPATH")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(arch)


@pytest.mark.parametrize("kind", ["vit", "llama"])
def test_same_inputs_and_seed_give_byte_identical_files(tiny, tmp_path, monkeypatch, kind):
    dense = tiny(kind)
    opts = UpcycleOptions(num_experts=4, strategy_params={"noise_std": 0.01, "drop_ratio": 0.5}, seed=7)
    monkeypatch.setenv("CKPTFORGE_DIRECT_IO", "0")  # through the page cache
    upcycle(dense, tmp_path / "a", opts)
    monkeypatch.setenv("CKPTFORGE_DIRECT_IO", "1")  # O_DIRECT (where the platform has it): same bytes
    upcycle(dense, tmp_path / "b", opts)
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    upcycle(dense, tmp_path / "c", UpcycleOptions(**{**opts.to_dict(), "seed": 8}))
    assert _digests(tmp_path / "a")["model.safetensors"] != _digests(tmp_path / "c")["model.safetensors"]


def test_provenance_records_options_and_hashes_of_every_file(tiny, tmp_path):
    out = tmp_path / "moe"
    upcycle(tiny("vit"), out, UpcycleOptions(num_experts=4, seed=3))
    prov = read_json(out / "ckptforge.json")
    assert prov["options"]["seed"] == 3 and prov["options"]["num_experts"] == 4
    assert prov["ckptforge_version"] == ckptforge.__version__
    assert set(prov["source"]["files"]) == {"config.json", "model.safetensors"}
    files = {p.name for p in out.iterdir()} - {"ckptforge.json"}
    assert set(prov["files"]) == files
    for name, digest in prov["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest


def test_drop_upcycling_redraws_the_given_share_of_units(tiny, tmp_path):
    dense_dir = tiny("vit")
    out = tmp_path / "moe"
    upcycle(dense_dir, out, UpcycleOptions(num_experts=4, layers="1", strategy_params={"drop_ratio": 0.5}))
    with safe_open(str(dense_dir / "model.safetensors"), "pt") as h:
        w1 = h.get_tensor("vit.encoder.layer.1.intermediate.dense.weight")
    with safe_open(str(out / "model.safetensors"), "pt") as h:
        experts = h.get_tensor("vit.encoder.layer.1.moe.experts.w1")
    for e in range(4):
        changed = (experts[e] != w1).any(dim=1)
        assert int(changed.sum()) == 32  # half of d_ff=64 rows re-drawn
    assert not torch.equal(experts[0], experts[1])


def test_noise_makes_experts_differ_but_stay_close(tiny, tmp_path):
    out = tmp_path / "moe"
    result = upcycle(tiny("bert"), out, UpcycleOptions(num_experts=4, strategy_params={"noise_std": 1e-3}), verify=True)
    assert not result.verify.exact_expected
    assert 0 < result.verify.final.relative < 0.1
    with safe_open(str(out / "model.safetensors"), "pt") as h:
        w = h.get_tensor("bert.encoder.layer.1.moe.experts.w1")
    assert 0 < (w[0] - w[1]).abs().max() < 0.01


def test_small_shard_size_writes_an_index_that_transformers_loads(tiny, tmp_path):
    out = tmp_path / "moe"
    result = upcycle(tiny("llama"), out, UpcycleOptions(num_experts=4, layers="all", shard_size=100_000))
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = read_json(out / "model.safetensors.index.json")
    assert set(index["weight_map"].values()) == set(shards)
    assert set(index["weight_map"]) == _keys(out)
    assert verify_model(out).passed
    assert result.plan.params_active < result.plan.params_total


def test_dtype_bfloat16_casts_every_tensor(tiny, tmp_path):
    out = tmp_path / "moe"
    upcycle(tiny("llama"), out, UpcycleOptions(num_experts=4, dtype="bfloat16"))
    with safe_open(str(out / "model.safetensors"), "pt") as h:
        assert {h.get_tensor(k).dtype for k in h.keys()} == {torch.bfloat16}


def test_sharded_source_and_bin_source_convert(tiny, tmp_path):
    dense = tiny("llama")
    model = transformers.LlamaForCausalLM.from_pretrained(dense)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert verify_model(upcycle(tmp_path / "sharded", tmp_path / "o1", UpcycleOptions(num_experts=2)).out).passed
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")
    (bin_dir / "config.json").write_text((dense / "config.json").read_text())
    assert verify_model(upcycle(bin_dir / "pytorch_model.bin", tmp_path / "o2", UpcycleOptions(num_experts=2)).out).passed


def test_vit_base_model_with_transformers5_in_memory_names(tiny, tmp_path):
    """A ViT checkpoint stored with the names transformers 5 uses in memory converts like a legacy one."""
    dense = tiny("vit-base-model")
    model = transformers.ViTModel.from_pretrained(dense)
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, renamed / "model.safetensors",
              metadata={"format": "pt"})
    (renamed / "config.json").write_text((dense / "config.json").read_text())
    assert any(k.startswith("layers.0.mlp.fc1") for k in model.state_dict())
    result = upcycle(renamed, tmp_path / "moe", UpcycleOptions(num_experts=2), verify=True)
    assert result.verify.passed
    assert json.loads((tmp_path / "moe" / "config.json").read_text())["architectures"] == ["ViTMoEModel"]
