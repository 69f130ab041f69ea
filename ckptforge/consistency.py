"""Up-front checks a plan runs before any tensor is read or written: the config's sizes against the
weights' shapes, and plausible bounds on the sizes the user asks for.

A config that disagrees with its weights would otherwise be found while writing (a shard of the
wrong size) or never (an output whose config claims layers it has no weights for).

    >>> bound_problems(num_experts=10**9, top_k=2)
    ['--experts 1000000000 is more than 65536 experts per layer; use fewer experts']
"""

from __future__ import annotations

from typing import Any

from ckptforge.families import Dims, Family
from ckptforge.families.base import ROLE_SHAPES

#: The most experts (core + universal) one MoE layer may have; larger counts are typos.
MAX_EXPERTS = 65536
#: How many shape disagreements one message lists before summarising.
_SHOWN = 2


def bound_problems(num_experts: int, top_k: int, universal_experts: int | None = None) -> list[str]:
    """Problems with sizes too large to plan (checked before the plan lays out a tensor)."""
    out = []
    if num_experts > MAX_EXPERTS:
        out.append(f"--experts {num_experts} is more than {MAX_EXPERTS} experts per layer; use fewer experts")
    if universal_experts is not None and universal_experts > MAX_EXPERTS:
        out.append(f"--universal-experts {universal_experts} is more than {MAX_EXPERTS}; use fewer experts")
    if top_k > MAX_EXPERTS:
        out.append(f"--top-k {top_k} is more than {MAX_EXPERTS}; use a top-k of at most --experts")
    return out


def weight_problems(ckpt: Any, family: Family, prefix: str, dims: Dims, canonical: dict[str, str]) -> list[str]:
    """The config's layer count and FFN sizes checked against the weights (every layer, every FFN tensor)."""
    def names(layer: int) -> dict[str, str]:
        return family.ffn_names(prefix, layer)

    problems = []
    held = [layer for layer in range(dims.num_layers) if names(layer)["up"] in canonical]
    if len(held) < dims.num_layers:
        absent = next(layer for layer in range(dims.num_layers) if layer not in set(held))
        problems.append(f"config.json says num_hidden_layers {dims.num_layers} but the weights hold FFN tensors "
                        f"for {len(held)} layers (layer {absent} has none); fix num_hidden_layers or the weights")
    if names(dims.num_layers)["up"] in canonical:
        problems.append(f"config.json says num_hidden_layers {dims.num_layers} but the weights hold more layers "
                        f"(layer {dims.num_layers} exists); fix num_hidden_layers")
    wrong = []
    for layer in held:
        for role, name in names(layer).items():
            if name not in canonical or role not in ROLE_SHAPES:
                continue
            shape = tuple(ckpt.tensors[canonical[name]].shape)
            want = ROLE_SHAPES[role](dims.intermediate_size, dims.hidden_size)
            if shape != want:
                wrong.append(f"{canonical[name]} is {'×'.join(map(str, shape))}, not {'×'.join(map(str, want))}")
    if wrong:
        more = f" and {len(wrong) - _SHOWN} more" if len(wrong) > _SHOWN else ""
        problems.append(f"the weights disagree with config.json (hidden_size {dims.hidden_size}, intermediate_size "
                        f"{dims.intermediate_size}): {'; '.join(wrong[:_SHOWN])}{more}; fix config.json or the weights")
    return problems
