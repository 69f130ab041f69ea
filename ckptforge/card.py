"""The model card (README.md) written into every output: Hub metadata + what was done."""

from __future__ import annotations

import re
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from ckptforge.io.source import ALIASES, DenseCheckpoint

_PIPELINES = {
    "ViTMoEForImageClassification": "image-classification",
    "ViTMoEModel": "image-feature-extraction",
    "BertMoEForSequenceClassification": "text-classification",
    "BertMoEModel": "feature-extraction",
    "BertMoEForMaskedLM": "fill-mask",
    "MixtralForCausalLM": "text-generation",
    "Qwen2MoeForCausalLM": "text-generation",
}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
#: How the experts compute, for stock transformers MoE classes and for ckptforge's own (issue 15).
_EXPERTS_BACKEND_STOCK = (
    "transformers picks how the experts compute with `experts_implementation` in `from_pretrained`: "
    "`\"grouped_mm\"` (its default where supported: all experts in two grouped GEMMs, not a loop over experts), "
    "`\"batched_mm\"`, or `\"eager\"` (one expert at a time)."
)
_EXPERTS_BACKEND_REMOTE = (
    "`experts_implementation` in `from_pretrained` picks how the experts compute: `\"auto\"` (default: grouped "
    "GEMMs on CPU and for bf16 on CUDA GPUs of compute capability ≥ 8.0, the per-expert loop elsewhere), `\"grouped_mm\"` or `\"eager\"`."
)


def card_data(plan: Any, source_ref: str) -> ModelCardData:
    """Hub metadata: base_model (when the source is a Hub id), tags, library and pipeline."""
    arch = (plan.output_config.get("architectures") or [""])[0]
    base = ALIASES.get(source_ref, source_ref).split("@")[0]
    return ModelCardData(
        base_model=base if _HUB_ID.match(base) else None,
        library_name="transformers",
        pipeline_tag=_PIPELINES.get(arch),
        tags=["moe", "upcycled", plan.options.strategy, "ckptforge"],
    )


def render_card(plan: Any, ckpt: DenseCheckpoint, verify: Any = None, calibration: dict | None = None) -> str:
    """README.md text for an output directory (``calibration``: the record in ckptforge.json)."""
    data = card_data(plan, ckpt.source)
    o = plan.options
    remote = plan.output_format.remote_module
    load = (
        "```python\nimport ckptforge  # registers the classes; or pass trust_remote_code=True without it\n"
        "from transformers import AutoModel\nmodel = AutoModel.from_pretrained(\"PATH\")\n```"
        if remote else
        "```python\nfrom transformers import AutoModelForCausalLM\n"
        "model = AutoModelForCausalLM.from_pretrained(\"PATH\")\n```"
    )
    backend = _EXPERTS_BACKEND_REMOTE if remote else _EXPERTS_BACKEND_STOCK
    lines = [
        f"# {plan.output_config['architectures'][0]} upcycled from `{ckpt.source}`",
        "",
        f"A Mixture-of-Experts checkpoint made by ckptforge from the dense {plan.family} checkpoint "
        f"`{ckpt.source}`, with the **{o.strategy}** expert initialisation.",
        "",
        "| | |",
        "|---|---|",
        f"| output format | `{plan.output_format.name}` |",
        f"| MoE layers | {', '.join(map(str, plan.moe_layers))} of {plan.dims.num_layers} |",
        f"| experts per layer (E) | {o.num_experts} |",
        f"| experts per token (k) | {o.top_k} |",
        f"| expert width | {plan.expert_width} (dense d_ff {plan.dims.intermediate_size}) |",
        f"| strategy | {o.strategy} {o.strategy_params or ''} |",
        f"| router | {o.router.get('type')} (init {o.router_init}) |",
        f"| parameters total / active | {plan.params_total:,} / {plan.params_active:,} |",
        f"| seed | {o.seed} |",
        *_calibration_rows(calibration),
        "",
        "## Verification",
        "",
        verify.to_markdown() if verify is not None else "Not verified at conversion time; run `ckptforge verify`.",
        "",
        "## Loading",
        "",
        load,
        "",
        backend,
        "",
        "Provenance (options, source and output hashes) is in `ckptforge.json`.",
        "",
    ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


def _calibration_rows(calibration: dict | None) -> list[str]:
    stats = (calibration or {}).get("statistics")
    if not stats:
        return []
    layers = stats.get("layers", {})
    tokens = next(iter(layers.values()), {}).get("tokens", 0)
    fire = [v["mean_fire_rate"] for v in layers.values()]
    return [
        f"| calibration | `{stats.get('source')}` ({stats.get('kind')}, {stats.get('samples')} samples, {tokens:,} tokens) |",
        f"| activation statistics | mean fire rate {sum(fire) / max(len(fire), 1):.3f} over {len(layers)} layer(s); "
        "per-layer summary in `ckptforge.json` |",
    ]
