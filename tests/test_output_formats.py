"""The output-format registry (issue 12): every MoE format by its model type — config class, pipeline
tags, which layers are MoE, dummy inputs — checked against the real transformers classes."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
import transformers

from ckptforge.families import FAMILIES, OUTPUT_FORMATS, format_of
from ckptforge.families.formats import dummy_inputs, family_of, modality_of, moe_layers_of
from ckptforge.inspection import inspect_source
from ckptforge.loading import config_object, model_class
from conftest import REPO, cli_env

_TEXT = dict(vocab_size=64, hidden_size=32, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
             max_position_embeddings=32, num_experts_per_tok=2)
_ENCODER = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                expert_intermediate_size=32)

#: Output model type → a tiny config.json of it whose MoE layers are not all layers where the format
#: can say so; every registered format has one (a new format fails here until it adds its own).
TINY_CONFIGS = {
    "vit_moe": dict(model_type="vit_moe", architectures=["ViTMoEForImageClassification"], image_size=28, patch_size=7,
                    num_channels=1, num_hidden_layers=3, moe_layers=[0, 2], num_labels=3, **_ENCODER),
    "bert_moe": dict(model_type="bert_moe", architectures=["BertMoEForMaskedLM"], vocab_size=64, num_hidden_layers=3,
                     moe_layers=[1], max_position_embeddings=32, **_ENCODER),
    "mixtral": dict(model_type="mixtral", architectures=["MixtralForCausalLM"], num_hidden_layers=2,
                    num_local_experts=4, **_TEXT),
    "qwen2_moe": dict(model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"], num_hidden_layers=4,
                      num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                      decoder_sparse_step=2, mlp_only_layers=[3], **_TEXT),
    "qwen3_moe": dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], num_hidden_layers=3, head_dim=16,
                      num_experts=4, moe_intermediate_size=16, mlp_only_layers=[0], **_TEXT),
}
#: What transformers' own classes say (qwen2_moe: layers 1 and 3 by the sparse step, 3 dense by mlp_only_layers).
EXPECTED_MOE_LAYERS = {"vit_moe": [0, 2], "bert_moe": [1], "mixtral": [0, 1], "qwen2_moe": [1], "qwen3_moe": [1, 2]}
PIPELINE_TAGS = {"image-classification", "image-feature-extraction", "text-classification", "feature-extraction",
                 "fill-mask", "text-generation"}


def _expert_layers(model: torch.nn.Module) -> list[int]:
    found = {int(m.group(1)) for n, _ in model.named_parameters() if (m := re.search(r"layers?\.(\d+)\..*experts", n))}
    return sorted(found)


def test_registry_holds_every_format_of_every_family_once():
    assert sorted(OUTPUT_FORMATS) == sorted(TINY_CONFIGS)
    for name, fmt in OUTPUT_FORMATS.items():
        assert fmt.name == name and fmt in FAMILIES[fmt.family].output_formats()


@pytest.mark.parametrize("name", sorted(OUTPUT_FORMATS))
def test_format_answers_match_the_model_transformers_builds(name):
    config = TINY_CONFIGS[name]
    fmt = format_of(config)
    assert fmt is OUTPUT_FORMATS[name] and family_of(config).name == fmt.family
    torch.manual_seed(0)
    model = model_class(config)(config_object(config)).eval()
    assert type(model.config).__name__ == (fmt.config_class or type(transformers.AutoConfig.for_model(name)).__name__)
    assert _expert_layers(model) == moe_layers_of(config) == EXPECTED_MOE_LAYERS[name]
    inputs, _ = dummy_inputs(config, 2, 5, seed=0)
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape[0] == 2 and modality_of(config) == FAMILIES[fmt.family].modality
    for arch, tag in fmt.pipelines.items():
        assert tag in PIPELINE_TAGS
        assert model_class({"architectures": [arch]}).__name__ == arch


def test_dense_sources_get_inputs_of_their_family_modality():
    image, what = dummy_inputs({"model_type": "vit", "image_size": 16, "num_channels": 3}, 2, 5, seed=1)
    assert image["pixel_values"].shape == (2, 3, 16, 16) and what == "2 random images (3, 16, 16)"
    ids, _ = dummy_inputs({"model_type": "llama", "vocab_size": 7}, 3, 4, seed=1)
    assert ids["input_ids"].shape == (3, 4) and int(ids["input_ids"].max()) < 7
    assert moe_layers_of({"model_type": "llama", "num_hidden_layers": 4}) == []


def test_inspect_reports_the_sparse_step_layers_of_a_qwen2_moe(tmp_path):
    config = transformers.Qwen2MoeConfig(**{k: v for k, v in TINY_CONFIGS["qwen2_moe"].items()
                                            if k not in ("model_type", "architectures")})
    transformers.Qwen2MoeForCausalLM(config).save_pretrained(tmp_path / "qwen2-moe")
    info = inspect_source(str(tmp_path / "qwen2-moe"))
    assert (info["is_moe"], info["family"], info["moe_layers"]) == (True, "llama", [1])


def test_registry_answers_without_importing_torch():
    code = ("import json, sys\nfrom ckptforge.families.formats import family_of, modality_of, moe_layers_of\n"
            "c = {'model_type': 'vit_moe', 'moe_layers': [1]}\n"
            "print(json.dumps([family_of(c).name, modality_of(c), moe_layers_of(c),"
            " [m for m in ('torch', 'transformers') if m in sys.modules]]))")
    done = subprocess.run([sys.executable, "-c", code], env=cli_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == ["vit", "image", [1], []]
