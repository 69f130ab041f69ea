"""The tensor names the planner derives from config.json (torch-free) equal what ckptforge's modeling
classes really save, for every output head, router type and pooler choice (issue 15)."""

from __future__ import annotations

import itertools

import pytest

from ckptforge.families import OUTPUT_FORMATS
from ckptforge.loading import state_names
from ckptforge.moe.layout import ROUTER_LAYOUTS

ROUTERS = [{"type": kind} | ({"heads": 2} if kind == "mh" else {}) for kind in ROUTER_LAYOUTS]
_BASE = {"hidden_size": 16, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 32,
         "moe_layers": [0, 2], "num_experts": 4, "num_experts_per_tok": 2, "expert_intermediate_size": 8}
_FAMILY = {
    "vit_moe": {"image_size": 8, "patch_size": 4, "num_channels": 1},
    "bert_moe": {"vocab_size": 40, "max_position_embeddings": 16, "type_vocab_size": 2},
}
_VARIANTS = [{}, {"use_pooler": False}, {"num_labels": 3}, {"id2label": {"0": "a", "1": "b", "2": "c"}},
             {"qkv_bias": False}]


def _cases():
    for fmt in (f for f in OUTPUT_FORMATS.values() if f.remote_module is not None):
        for arch, router, variant in itertools.product(fmt.pipelines, ROUTERS, _VARIANTS):
            yield pytest.param(fmt, arch, router, variant, id=f"{arch}-{router['type']}-{'-'.join(variant) or 'plain'}")


def test_every_ckptforge_format_derives_its_names():
    assert {f.name for f in OUTPUT_FORMATS.values() if f.remote_module is not None} == set(_FAMILY)
    assert all(f.state_names is not None for f in OUTPUT_FORMATS.values() if f.remote_module is not None)


@pytest.mark.parametrize(("fmt", "arch", "router", "variant"), list(_cases()))
def test_derived_names_equal_the_modeling_class_state_dict(fmt, arch, router, variant):
    config = {"model_type": fmt.name, "architectures": [arch], "moe_router": router, **_BASE, **_FAMILY[fmt.name],
              **variant}
    assert fmt.state_names(config) == state_names(config)
