"""Describe any checkpoint, dense or MoE, local or Hub, without loading its weights.

    >>> info = inspect_source("examples/tiny-vit-mnist")      # doctest: +SKIP
    >>> info["family"], info["num_layers"]                    # doctest: +SKIP
    ('vit', 4)
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from ckptforge.errors import UnsupportedArchitectureError
from ckptforge.families import detect_family
from ckptforge.families.base import stock_moe_layers
from ckptforge.io.source import open_checkpoint
from ckptforge.moe import active_expert_params

#: MoE model types ckptforge writes → the dense family they come from.
MOE_TYPES = {"vit_moe": "vit", "bert_moe": "bert", "mixtral": "llama", "qwen2_moe": "llama", "qwen3_moe": "qwen3"}


def inspect_source(ref: str) -> dict[str, Any]:
    """Family, sizes, MoE layout, parameter counts, dtypes and files of a checkpoint."""
    ckpt = open_checkpoint(ref)
    cfg = ckpt.config
    model_type = cfg.get("model_type")
    is_moe = model_type in MOE_TYPES
    if is_moe:
        family = MOE_TYPES[model_type]
    else:
        try:
            family = detect_family(cfg).name
        except UnsupportedArchitectureError:
            family = None
    total = sum(t.numel for t in ckpt.tensors.values())
    # routed experts: ".experts." (also Mixtral / Qwen2-MoE per-expert names), sphero's ".universal_experts."
    expert_params = sum(t.numel for n, t in ckpt.tensors.items() if re.search(r"\.(\w+_)?experts\.", n))
    num_experts = cfg.get("num_experts", cfg.get("num_local_experts")) if is_moe else None
    top_k = cfg.get("num_experts_per_tok") if is_moe else None
    active = total - expert_params
    if num_experts:
        active += active_expert_params(cfg.get("moe_router"), expert_params, num_experts, top_k or 1)
    layers = int(cfg.get("num_hidden_layers", 0))
    if not is_moe:
        moe_layers: list[int] = []
    else:
        moe_layers = stock_moe_layers({"num_hidden_layers": layers, **cfg})
    info = {
        "source": ref,
        "path": str(ckpt.root),
        "model_type": model_type,
        "family": family,
        "architecture": (cfg.get("architectures") or [None])[0],
        "is_moe": is_moe,
        "num_layers": layers,
        "hidden_size": cfg.get("hidden_size"),
        "intermediate_size": cfg.get("intermediate_size"),
        "moe_layers": moe_layers,
        "num_experts": num_experts,
        "top_k": top_k,
        "expert_width": cfg.get("expert_intermediate_size", cfg.get("moe_intermediate_size")) if is_moe else None,
        "params_total": total,
        "params_active": active,
        "tensors": len(ckpt.tensors),
        "dtypes": dict(Counter(str(t.dtype).removeprefix("torch.") for t in ckpt.tensors.values())),
        "files": {p.name: p.stat().st_size for p in ckpt.weight_files},
    }
    if is_moe and (provenance := _multisource_record(ckpt.root)) is not None:  # issue 14
        info["multisource"] = provenance
    ckpt.close()
    return info


def _multisource_record(root) -> dict[str, Any] | None:
    """Gate mode and each expert's source of a multi-source output (issue 14), from its ckptforge.json."""
    import json

    path = root / "ckptforge.json"
    record = json.loads(path.read_text()).get("multisource") if path.is_file() else None
    if not record:
        return None
    return {"base_model": record["base_model"]["source"], "gate_mode": record["gate_mode"],
            "experts": [e["source"] for e in record["experts"]],
            "shared_experts": [e["source"] for e in record["shared_experts"]]}
