"""Which weights a ``finetune`` run trains: ``--train all|router|experts`` freezes the rest, and
``--lora`` trains low-rank adapters (``peft``) on the experts while every base weight stays frozen.

Parameter roles are data: name patterns per role, covering Mixtral / Qwen2-MoE (stock transformers),
ckptforge's ``vit_moe`` / ``bert_moe`` layers, and the dense FFN of a ``--compare`` model (its
"experts" are the FFN they were copied from).

    >>> import re
    >>> [role for role, pats in ROLE_PATTERNS.items() if any(re.search(p, "model.layers.0.mlp.gate.weight") for p in pats)]
    ['router']
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from ckptforge.errors import UsageError

TRAIN_CHOICES = ("all", "router", "experts")
PEFT_INSTALL = "--lora needs the peft package: pip install peft"

#: role → regular expressions over ``named_parameters()`` names.
ROLE_PATTERNS: dict[str, tuple[str, ...]] = {
    "router": (r"\.mlp\.gate\.weight$", r"\.shared_expert_gate\.", r"\.moe\.router\."),
    "experts": (
        r"\.mlp\.experts\.", r"\.mlp\.shared_expert\.", r"\.moe\.(universal_)?experts\.",  # MoE layers
        r"\.mlp\.(gate|up|down)_proj\.", r"\.mlp\.fc[12]\.",  # dense FFN (LLaMA family, ViT in transformers 5)
        r"\.intermediate\.dense\.", r"\.layer\.\d+\.output\.dense\.",  # dense FFN (BERT, legacy ViT names)
    ),
}
#: Heads a run may replace (a new number of classes): they always train.
HEAD_MODULES = ("classifier",)


@dataclass(frozen=True)
class LoraSettings:
    """peft LoRA on the expert weights: rank r, alpha = 2r, no dropout."""

    rank: int = 8


def in_role(name: str, role: str) -> bool:
    """Whether parameter ``name`` plays ``role`` (router or experts)."""
    return any(re.search(p, name) for p in ROLE_PATTERNS[role])


def apply_train(model: nn.Module, train: str, run: str, head_replaced: bool = False) -> nn.Module:
    """Freeze every parameter outside ``train`` (a new head always trains); a selection that
    leaves nothing to train raises UsageError."""
    if train == "all":
        return model
    for name, p in model.named_parameters():
        p.requires_grad_(in_role(name, train) or (head_replaced and _in_head(name)))
    if not any(in_role(n, train) for n, _ in model.named_parameters()):
        raise UsageError(f"--train {train} selects no weight of the {run} model ({type(model).__name__} has no "
                         f"{train}); use --train all" + (" or experts" if train == "router" else ""))
    return model


def apply_lora(model: nn.Module, settings: LoraSettings, run: str, head_replaced: bool = False) -> nn.Module:
    """Wrap ``model`` in a peft LoRA model with adapters on its experts (3-D stacked expert weights
    through ``target_parameters``, dense FFN ``nn.Linear`` modules through ``target_modules``)."""
    peft = import_peft()
    stacked = [n for n, p in model.named_parameters() if in_role(n, "experts") and p.ndim == 3]
    linear = sorted({n for n, m in model.named_modules() if isinstance(m, nn.Linear) and in_role(n + ".", "experts")})
    if not stacked and not linear:
        raise UsageError(f"--lora found no expert weights in the {run} model ({type(model).__name__}); "
                         "use --train all")
    config = peft.LoraConfig(r=settings.rank, lora_alpha=2 * settings.rank, lora_dropout=0.0,
                             target_modules=linear, target_parameters=stacked or None,
                             modules_to_save=list(HEAD_MODULES) if head_replaced else None)
    return peft.get_peft_model(model, config)


def import_peft() -> Any:
    """The peft module; a missing install raises UsageError with the install command."""
    try:
        import peft
    except ImportError:
        raise UsageError(PEFT_INSTALL) from None
    return peft


def is_lora(model: nn.Module) -> bool:
    """Whether ``model`` is a peft model (a ``--lora`` run)."""
    return hasattr(model, "peft_config")


def trainable_count(model: nn.Module) -> int:
    """Parameters the optimiser updates."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _in_head(name: str) -> bool:
    return any(name == h or name.startswith(h + ".") for h in HEAD_MODULES)
