"""Shared description of encoder families (ViT, BERT) whose MoE output is a ckptforge modeling class."""

from __future__ import annotations

from typing import Any

from ckptforge.moe.settings import ROUTER_SETTINGS

from .base import Family, MoELayout, OutputFormat

#: FFN of layer {layer} in HF ViT and BERT checkpoints (relative to the base prefix).
ENCODER_FFN = {
    "up": "encoder.layer.{layer}.intermediate.dense.weight",
    "up_bias": "encoder.layer.{layer}.intermediate.dense.bias",
    "down": "encoder.layer.{layer}.output.dense.weight",
    "down_bias": "encoder.layer.{layer}.output.dense.bias",
}

#: Expert tensors of the packed ckptforge layout (``moe.experts.*`` of :class:`StackedExperts`).
PACKED_EXPERTS = {"w1": "up", "b1": "up_bias", "w2": "down", "b2": "down_bias"}


class EncoderFamily(Family):
    """A family whose MoE output is ``<name>_moe``, written by ckptforge's own modeling file."""

    ffn = ENCODER_FFN
    #: Output model type, its modeling module in ckptforge.modeling, and its config class name.
    moe_model_type: str = ""
    config_class: str = ""
    #: Source architecture → (output class, base prefix of its tensor names).
    architectures: dict[str, tuple[str, str]] = {}
    #: Output when the source architecture is not listed (heads are not carried).
    fallback: tuple[str, str] = ("", "")
    #: Auto class → output class name, for ``auto_map``.
    auto_classes: dict[str, str] = {}
    routers = tuple(ROUTER_SETTINGS)

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
        layer = self.output_prefix(config) + "encoder.layer.{layer}.moe."
        return OutputFormat(
            name=self.moe_model_type,
            router=layer + "router.weight",
            experts={layer + "experts." + k: role for k, role in PACKED_EXPERTS.items()},
            packed=True,
            remote_module=self.moe_model_type,
            moe_module=layer,
        )

    def output_config(self, config: dict[str, Any], fmt: OutputFormat, layout: MoELayout) -> dict[str, Any]:
        arch, _ = self.output_architecture(config)
        out = {k: v for k, v in config.items() if k not in ("architectures", "auto_map", "_name_or_path")}
        module = f"modeling_{self.moe_model_type}"
        out.update(
            model_type=self.moe_model_type,
            architectures=[arch],
            auto_map={"AutoConfig": f"{module}.{self.config_class}"}
            | {auto: f"{module}.{cls}" for auto, cls in self.auto_classes.items()},
            moe_layers=list(layout.moe_layers),
            num_experts=layout.num_experts,
            num_experts_per_tok=layout.top_k,
            expert_intermediate_size=layout.expert_width,
            moe_router=dict(layout.router),
            moe_output_scale=layout.output_scale,
            **layout.extra_config,
        )
        return out
