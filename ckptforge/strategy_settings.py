"""Strategy settings: one frozen dataclass per expert-initialisation strategy; each default is written
here and nowhere else.

Standard library only (``--help`` must not import torch, and ``ckptforge/strategies/`` does), built
with the router settings' :func:`~ckptforge.moe.settings.setting` helper: a field's metadata gives
its help text, its flag when that is not ``--`` + the name with ``-``, its check and its choices.
``upcycle``'s and ``compare-strategies``' strategy flags, recipe validation, the JSON schema of
``strategy_params`` and ``docs/cli.md`` are derived from these classes; each strategy in
``ckptforge/strategies/`` names its class (``Strategy.settings``). ``UpcycleOptions.strategy_params``
keeps only the values that were given (so ``ckptforge.json`` stays as it was);
:func:`strategy_settings` fills in the rest from here.

    >>> strategy_settings("coactivation", {"parts": 8}).mode
    'partition'
    >>> strategy_settings("random", {"metric": "l1"}).problems()
    ['--metric does not apply to --strategy random; it is a setting of --strategy importance: drop it or use that strategy']
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from ckptforge.moe.settings import check_fields, flag_in, setting

#: The named values of ``output_scale`` (besides a positive number).
SCALE_NAMES = ("auto", "1", "k", "E/k", "G")
#: Data-free unit scores of importance (their formulas: ``strategies/importance.py``).
DATA_FREE_SCORE_NAMES = ("weight-norm", "down-norm")
_MODE = "experts draw units independently (sample) or split d_ff disjointly (partition)"


@dataclass(frozen=True)
class StrategySettings:
    """Base of the per-strategy settings; ``kind`` is the strategy name."""

    kind: ClassVar[str] = ""
    given: frozenset[str] = field(default=frozenset(), repr=False, compare=False)

    def problems(self) -> list[str]:
        """Every problem with these values that needs no checkpoint, each naming its flag and the fix."""
        out = [_not_here(self.kind, name) for name in sorted(self.given) if name not in setting_names(type(self))]
        return out + check_fields(self, flag_of)


@dataclass(frozen=True)
class CopyAllSettings(StrategySettings):
    """copy-all (sparse upcycling), optionally with noise or Drop-Upcycling."""

    kind: ClassVar[str] = "copy-all"
    noise_std: float = setting(0.0, "Gaussian noise std on expert weights", "non_negative")
    drop_ratio: float = setting(0.0, "Drop-Upcycling re-draw ratio (0.5 in the paper)", "share")


@dataclass(frozen=True)
class SubsetSettings(StrategySettings):
    """Shared by the strategies whose experts are subsets of the dense FFN's hidden units."""

    expert_width: int | None = setting(None, "hidden units per expert S (none: d_ff/E, or r·d_ff with --expert-ratio)")
    expert_ratio: float | None = setting(None, "expert width as a fraction r of d_ff (S = r·d_ff)")
    mode: str = setting("sample", _MODE, flag="--coactivation-mode", choices=("sample",))
    output_scale: str | float = setting("auto", "factor on the combined expert output: auto (k for partitions, 1 for "
                                "sampled experts) | 1 | k | E/k | G (d_ff/S) | a number")


@dataclass(frozen=True)
class RandomSettings(SubsetSettings):
    """random: S random units per expert, or a random partition."""

    kind: ClassVar[str] = "random"
    mode: str = setting("sample", _MODE, flag="--coactivation-mode", choices=("sample", "partition"))


@dataclass(frozen=True)
class UniformSettings(SubsetSettings):
    """uniform: the same evenly spaced units for every expert."""

    kind: ClassVar[str] = "uniform"


@dataclass(frozen=True)
class ImportanceSettings(SubsetSettings):
    """importance (MoE Jetpack): experts sample units in proportion to a unit score."""

    kind: ClassVar[str] = "importance"
    #: The ``score`` used when no calibration data is given (the one that started closest to dense of
    #: the data-free scores on examples/tiny-vit-mnist: see ``strategies/importance.py``).
    data_free_score: ClassVar[str] = "weight-norm"
    metric: str = setting("l2", "unit score over the calibration activations", choices=("l2", "l1", "count"))
    score: str = setting("activation", "unit score: activation (from --calibration) or one from the weights "
                         "(data-free; weight-norm without --calibration)", flag="--importance-score",
                         choices=("activation", *DATA_FREE_SCORE_NAMES))


@dataclass(frozen=True)
class CoactivationSettings(SubsetSettings):
    """coactivation (MoEfication / MoE Jetpack): METIS parts of the co-activation graph."""

    kind: ClassVar[str] = "coactivation"
    mode: str = setting("partition", _MODE, flag="--coactivation-mode", choices=("partition", "sample"))
    parts: int | None = setting(None, "METIS parts P (none: E for partition, 4E for sample)")
    threshold: str = setting("zero", "a unit is active above zero or above the batch's 90th percentile",
                             choices=("zero", "p90"))


@dataclass(frozen=True)
class GranularSettings(SubsetSettings):
    """granular (Megatron virtual groups): G slices of width S, replicated."""

    kind: ClassVar[str] = "granular"


#: Strategy name → its settings class (the order is the registry's: ``ckptforge/strategies/__init__.py``).
STRATEGY_SETTINGS: dict[str, type[StrategySettings]] = {cls.kind: cls for cls in (
    CopyAllSettings, RandomSettings, UniformSettings, ImportanceSettings, CoactivationSettings, GranularSettings)}


def setting_names(cls: type) -> tuple[str, ...]:
    """The setting fields of a settings class, in order (``given`` is bookkeeping, not a setting)."""
    return tuple(f.name for f in fields(cls) if f.name != "given")


def flag_of(name: str) -> str:
    """The flag of a strategy setting (``mode`` → ``--coactivation-mode``)."""
    return flag_in(STRATEGY_SETTINGS, name)


def owners_of(name: str) -> str:
    """``--strategy a or --strategy b``: the strategies that take setting ``name`` (empty: none)."""
    return " or ".join(f"--strategy {k}" for k, cls in STRATEGY_SETTINGS.items() if name in setting_names(cls))


def _not_here(kind: str, name: str) -> str:
    owners = owners_of(name)
    where = f"; it is a setting of {owners}: drop it or use that strategy" if owners else "; drop it"
    return f"{flag_of(name)} does not apply to --strategy {kind}{where}"


def strategy_settings(strategy: str, params: dict[str, Any] | None) -> StrategySettings:
    """The settings of ``strategy`` from its stored ``strategy_params``, defaults filled in.

    Keys the strategy does not take are kept aside (``given``) so that :meth:`~StrategySettings.problems`
    names them. Raises KeyError for a strategy without settings.
    """
    return settings_from(STRATEGY_SETTINGS[strategy], params)


def settings_from(cls: type[StrategySettings], params: dict[str, Any] | None) -> StrategySettings:
    """An instance of ``cls`` from a ``strategy_params`` dict (the keys it does not take go to ``given``)."""
    params = params or {}
    own = setting_names(cls)
    return cls(given=frozenset(params), **{k: v for k, v in params.items() if k in own})


def strategy_problems(strategy: str | None, params: dict[str, Any] | None) -> list[str]:
    """Problems of ``strategy_params`` for ``strategy`` (none for an unknown strategy: the plan names it).

        >>> strategy_problems("copy-all", {"drop_ratio": 2})
        ['--drop-ratio 2 must be in [0, 1]']
    """
    if strategy not in STRATEGY_SETTINGS:
        return []
    try:
        return strategy_settings(strategy, params).problems()
    except TypeError as exc:
        return [f"strategy_params are not understood: {exc}"]
