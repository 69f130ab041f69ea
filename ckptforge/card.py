"""The model card (README.md) written into every output: Hub metadata + what was done."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from ckptforge.errors import UsageError
from ckptforge.io.source import ALIASES, DenseCheckpoint

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


def hub_repo_id(source_ref: str) -> str | None:
    """The Hub repo a source was resolved from: a Hub id or alias, or a path inside a Hugging Face
    cache snapshot (``…/models--org--name/snapshots/<rev>/…``); None for any other local path.

        >>> hub_repo_id("vit-base"), hub_repo_id("examples/tiny-vit-mnist") is None
        ('google/vit-base-patch16-224', True)
    """
    path = Path(source_ref).expanduser()
    if path.exists():
        parts = path.resolve().parts
        for i, part in enumerate(parts[:-2]):
            if part.startswith("models--") and parts[i + 1] == "snapshots" and part.count("--") >= 2:
                return "/".join(part.split("--")[1:3])
        return None
    base = ALIASES.get(source_ref, source_ref).split("@")[0]
    return base if _HUB_ID.match(base) else None


def check_base_model(repo_id: str) -> str:
    """``--base-model ID``: a Hub repo id namespace/name, or a UsageError with the fix."""
    if not _HUB_ID.match(repo_id):
        raise UsageError(f"--base-model '{repo_id}' is not a Hub repo id; write it as namespace/name, "
                         "e.g. google/vit-base-patch16-224")
    return repo_id


def card_data(plan: Any, source_ref: str, base_model: str | None = None) -> ModelCardData:
    """Hub metadata: base_model (``base_model``, else the Hub repo the source came from), tags, library, pipeline."""
    arch = (plan.output_config.get("architectures") or [""])[0]
    return ModelCardData(
        base_model=check_base_model(base_model) if base_model else hub_repo_id(source_ref),
        library_name="transformers",
        pipeline_tag=plan.output_format.pipelines.get(arch),
        tags=["moe", "upcycled", plan.options.strategy, "ckptforge"],
    )


def render_card(plan: Any, ckpt: DenseCheckpoint, verify: Any = None, calibration: dict | None = None,
                base_model: str | None = None) -> str:
    """README.md text for an output directory (``calibration``: the record in ckptforge.json)."""
    data = card_data(plan, ckpt.source, base_model)
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
        *_score_rows(o.strategy_params),
        *_calibration_rows(calibration),
        *_teacher_rows(plan, calibration),  # issue 13
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


def _teacher_rows(plan: Any, calibration: dict | None) -> list[str]:
    """Cross-size recycling (issue 13): which teacher the experts come from, and on which channels."""
    teacher = getattr(plan, "teacher", None)
    if not teacher:
        return []
    channels = (calibration or {}).get("teacher_channels") or []
    shown = ", ".join(map(str, channels[:16])) + (", …" if len(channels) > 16 else "")
    cut = teacher.get("student")
    rest = "every other weight from the student" if not cut else (
        f"every other weight sliced from the teacher too, on the same channels (student config "
        f"`{cut['config']}`; attention heads {cut['heads']}, head dim {cut['head_dim']}, by weight norm; "
        "dense layers' FFN units by weight norm)")
    return [
        f"| experts recycled from | `{teacher['source']}` (d {teacher['hidden_size']}, d_ff "
        f"{teacher['intermediate_size']}): hidden units by {plan.options.strategy}, {len(channels)} of "
        f"{teacher['hidden_size']} channels by importance at its FFN input; {rest} |",
        f"| teacher channels | {shown} (all in `ckptforge.json`, `teacher.channels`) |",
    ]


def _score_rows(params: dict) -> list[str]:
    """The importance score when it is a data-free one (from the weights, no calibration data)."""
    score = params.get("score")
    if score in (None, "activation"):
        return []
    return [f"| unit score | `{score}`: data-free, computed from the dense weights (no calibration data) |"]


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
