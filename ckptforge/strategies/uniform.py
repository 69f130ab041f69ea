"""uniform (MoE Jetpack's definition): every expert takes the same evenly spaced units
``round(linspace(0, d_ff − 1, S))``; useful for the universal experts of the dual path.

    >>> Uniform().units(8, 3).tolist()
    [0, 4, 7]
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch loads when a strategy selects units, not when a plan reads its metadata
    import torch

from ckptforge.strategy_settings import UniformSettings

from .base import DenseFFN, ExpertInit, LayerSelection
from .subset import SubsetStrategy


class Uniform(SubsetStrategy):
    name = "uniform"
    summary = "every expert takes the same evenly spaced S hidden units (MoE Jetpack)"
    settings = UniformSettings

    def units(self, intermediate_size: int, width: int) -> torch.Tensor:
        """The evenly spaced unit indices (unique, sorted)."""
        import torch

        return torch.linspace(0, intermediate_size - 1, width, dtype=torch.float64).round().long().unique()

    def select(self, ffn: DenseFFN, num_experts: int, params: dict[str, Any], stats: Any,
               generator: torch.Generator) -> LayerSelection:
        units = self.units(ffn.intermediate_size, self.expert_width(params, ffn.intermediate_size, num_experts))
        return LayerSelection([ExpertInit(units) for _ in range(num_experts)])
