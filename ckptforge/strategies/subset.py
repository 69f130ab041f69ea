"""Shared rules of the strategies whose experts are index subsets of the dense FFN's hidden units.

Parameters (``UpcycleOptions.strategy_params``; fields and defaults:
:class:`~ckptforge.strategy_settings.SubsetSettings`):

- ``expert_width`` S or ``expert_ratio`` r (S = round(r·d_ff)); default S = d_ff // E.
- ``mode``: ``sample`` (experts drawn independently, they may overlap) or ``partition`` (E disjoint
  sets of d_ff/E units that cover d_ff; then the sum of all experts is the dense FFN, b2 counted
  once because each expert carries b2/E).
- ``output_scale``: factor on the combined expert output: ``auto`` (k for partitions, 1 for sampled
  experts), ``1``, ``k``, ``E/k``, ``G`` (d_ff/S, the number of slices) or a number.

    >>> SubsetStrategy().expert_width({"expert_ratio": 0.25}, 64, 8)
    16
"""

from __future__ import annotations

from typing import Any

from ckptforge.strategy_settings import SCALE_NAMES, SubsetSettings

from .base import Strategy


class SubsetStrategy(Strategy):
    """Base class of random / uniform / importance / coactivation / granular."""

    settings = SubsetSettings

    def is_partition(self, params: dict[str, Any]) -> bool:
        return self.settings_of(params).mode == "partition"

    def validate(self, params: dict[str, Any], intermediate_size: int, num_experts: int, top_k: int) -> list[str]:
        d_ff, problems, settings = intermediate_size, [], self.settings_of(params)
        width, ratio = settings.expert_width, settings.expert_ratio
        if width is not None and ratio is not None:
            problems.append("--expert-width and --expert-ratio both given; pass only one")
        if width is not None and not 0 < width <= d_ff:
            problems.append(f"--expert-width {width} is outside 1..{d_ff} (the dense FFN has d_ff={d_ff}); "
                            f"choose a width in that range or use --expert-ratio")
        if ratio is not None and not 0 < ratio <= 1:
            problems.append(f"--expert-ratio {ratio} is outside (0, 1]; use e.g. 0.25 for experts of d_ff/4")
        if settings.mode == "partition":
            problems += _partition_problems(settings, d_ff, num_experts)
        scale = settings.output_scale
        if str(scale) not in SCALE_NAMES and not _is_number(scale):
            problems.append(f"--output-scale {scale!r} is not understood; use one of {', '.join(SCALE_NAMES)} or a number")
        return problems

    def expert_width(self, params: dict[str, Any], intermediate_size: int, num_experts: int = 1) -> int:
        settings = self.settings_of(params)
        if self.is_partition(params):
            return max(1, intermediate_size // num_experts)
        if settings.expert_width is not None:
            return int(settings.expert_width)
        if settings.expert_ratio is not None:
            return max(1, round(settings.expert_ratio * intermediate_size))
        return max(1, intermediate_size // num_experts)

    def default_scale(self, params: dict[str, Any]) -> str:
        return "k" if self.is_partition(params) else "1"

    def output_scale(self, params: dict[str, Any], num_experts: int, top_k: int, intermediate_size: int = 0) -> float:
        scale = str(self.settings_of(params).output_scale)
        if scale == "auto":
            scale = self.default_scale(params)
        width = self.expert_width(params, intermediate_size, num_experts) if intermediate_size else 1
        named = {"1": 1.0, "k": float(top_k), "E/k": num_experts / top_k,
                 "G": intermediate_size / width if intermediate_size else 1.0}
        return named[scale] if scale in named else float(scale)

    def down_bias_scale(self, params: dict[str, Any], num_experts: int) -> float:
        """Each expert's share of b2: 1/E for partitions (all experts at weight 1 count b2 once)."""
        return 1.0 / num_experts if self.is_partition(params) else 1.0


def _partition_problems(settings: Any, d_ff: int, num_experts: int) -> list[str]:
    problems = []
    if d_ff % num_experts:
        problems.append(f"d_ff={d_ff} is not divisible by --experts {num_experts}, which partition mode needs; "
                        f"use a divisor of {d_ff} or --coactivation-mode sample")
    if settings.expert_width is not None or settings.expert_ratio is not None:
        problems.append(f"partition mode fixes the expert width to d_ff/E = {d_ff // num_experts}; "
                        "drop --expert-width/--expert-ratio or use --coactivation-mode sample")
    parts = getattr(settings, "parts", None)  # coactivation's METIS parts
    if parts is not None and parts < num_experts:
        problems.append(f"--parts {parts} is fewer than --experts {num_experts}; partition mode needs at least one "
                        f"part per expert: use --parts {num_experts} or leave it out")
    elif parts is not None and parts % num_experts:
        problems.append(f"--parts {parts} is not a multiple of --experts {num_experts}; partition mode merges "
                        f"parts into experts evenly: use --parts {num_experts * max(1, parts // num_experts)}")
    return problems


def _is_number(value: Any) -> bool:
    try:
        return float(value) > 0
    except (TypeError, ValueError):
        return False

