"""Qwen3 (gated SwiGLU FFNs, RMSNorm on queries and keys) → stock ``qwen3_moe`` checkpoints.

Every layer MoE, or some (the others a dense MLP of the source's width): every N-th layer
(``--layers every-N``) is written as ``decoder_sparse_step: N``, any other set by listing the dense
layers in ``mlp_only_layers``. Copy-all experts with renormalised top-k (``norm_topk_prob``) compute the dense function.
Only a Qwen3 source becomes Qwen3-MoE: its attention has q/k norms that a LLaMA, Mistral or Qwen2
checkpoint lacks, so the conversion could not keep their function (see ``ckptforge.families.llama.WHY_NOT_QWEN3_MOE``).
"""

from __future__ import annotations

from typing import Any

from .base import Family, MoELayout, OutputFormat, sparse_layers_config, stock_router_config
from .llama import _SHARED_KEYS

_LAYER = "model.layers.{layer}."

QWEN3_MOE = OutputFormat(
    name="qwen3_moe",
    router=_LAYER + "mlp.gate.weight",
    experts={
        _LAYER + "mlp.experts.{expert}.gate_proj.weight": "gate",
        _LAYER + "mlp.experts.{expert}.up_proj.weight": "up",
        _LAYER + "mlp.experts.{expert}.down_proj.weight": "down",
    },
    packed=False,
    family="qwen3",
    pipelines={"Qwen3MoeForCausalLM": "text-generation"},
)

#: Why a Qwen3 source is not written as Mixtral or Qwen2-MoE: neither has q/k norms.
_NO_QK_NORM = ("{model_type} attention normalises queries and keys (q_norm/k_norm), which Mixtral and Qwen2-MoE "
               "attention cannot hold, so the output would compute a different function; use architecture qwen3_moe")


class Qwen3Family(Family):
    name = "qwen3"
    model_types = ("qwen3",)
    modality = "text"
    layer_runner = True
    ffn = {
        "gate": "layers.{layer}.mlp.gate_proj.weight",
        "up": "layers.{layer}.mlp.up_proj.weight",
        "down": "layers.{layer}.mlp.down_proj.weight",
    }
    base_prefixes = ("model.",)
    anchor = "embed_tokens.weight"
    offered_formats = {"qwen3_moe": QWEN3_MOE}
    refused_formats = {"mixtral": _NO_QK_NORM, "qwen2_moe": _NO_QK_NORM}

    def check(self, config: dict[str, Any]) -> list[str]:
        problems = []
        if config.get("mlp_bias"):
            problems.append("mlp_bias=True FFNs have no Qwen3-MoE counterpart; use a checkpoint without MLP biases")
        if config.get("use_sliding_window") and config.get("sliding_window"):
            problems.append("use_sliding_window=True: Qwen3-MoE applies the window to every layer, not the source's "
                            "max_window_layers; convert a checkpoint with full attention")
        return problems

    def output_format(self, config: dict[str, Any], moe_layers: list[int]) -> OutputFormat:
        return QWEN3_MOE

    def output_config(self, config: dict[str, Any], fmt: OutputFormat, layout: MoELayout) -> dict[str, Any]:
        out = {k: config[k] for k in (*_SHARED_KEYS, "attention_bias") if k in config}
        layers = int(config["num_hidden_layers"])
        out.update(
            model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"],
            intermediate_size=int(config["intermediate_size"]), moe_intermediate_size=layout.expert_width,
            num_experts=layout.num_experts, num_experts_per_tok=layout.top_k, norm_topk_prob=True,
            use_sliding_window=False, sliding_window=None, **sparse_layers_config(layout.moe_layers, layers),
        )
        out.update(stock_router_config(layout))
        out.update(layout.extra_config)
        return out
