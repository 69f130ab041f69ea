"""coactivation (MoEfication / MoE Jetpack graph partitioning): units that fire together belong
together. C = Σ AᵀA over calibration tokens (A = act > τ, τ = 0 or the batch's 90th percentile,
diagonal zeroed), sparsified and partitioned with METIS (:mod:`.graph`).

- ``mode=partition`` (default): E balanced disjoint parts covering d_ff (``parts`` P ≥ E: METIS makes
  P parts and each expert merges P/E consecutive ones); the sum of all experts is the dense FFN.
- ``mode=sample``: P parts (default 4E); part probability ∝ its internal co-activation mass; each
  expert draws parts without replacement and concatenates their units up to S.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch loads when a strategy selects units, not when a plan reads its metadata
    import torch

from ckptforge.strategy_settings import CoactivationSettings

from .base import DenseFFN, ExpertInit, LayerSelection
from .subset import SubsetStrategy


class Coactivation(SubsetStrategy):
    name = "coactivation"
    needs_stats = True
    summary = "METIS partition of the calibration co-activation graph (MoEfication / MoE Jetpack)"
    settings = CoactivationSettings

    def stats_needed(self, params: dict[str, Any]) -> set[str]:
        return {"scores", "coactivation"}

    def validate(self, params: dict[str, Any], intermediate_size: int, num_experts: int, top_k: int) -> list[str]:
        problems = super().validate(params, intermediate_size, num_experts, top_k)
        parts = self.settings_of(params).parts
        if parts is not None and not 1 <= parts <= intermediate_size:
            problems.append(f"--parts {parts} is outside 1..{intermediate_size} (d_ff); use e.g. {4 * num_experts}")
        return problems

    def num_parts(self, params: dict[str, Any], num_experts: int, intermediate_size: int) -> int:
        default = num_experts if self.is_partition(params) else 4 * num_experts
        return min(int(self.settings_of(params).parts or default), intermediate_size)

    def select(self, ffn: DenseFFN, num_experts: int, params: dict[str, Any], stats: Any,
               generator: torch.Generator) -> LayerSelection:
        import torch

        from .graph import partition_units  # pymetis, torch: loaded when units are partitioned

        d_ff = ffn.intermediate_size
        nparts = self.num_parts(params, num_experts, d_ff)
        parts = partition_units(stats.coactivation, nparts)
        summary = {"mode": self.settings_of(params).mode, "parts": nparts,
                   "part_sizes": sorted({p.numel() for p in parts})}
        if self.is_partition(params):
            group = nparts // num_experts
            sets = [torch.cat(parts[e * group:(e + 1) * group]).sort().values for e in range(num_experts)]
            return LayerSelection([ExpertInit(s) for s in sets], down_bias_scale=1.0 / num_experts, summary=summary)
        width = self.expert_width(params, d_ff, num_experts)
        c = stats.coactivation.double()
        mass = torch.stack([c[p][:, p].sum() for p in parts]) + 1e-12
        sets = []
        for _ in range(num_experts):
            order = torch.multinomial(mass / mass.sum(), nparts, replacement=False, generator=generator)
            sets.append(torch.cat([parts[i] for i in order.tolist()])[:width].sort().values)
        return LayerSelection([ExpertInit(s) for s in sets], summary=summary)
