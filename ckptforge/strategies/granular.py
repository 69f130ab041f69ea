"""granular (Megatron's "virtual group" upcycling): split d_ff into G = d_ff/S contiguous slices
and replicate them, expert e taking slice e mod G (E must be a multiple of G). With E = G the
experts are a disjoint partition whose sum is the dense FFN (b2 counted once). The combined output
is scaled (``output_scale``, default k; ``G`` gives an unbiased output under uniform routing).

    >>> Granular().expert_width({}, 64, 8)
    8
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch loads when a strategy selects units, not when a plan reads its metadata
    import torch

from ckptforge.strategy_settings import GranularSettings

from .base import DenseFFN, ExpertInit, LayerSelection
from .subset import SubsetStrategy


class Granular(SubsetStrategy):
    name = "granular"
    summary = "d_ff split into G slices of width S, replicated E/G times (Megatron virtual groups)"
    settings = GranularSettings

    def is_partition(self, params: dict[str, Any]) -> bool:
        return False

    def validate(self, params: dict[str, Any], intermediate_size: int, num_experts: int, top_k: int) -> list[str]:
        problems = super().validate(params, intermediate_size, num_experts, top_k)
        if problems:
            return problems
        width = self.expert_width(params, intermediate_size, num_experts)
        if intermediate_size % width:
            return problems + [f"granular needs an expert width that divides d_ff={intermediate_size} (got {width}); "
                               f"use e.g. --expert-width {intermediate_size // num_experts or 1}"]
        slices = intermediate_size // width
        if num_experts % slices:
            problems.append(f"granular makes {slices} slices of width {width}; --experts {num_experts} is not a "
                            f"multiple of {slices}: use --experts {slices} (or a multiple) or a wider --expert-width")
        return problems

    def default_scale(self, params: dict[str, Any]) -> str:
        return "k"

    def select(self, ffn: DenseFFN, num_experts: int, params: dict[str, Any], stats: Any,
               generator: torch.Generator) -> LayerSelection:
        import torch

        width = self.expert_width(params, ffn.intermediate_size, num_experts)
        slices = ffn.intermediate_size // width
        experts = [ExpertInit(torch.arange((e % slices) * width, (e % slices + 1) * width)) for e in range(num_experts)]
        return LayerSelection(experts, down_bias_scale=1.0 / num_experts,
                              summary={"slices": slices, "replicas": num_experts // slices})
