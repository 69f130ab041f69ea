"""Shared description of encoder families (ViT, BERT) whose MoE output is a ckptforge modeling class."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ckptforge.moe.settings import ROUTER_SETTINGS

from .base import Family, MoELayout, OutputFormat, listed_moe_layers

#: FFN of layer {layer} in HF ViT and BERT checkpoints (relative to the base prefix).
ENCODER_FFN = {
    "up": "encoder.layer.{layer}.intermediate.dense.weight",
    "up_bias": "encoder.layer.{layer}.intermediate.dense.bias",
    "down": "encoder.layer.{layer}.output.dense.weight",
    "down_bias": "encoder.layer.{layer}.output.dense.bias",
}

#: Expert tensors of the packed ckptforge layout (``moe.experts.*`` of :class:`StackedExperts`).
PACKED_EXPERTS = {"w1": "up", "b1": "up_bias", "w2": "down", "b2": "down_bias"}


def _templates(prefix: str) -> dict[str, Any]:
    """Router, expert and MoE-block name templates of a packed ckptforge MoE block under ``prefix``."""
    layer = prefix + "encoder.layer.{layer}.moe."
    return {"router": layer + "router.weight", "moe_module": layer,
            "experts": {layer + "experts." + k: role for k, role in PACKED_EXPERTS.items()}}


def encoder_format(name: str, family: str, *, config_class: str, auto_classes: dict[str, str],
                   pipelines: dict[str, str], state_names: Any) -> OutputFormat:
    """A ckptforge-modeling output format (``vit_moe``, ``bert_moe``), tensor names without a base prefix."""
    return OutputFormat(name=name, packed=True, remote_module=name, family=family, pipelines=pipelines,
                        config_class=config_class, auto_classes=auto_classes, moe_layer_rule=listed_moe_layers,
                        state_names=state_names, **_templates(""))


class EncoderFamily(Family):
    """A family whose MoE output is ``<name>_moe``, written by ckptforge's own modeling file."""

    ffn = ENCODER_FFN
    #: The output format (registered by its model type; tensor names without a base prefix).
    format: OutputFormat
    #: Source architecture → (output class, base prefix of its tensor names).
    architectures: dict[str, tuple[str, str]] = {}
    #: Output when the source architecture is not listed (heads are not carried).
    fallback: tuple[str, str] = ("", "")
    routers = tuple(ROUTER_SETTINGS)

    def output_formats(self) -> tuple[OutputFormat, ...]:
        return (self.format,)

    def output_architecture(self, config: dict[str, Any]) -> tuple[str, str]:
        archs = config.get("architectures") or []
        for arch in archs:
            if arch in self.architectures:
                return self.architectures[arch]
        return self.fallback

    def output_prefix(self, config: dict[str, Any], output_config: dict[str, Any] | None = None) -> str:
        return self.output_architecture(config)[1]

    def extra_config(self, config: dict[str, Any], prefix: str, names: set[str]) -> dict[str, Any]:
        return {"use_pooler": f"{prefix}pooler.dense.weight" in names}

    def output_format(self, config: dict[str, Any], moe_layers: list[int]) -> OutputFormat:
        return replace(self.format, **_templates(self.output_prefix(config)))

    def output_config(self, config: dict[str, Any], fmt: OutputFormat, layout: MoELayout) -> dict[str, Any]:
        arch, _ = self.output_architecture(config)
        out = {k: v for k, v in config.items() if k not in ("architectures", "auto_map", "_name_or_path")}
        out.update(
            model_type=fmt.name,
            architectures=[arch],
            auto_map={"AutoConfig": f"configuration_{fmt.name}.{fmt.config_class}"}
            | {auto: f"modeling_{fmt.name}.{cls}" for auto, cls in fmt.auto_classes.items()},
            moe_layers=list(layout.moe_layers),
            num_experts=layout.num_experts,
            num_experts_per_tok=layout.top_k,
            expert_intermediate_size=layout.expert_width,
            moe_router=dict(layout.router),
            moe_output_scale=layout.output_scale,
            **layout.extra_config,
        )
        return out
