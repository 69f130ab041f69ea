"""random: each expert draws S hidden units independently (``randperm``), so experts overlap;
``mode=partition`` instead splits one random permutation into E disjoint sets that cover d_ff.

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> sel = Random().select(DenseFFN({"up": torch.zeros(8, 4)}), 2, {"mode": "partition"}, None, g)
    >>> sorted(torch.cat([e.units for e in sel.experts]).tolist()) == list(range(8))
    True
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch loads when a strategy selects units, not when a plan reads its metadata
    import torch

from ckptforge.strategy_settings import RandomSettings

from .base import DenseFFN, ExpertInit, LayerSelection
from .subset import SubsetStrategy


class Random(SubsetStrategy):
    name = "random"
    summary = "each expert takes S random hidden units (or a random partition with mode=partition)"
    settings = RandomSettings

    def select(self, ffn: DenseFFN, num_experts: int, params: dict[str, Any], stats: Any,
               generator: torch.Generator) -> LayerSelection:
        import torch

        d_ff = ffn.intermediate_size
        width = self.expert_width(params, d_ff, num_experts)
        if self.is_partition(params):
            perm = torch.randperm(d_ff, generator=generator)
            sets = [perm[e * width:(e + 1) * width] for e in range(num_experts)]
        else:
            sets = [torch.randperm(d_ff, generator=generator)[:width] for _ in range(num_experts)]
        return LayerSelection([ExpertInit(s.sort().values) for s in sets],
                              down_bias_scale=self.down_bias_scale(params, num_experts),
                              summary={"mode": self.settings_of(params).mode})
