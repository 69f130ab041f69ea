"""LLaMA, Mistral and Qwen2 (gated SwiGLU FFNs) → stock ``mixtral`` or ``qwen2_moe`` checkpoints.

Every layer MoE → MixtralForCausalLM. Some layers dense, or a Qwen2 source (q/k/v biases) →
Qwen2MoeForCausalLM with ``mlp_only_layers`` and a zero shared expert, which computes exactly
the dense function at init.
"""

from __future__ import annotations

from typing import Any

from .base import Family, MoELayout, OutputFormat, sparse_layers_config, stock_router_config

_LAYER = "model.layers.{layer}."

MIXTRAL = OutputFormat(
    name="mixtral",
    router=_LAYER + "block_sparse_moe.gate.weight",
    experts={
        _LAYER + "block_sparse_moe.experts.{expert}.w1.weight": "gate",
        _LAYER + "block_sparse_moe.experts.{expert}.w3.weight": "up",
        _LAYER + "block_sparse_moe.experts.{expert}.w2.weight": "down",
    },
    packed=False,
    family="llama",
    pipelines={"MixtralForCausalLM": "text-generation"},
)

QWEN2_MOE = OutputFormat(
    name="qwen2_moe",
    router=_LAYER + "mlp.gate.weight",
    experts={
        _LAYER + "mlp.experts.{expert}.gate_proj.weight": "gate",
        _LAYER + "mlp.experts.{expert}.up_proj.weight": "up",
        _LAYER + "mlp.experts.{expert}.down_proj.weight": "down",
    },
    packed=False,
    zeros={
        _LAYER + "mlp.shared_expert.gate_proj.weight": lambda d: (1, d),
        _LAYER + "mlp.shared_expert.up_proj.weight": lambda d: (1, d),
        _LAYER + "mlp.shared_expert.down_proj.weight": lambda d: (d, 1),
        _LAYER + "mlp.shared_expert_gate.weight": lambda d: (1, d),
    },
    family="llama",
    pipelines={"Qwen2MoeForCausalLM": "text-generation"},
)

#: Dense config keys both Mixtral and Qwen2-MoE take over unchanged.
_SHARED_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "tie_word_embeddings", "rope_parameters", "rope_theta", "rope_scaling", "attention_dropout",
    "bos_token_id", "eos_token_id", "pad_token_id", "dtype", "torch_dtype",
)


#: Why a LLaMA / Mistral / Qwen2 source is never written as Qwen3-MoE (issue 14).
WHY_NOT_QWEN3_MOE = (
    "Qwen3-MoE applies RMSNorms to queries and keys (q_norm/k_norm) that a {model_type} checkpoint does not have, "
    "so the output would compute a different function; use architecture mixtral or qwen2_moe for {model_type} "
    "sources, or start from a qwen3 checkpoint"
)


class LlamaFamily(Family):
    name = "llama"
    model_types = ("llama", "mistral", "qwen2")
    modality = "text"
    layer_runner = True
    ffn = {
        "gate": "layers.{layer}.mlp.gate_proj.weight",
        "up": "layers.{layer}.mlp.up_proj.weight",
        "down": "layers.{layer}.mlp.down_proj.weight",
    }
    base_prefixes = ("model.",)
    anchor = "embed_tokens.weight"
    offered_formats = {"mixtral": MIXTRAL, "qwen2_moe": QWEN2_MOE}
    refused_formats = {"qwen3_moe": WHY_NOT_QWEN3_MOE}

    def check(self, config: dict[str, Any]) -> list[str]:
        problems = []
        if config.get("mlp_bias"):
            problems.append("mlp_bias=True FFNs have no MoE counterpart in transformers; use a checkpoint without MLP biases")
        if config.get("model_type") == "llama" and config.get("attention_bias"):
            problems.append("attention_bias=True (o_proj bias) is not supported by Mixtral or Qwen2-MoE outputs")
        if (config.get("rope_scaling") or {}).get("rope_type") == "llama3" and config.get("model_type") != "llama":
            problems.append("llama3 rope scaling outside a llama config is not supported")
        return problems

    def output_format(self, config: dict[str, Any], moe_layers: list[int]) -> OutputFormat:
        every_layer = len(moe_layers) == int(config["num_hidden_layers"])
        if every_layer and config.get("model_type") != "qwen2":
            return MIXTRAL
        return QWEN2_MOE

    def output_config(self, config: dict[str, Any], fmt: OutputFormat, layout: MoELayout) -> dict[str, Any]:
        out = {k: config[k] for k in _SHARED_KEYS if k in config}
        layers = int(config["num_hidden_layers"])
        window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
        if fmt is MIXTRAL:
            out.update(
                model_type="mixtral", architectures=["MixtralForCausalLM"],
                intermediate_size=layout.expert_width, num_local_experts=layout.num_experts,
                num_experts_per_tok=layout.top_k, sliding_window=window, router_jitter_noise=0.0,
            )
        else:
            out.update(
                model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"],
                intermediate_size=int(config["intermediate_size"]),
                moe_intermediate_size=layout.expert_width, shared_expert_intermediate_size=1,
                num_experts=layout.num_experts, num_experts_per_tok=layout.top_k, norm_topk_prob=True,
                **sparse_layers_config(layout.moe_layers, layers),
                qkv_bias=config.get("model_type") == "qwen2" or bool(config.get("attention_bias")),
                use_sliding_window=bool(window), sliding_window=window, max_window_layers=0 if window else layers,
                layer_types=["sliding_attention" if window else "full_attention"] * layers,
            )
        out.update(stock_router_config(layout))
        out.update(layout.extra_config)
        return out
