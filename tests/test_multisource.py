"""Multi-source MoE (issue 14): experts from several sources, mergekit-moe configs, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

from ckptforge.multisource import MoESpec, load_moe_config, upcycle_multisource
from ckptforge.multisource.spec import ExpertSpec

from conftest import read_json, run_cli
from multisource_helpers import family_setup, finetune, read_config, write_config

PROMPTS = [["the cat sat on a mat"], ["dogs ran far and fast"], ["big red sun"]]


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in directory.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def test_each_expert_ffn_comes_from_its_source(tmp_path):
    base, sources = family_setup(tmp_path, fingerprints=True)
    cfg = write_config(tmp_path / "moe.yml", base, sources, dtype="float32")
    result = upcycle_multisource(load_moe_config(cfg), tmp_path / "moe")
    got, dense = _tensors(tmp_path / "moe"), _tensors(base)
    for layer in range(3):
        for e in range(3):
            for w in ("w1", "w2", "w3"):
                t = got[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"]
                assert torch.all(t == e + 1), (layer, e, w)
        assert torch.equal(got[f"model.layers.{layer}.self_attn.q_proj.weight"],
                           dense[f"model.layers.{layer}.self_attn.q_proj.weight"])
    assert result.plan.plan.output_config["architectures"] == ["MixtralForCausalLM"]
    record = read_json(tmp_path / "moe" / "ckptforge.json")["multisource"]
    assert [e["source"] for e in record["experts"]] == [str(s) for s in sources]
    assert all(len(e["files"]["model.safetensors"]) == 64 for e in record["experts"])
    from ckptforge.inspection import inspect_source

    info = inspect_source(str(tmp_path / "moe"))
    assert info["multisource"] == {"base_model": str(base), "gate_mode": "random",
                                   "experts": [str(s) for s in sources], "shared_experts": []}


def test_output_loads_cleanly_with_transformers_names_and_routes_to_source_ffns(tmp_path):
    base, sources = family_setup(tmp_path)
    cfg = write_config(tmp_path / "moe.yml", base, sources, gate_mode="random")
    upcycle_multisource(load_moe_config(cfg), tmp_path / "moe")
    config = read_config(tmp_path / "moe")
    reference = transformers.MixtralForCausalLM(transformers.AutoConfig.for_model(**config))
    reference.save_pretrained(tmp_path / "reference")
    assert set(_tensors(tmp_path / "moe")) == set(_tensors(tmp_path / "reference"))
    moe, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "moe", output_loading_info=True,
                                                                  dtype=torch.float32)
    assert {k: v for k, v in info.items() if v} == {}
    ffns = [transformers.AutoModelForCausalLM.from_pretrained(s, dtype=torch.float32).model.layers for s in sources]
    x = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for layer in range(3):
            block = moe.model.layers[layer].mlp
            out = block(x)
            out = out[0] if isinstance(out, tuple) else out
            probs = torch.softmax(x.reshape(-1, 32) @ block.gate.weight.T, -1)
            top, idx = probs.topk(2, -1)
            top = top / top.sum(-1, keepdim=True)
            want = torch.zeros(5, 32)
            for t in range(5):
                for w, e in zip(top[t], idx[t]):
                    want[t] += w * ffns[e][layer].mlp(x[0, t])
            assert torch.allclose(out.reshape(-1, 32), want, atol=1e-5), layer


def test_native_flags_cli(tmp_path):
    base, sources = family_setup(tmp_path, experts=2)
    out = tmp_path / "moe"
    args = ["upcycle", str(base), "--expert-source", str(sources[0]), "--expert-source", str(sources[1]),
            "--top-k", "1", "--out", str(out), "--json"]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    config = read_config(out)
    assert config["num_local_experts"] == 2 and config["num_experts_per_tok"] == 1
    assert read_json(out / "ckptforge.json")["multisource"]["gate_mode"] == "random"
    refused = run_cli(*args[:-3], "--strategy", "importance", "--out", str(tmp_path / "x"))
    assert refused.returncode == 2 and not (tmp_path / "x").exists()
    assert refused.stderr.strip() == ("error: --strategy does not apply to a multi-source MoE (--config / "
                                      "--expert-source); drop it")


def test_config_cli_is_deterministic_and_records_prompts_or_hashes(tmp_path):
    base, sources = family_setup(tmp_path)
    cfg = write_config(tmp_path / "moe.yml", base, sources, gate_mode="cheap_embed", prompts=PROMPTS)
    for name, extra in (("a", []), ("b", []), ("c", ["--no-prompts-in-card"])):
        proc = run_cli("upcycle", "--config", str(cfg), "--out", str(tmp_path / name), "--quiet")
        if extra:
            proc = run_cli("upcycle", "--config", str(cfg), "--out", str(tmp_path / name), "--force", *extra)
        assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert "the cat sat on a mat" in (tmp_path / "a" / "README.md").read_text()
    hidden = read_json(tmp_path / "c" / "ckptforge.json")["multisource"]["experts"][0]["positive_prompts"]
    assert hidden["count"] == 1 and len(hidden["sha256"]) == 64
    assert "the cat sat" not in (tmp_path / "c" / "README.md").read_text()
    assert "the cat sat" not in (tmp_path / "c" / "ckptforge.json").read_text()


def test_each_source_resolves_once(tmp_path, monkeypatch):
    import ckptforge.multisource.sources as sources_mod

    base, sources = family_setup(tmp_path, experts=2)
    calls = []
    real = sources_mod.open_checkpoint
    monkeypatch.setattr(sources_mod, "open_checkpoint", lambda ref: calls.append(ref) or real(ref))
    spec = MoESpec(str(base), (ExpertSpec(str(sources[0])), ExpertSpec(str(sources[1])), ExpertSpec(str(sources[0]))),
                   gate_mode="random")
    upcycle_multisource(spec, tmp_path / "moe")
    assert sorted(calls) == sorted([str(base), str(sources[0]), str(sources[1])])


# --- bad inputs: one-line error, exit code, nothing written ------------------------------------------

def _refused(tmp_path: Path, cfg: Path, code: int = 2) -> str:
    out = tmp_path / "out"
    proc = run_cli("upcycle", "--config", str(cfg), "--out", str(out))
    assert proc.returncode == code, proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


def test_source_of_another_architecture_is_refused(tmp_path):
    base, sources = family_setup(tmp_path, experts=1)
    from calib_helpers import add_tokenizer
    from conftest import build_tiny

    other = add_tokenizer(build_tiny("qwen2", tmp_path / "qwen2", num_hidden_layers=3))
    msg = _refused(tmp_path, write_config(tmp_path / "moe.yml", base, [sources[0], other]))
    assert f"source '{other}' (expert 1) is a qwen2 model and the base is llama" in msg


def test_shape_mismatch_and_missing_ffn_are_reported_together(tmp_path):
    from calib_helpers import add_tokenizer
    from conftest import build_tiny
    from safetensors.torch import load_file, save_file

    base, sources = family_setup(tmp_path, experts=1)
    wide = add_tokenizer(build_tiny("llama", tmp_path / "wide", num_hidden_layers=3, intermediate_size=48))
    holey = finetune(base, tmp_path / "holey", 7)
    state = load_file(holey / "model.safetensors")
    del state["model.layers.2.mlp.up_proj.weight"]
    save_file(state, holey / "model.safetensors", metadata={"format": "pt"})
    msg = _refused(tmp_path, write_config(tmp_path / "moe.yml", base, [sources[0], wide, holey]))
    assert "model.layers.0.mlp.gate_proj.weight 48×32 vs the base's 64×32" in msg
    assert f"source '{holey}' (expert 2): FFN tensor missing: model.layers.2.mlp.up_proj.weight" in msg


def test_different_tokenizer_vocabulary_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base, sources = family_setup(tmp_path, experts=2)
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "[PAD]": 1, "zebra": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(sources[1])
    msg = _refused(tmp_path, write_config(tmp_path / "moe.yml", base, sources))
    assert f"source '{sources[1]}' (expert 1) has a different tokenizer vocabulary from the base (3 vs" in msg


def test_hidden_without_prompts_is_refused(tmp_path):
    base, sources = family_setup(tmp_path, experts=2)
    msg = _refused(tmp_path, write_config(tmp_path / "moe.yml", base, sources, gate_mode="hidden"))
    assert f"experts[0] ({sources[0]}) has no positive_prompts; gate_mode hidden routes by prompts" in msg
    assert f"experts[1] ({sources[1]})" in msg


def test_unknown_keys_are_listed_together(tmp_path):
    base, sources = family_setup(tmp_path, experts=2)
    cfg = write_config(tmp_path / "moe.yml", base, sources, tokenizer_source="union", lora="x")
    text = cfg.read_text().replace("source_model: " + str(sources[1]), "source_model: " + str(sources[1]) + "\n  noise: 1")
    cfg.write_text(text)
    msg = _refused(tmp_path, cfg)
    assert "has keys ckptforge does not support: tokenizer_source, lora, experts[1].noise; remove them" in msg


def test_experts_per_token_above_experts_is_refused(tmp_path):
    base, sources = family_setup(tmp_path, experts=2)
    msg = _refused(tmp_path, write_config(tmp_path / "moe.yml", base, sources, experts_per_token=3))
    assert "experts_per_token 3 is larger than the 2 experts; use experts_per_token ≤ 2" in msg


def test_qwen3_moe_for_a_llama_source_is_refused_with_the_reason(tmp_path):
    base, sources = family_setup(tmp_path, experts=2)
    msg = _refused(tmp_path, write_config(tmp_path / "moe.yml", base, sources, architecture="qwen3"))
    assert "architecture qwen3: Qwen3-MoE applies RMSNorms to queries and keys (q_norm/k_norm) that a llama" in msg


def test_missing_source_is_exit_3(tmp_path):
    base, sources = family_setup(tmp_path, experts=1)
    msg = _refused(tmp_path, write_config(tmp_path / "moe.yml", base, [sources[0], tmp_path / "nope"]), code=3)
    assert "nope' not found" in msg


def test_duplicate_expert_with_identical_prompts_warns_with_condition_number(tmp_path):
    base, sources = family_setup(tmp_path, experts=2)
    cfg = write_config(tmp_path / "moe.yml", base, [sources[0], sources[1], sources[1]], gate_mode="cheap_embed",
                       prompts=[PROMPTS[0], PROMPTS[1], PROMPTS[1]])
    proc = run_cli("upcycle", "--config", str(cfg), "--out", str(tmp_path / "moe"), "--quiet")
    assert proc.returncode == 0, proc.stderr
    warning = proc.stderr.strip()
    assert warning.startswith("warning: layers 0, 1, 2 of 3 have degenerate router rows (condition number up to ")
    assert "experts 1 and 2 have the same source and prompts" in warning
    assert read_json(tmp_path / "moe" / "ckptforge.json")["multisource"]["warnings"] == [warning.removeprefix("warning: ")]


# --- shared experts (Qwen2-MoE shared_expert + sigmoid shared_expert_gate) ---------------------------

def test_shared_expert_from_a_listed_source_with_residual_scale(tmp_path):
    base, sources = family_setup(tmp_path, fingerprints=True)
    cfg = write_config(tmp_path / "moe.yml", base, sources[:2], gate_mode="cheap_embed", prompts=PROMPTS[:2],
                       shared_experts=[{"source_model": str(sources[2]), "positive_prompts": PROMPTS[2],
                                        "residual_scale": 0.5}])
    result = upcycle_multisource(load_moe_config(cfg), tmp_path / "moe")
    config = read_config(tmp_path / "moe")
    assert config["architectures"] == ["Qwen2MoeForCausalLM"] and config["shared_expert_intermediate_size"] == 64
    reference = transformers.Qwen2MoeForCausalLM(transformers.AutoConfig.for_model(**config))
    reference.save_pretrained(tmp_path / "reference")
    got = _tensors(tmp_path / "moe")
    assert set(got) == set(_tensors(tmp_path / "reference"))
    _, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "moe", output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    assert torch.all(got["model.layers.1.mlp.shared_expert.up_proj.weight"] == 3)
    assert torch.all(got["model.layers.1.mlp.shared_expert.down_proj.weight"] == 1.5)
    assert torch.all(got["model.layers.1.mlp.experts.1.down_proj.weight"] == 2)
    from ckptforge.io.source import open_checkpoint
    from ckptforge.multisource import compute_gates

    rows = compute_gates(load_moe_config(cfg), open_checkpoint(base), [1], torch.Generator())  # the prompt row
    assert torch.allclose(got["model.layers.1.mlp.shared_expert_gate.weight"], rows.shared[1])
    assert result.plan.plan.output_config["shared_expert_intermediate_size"] == 64


def test_shared_expert_dense_is_the_base_ffn(tmp_path):
    base, sources = family_setup(tmp_path, experts=2)
    out = tmp_path / "moe"
    proc = run_cli("upcycle", str(base), "--expert-source", str(sources[0]), "--expert-source", str(sources[1]),
                   "--shared-expert", "dense", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    got, dense = _tensors(out), _tensors(base)
    for role in ("gate_proj", "up_proj", "down_proj"):
        assert torch.equal(got[f"model.layers.2.mlp.shared_expert.{role}.weight"], dense[f"model.layers.2.mlp.{role}.weight"])
    assert read_json(out / "ckptforge.json")["multisource"]["shared_experts"][0]["source"] == str(base)


def test_shared_expert_for_a_format_without_one_is_refused(tmp_path):
    base, sources = family_setup(tmp_path, experts=2)
    cfg = write_config(tmp_path / "moe.yml", base, sources, architecture="mixtral",
                       shared_experts=[{"source_model": str(sources[0])}])
    msg = _refused(tmp_path, cfg)
    assert "architecture mixtral has no shared expert; remove shared_experts or use architecture qwen2_moe" in msg


# --- verify ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shared", [False, True])
def test_verify_checks_each_expert_against_its_source_and_reports_routing(tmp_path, shared):
    base, sources = family_setup(tmp_path)
    extra = {"shared_experts": [{"source_model": str(base), "positive_prompts": ["a mat"], "residual_scale": 0.5}]} if shared else {}
    cfg = write_config(tmp_path / "moe.yml", base, sources, gate_mode="hidden", prompts=PROMPTS, **extra)
    out = tmp_path / "moe"
    upcycle_multisource(load_moe_config(cfg), out)
    proc = run_cli("verify", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["passed"] and report["inputs"] == "3 expert prompts"
    assert set(report["experts"]) == {"0", "1", "2"} and all(len(v) == 3 for v in report["experts"].values())
    assert all(e["relative"] <= 1e-6 for v in report["experts"].values() for e in v)
    assert all(0.0 <= s <= 1.0 for v in report["routing"].values() for s in v)
    assert bool(report["shared"]) == shared


def test_verify_fails_when_an_expert_is_not_its_sources_ffn(tmp_path):
    from safetensors.torch import load_file, save_file

    base, sources = family_setup(tmp_path, experts=2)
    out = tmp_path / "moe"
    upcycle_multisource(load_moe_config(write_config(tmp_path / "moe.yml", base, sources)), out)
    state = load_file(out / "model.safetensors")
    a, b = (f"model.layers.1.block_sparse_moe.experts.{e}.w2.weight" for e in (0, 1))
    state[a], state[b] = state[b], state[a]  # experts swapped: "garbled output"
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    proc = run_cli("verify", str(out), "--json")
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert not report["passed"] and report["experts"]["1"][0]["relative"] > 1e-3
    assert report["experts"]["0"][0]["relative"] <= 1e-6


def test_json_output_matches_the_documented_schema_and_verify_flag(tmp_path):
    import jsonschema

    from ckptforge.cli.schemas import SCHEMAS

    base, sources = family_setup(tmp_path, experts=2)
    cfg = write_config(tmp_path / "moe.yml", base, sources)
    dry = run_cli("upcycle", "--config", str(cfg), "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    jsonschema.validate(json.loads(dry.stdout), SCHEMAS["upcycle"])
    proc = run_cli("upcycle", "--config", str(cfg), "--out", str(tmp_path / "moe"), "--verify", "--json")
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    jsonschema.validate(payload, SCHEMAS["upcycle"])
    assert payload["verify"]["passed"] and payload["plan"]["strategy"] == "multi-source"
    assert payload["plan"]["multisource"]["experts"][1]["source_model"] == str(sources[1])
