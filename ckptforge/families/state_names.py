"""The tensor names ckptforge's own modeling classes save, from ``config.json`` alone (no torch).

The planner checks a ``vit_moe`` / ``bert_moe`` output against these names: which source tensors
the output class keeps, and that none it needs is missing. They mirror ``ckptforge/modeling/``
(tied weights excluded, as ``save_pretrained`` leaves them out); ``tests/test_state_names.py``
ties them to the real classes' ``state_dict`` for every head, router and pooler choice.

    >>> cfg = {"architectures": ["ViTMoEModel"], "num_hidden_layers": 1, "hidden_size": 8,
    ...        "intermediate_size": 16, "moe_layers": [0], "num_experts": 2, "use_pooler": False}
    >>> sorted(n for n in vit_moe_names(cfg) if ".moe." in n)[:2]
    ['encoder.layer.0.moe.experts.b1', 'encoder.layer.0.moe.experts.b2']
"""

from __future__ import annotations

from typing import Any

from ckptforge.moe.layout import moe_tensor_layout


def _linear(name: str, bias: bool = True) -> list[str]:
    return [name + ".weight", *([name + ".bias"] if bias else [])]


def _num_labels(config: dict[str, Any]) -> int:
    """``PretrainedConfig.num_labels``: the size of ``id2label`` (2 labels when neither is given)."""
    return len(config["id2label"]) if config.get("id2label") else int(config.get("num_labels", 2))


def moe_block_names(config: dict[str, Any], module: str) -> list[str]:
    """The tensors of one MoE block under ``module`` (router, packed expert groups, router extras)."""
    width = config.get("expert_intermediate_size") or config["intermediate_size"]
    layout = moe_tensor_layout(config.get("moe_router") or {"type": "topk", "normalize": True},
                               config["hidden_size"], config.get("num_experts", 8), width)
    names = [module + "router.weight"] if layout.router_shape is not None else []
    names += [f"{module}{group.name}.{w}" for group in layout.groups for w in ("w1", "b1", "w2", "b2")]
    return names + [module + name for name in layout.extras]


def _encoder_layers(config: dict[str, Any], prefix: str, attention: list[str], dense_ffn: list[str],
                    moe_ffn: list[str]) -> list[str]:
    """Every encoder layer's names: ``attention`` always, then ``moe_ffn`` (plus the MoE block) in MoE
    layers, ``dense_ffn`` in the others; all relative to ``{prefix}encoder.layer.N.``."""
    moe = set(config.get("moe_layers") or [])
    names: list[str] = []
    for layer in range(config["num_hidden_layers"]):
        at = f"{prefix}encoder.layer.{layer}."
        names += [at + n for n in attention]
        if layer in moe:
            names += [at + n for n in moe_ffn] + moe_block_names(config, at + "moe.")
        else:
            names += [at + n for n in dense_ffn]
    return names


def vit_moe_names(config: dict[str, Any]) -> set[str]:
    """What ``ViTMoEModel`` / ``ViTMoEForImageClassification`` (``config['architectures'][0]``) save."""
    head = (config.get("architectures") or ["ViTMoEModel"])[0] == "ViTMoEForImageClassification"
    p = "vit." if head else ""
    qkv = [n for part in ("query", "key", "value")
           for n in _linear("attention.attention." + part, config.get("qkv_bias", True))]
    attention = qkv + _linear("attention.output.dense") + _linear("layernorm_before") + _linear("layernorm_after")
    names = [p + "embeddings.cls_token", p + "embeddings.position_embeddings",
             *_linear(p + "embeddings.patch_embeddings.projection"), *_linear(p + "layernorm")]
    names += _encoder_layers(config, p, attention, _linear("intermediate.dense") + _linear("output.dense"), [])
    if head:
        names += _linear("classifier") if _num_labels(config) > 0 else []
    elif config.get("use_pooler", True):
        names += _linear("pooler.dense")
    return set(names)


def bert_moe_names(config: dict[str, Any]) -> set[str]:
    """What ``BertMoEModel`` / ``…ForSequenceClassification`` / ``…ForMaskedLM`` save (the masked-LM
    decoder is tied to the word embeddings and its bias to ``cls.predictions.bias``)."""
    arch = (config.get("architectures") or ["BertMoEModel"])[0]
    p = "" if arch == "BertMoEModel" else "bert."
    attention = [n for part in ("query", "key", "value") for n in _linear("attention.self." + part)]
    attention += _linear("attention.output.dense") + _linear("attention.output.LayerNorm")
    names = [p + f"embeddings.{e}.weight" for e in ("word_embeddings", "position_embeddings", "token_type_embeddings")]
    names += _linear(p + "embeddings.LayerNorm")
    names += _encoder_layers(config, p, attention,
                             _linear("intermediate.dense") + _linear("output.dense") + _linear("output.LayerNorm"),
                             _linear("output.LayerNorm"))
    pooler = {"BertMoEModel": config.get("use_pooler", True), "BertMoEForSequenceClassification": True}.get(arch, False)
    names += _linear(p + "pooler.dense") if pooler else []
    if arch == "BertMoEForSequenceClassification":
        names += _linear("classifier")
    elif arch == "BertMoEForMaskedLM":
        names += _linear("cls.predictions.transform.dense") + _linear("cls.predictions.transform.LayerNorm")
        names += ["cls.predictions.bias"]
    return set(names)
