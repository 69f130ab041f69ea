"""What a strategy receives and returns. Strategies are pure: (weights, statistics, rng) → index sets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # torch loads when a strategy selects units, not when a plan reads its metadata
    import torch

from ckptforge.strategy_settings import StrategySettings, setting_names, settings_from


@dataclass
class DenseFFN:
    """One dense FFN's weights by role: up (d_ff×d) [, gate (d_ff×d)], down (d×d_ff), optional biases."""

    weights: dict[str, torch.Tensor]

    @property
    def intermediate_size(self) -> int:
        return self.weights["up"].shape[0]

    @property
    def hidden_size(self) -> int:
        return self.weights["up"].shape[1]


@dataclass
class ExpertInit:
    """One expert: the hidden units ``units`` (sorted indices into d_ff) it takes from the dense FFN,
    ``redraw`` — positions within ``units`` whose weights are re-drawn (Drop-Upcycling) — and
    ``channels``, the model-dimension channels (sorted indices into d) it keeps: None keeps all;
    cross-size recycling keeps d_student of a wider teacher's d."""

    units: torch.Tensor
    redraw: torch.Tensor | None = None
    channels: torch.Tensor | None = None


@dataclass
class LayerSelection:
    """A strategy's answer for one MoE layer.

    ``down_bias_scale`` multiplies each expert's copy of the dense output bias (1 for copy-all with
    renormalised weights; 1/k makes partitions count b2 once). ``noise_std`` adds Gaussian noise to
    every expert weight.
    """

    experts: list[ExpertInit]
    down_bias_scale: float = 1.0
    noise_std: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)


class Strategy:
    """Base class: subclasses set ``name`` and ``settings`` (their class in ``ckptforge/strategy_settings.py``)
    and implement ``select``."""

    name: ClassVar[str] = ""
    #: The settings dataclass: the ``strategy_params`` this strategy takes and their defaults (issue 12).
    settings: ClassVar[type[StrategySettings]] = StrategySettings
    needs_stats: ClassVar[bool] = False
    summary: ClassVar[str] = ""
    #: Parameter sets compare-strategies measures beside the defaults (e.g. importance's data-free score).
    compare_variants: ClassVar[tuple[dict[str, Any], ...]] = ()

    @property
    def params(self) -> tuple[str, ...]:
        """The ``strategy_params`` keys this strategy takes (the fields of its settings class)."""
        return setting_names(self.settings)

    def settings_of(self, params: dict[str, Any]) -> StrategySettings:
        """``params`` (``UpcycleOptions.strategy_params``) as this strategy's settings, defaults filled in."""
        return settings_from(self.settings, params)

    def validate(self, params: dict[str, Any], intermediate_size: int, num_experts: int, top_k: int) -> list[str]:
        """Problems with ``params`` for this FFN size; empty when fine (checked before any tensor is read)."""
        return []

    def resolve_params(self, params: dict[str, Any], has_data: bool) -> dict[str, Any]:
        """``params`` with the defaults that depend on whether calibration data is given filled in
        (recorded in ckptforge.json); the same dict when none apply."""
        return params

    def stats_needed(self, params: dict[str, Any]) -> set[str]:
        """What the strategy reads from calibration: ``scores`` (per-unit L1/L2/count) and/or
        ``coactivation`` (the d_ff×d_ff counts); empty when it needs no calibration data."""
        return set()

    def expert_width(self, params: dict[str, Any], intermediate_size: int, num_experts: int = 1) -> int:
        """Width S of every expert."""
        return intermediate_size

    def exact(self, params: dict[str, Any]) -> bool:
        """True when, with these params, the MoE computes the dense function exactly at init."""
        return False

    def output_scale(self, params: dict[str, Any], num_experts: int, top_k: int, intermediate_size: int = 0) -> float:
        """Factor on the combined expert output, stored in the output config (granular scaling)."""
        return 1.0

    def select(
        self,
        ffn: DenseFFN,
        num_experts: int,
        params: dict[str, Any],
        stats: Any,
        generator: torch.Generator,
    ) -> LayerSelection:
        raise NotImplementedError
