"""What an upcycling run needs from calibration, decided from its options alone (no torch: the
planner and ``--dry-run`` ask it before any tensor is read; :mod:`ckptforge.calibration` collects it)."""

from __future__ import annotations

from typing import Any


def needed_stats(options: Any) -> set[str]:
    """What an upcycling run needs from calibration (empty: no calibration pass)."""
    from ckptforge.strategies import STRATEGIES

    strategy = STRATEGIES.get(options.strategy)
    needs = strategy.stats_needed(options.strategy_params) if strategy is not None else set()
    if options.router_init == "centroid":
        needs |= {"scores", "centroids"}
    if getattr(options, "teacher", None):  # issue 13: the teacher's FFN-input channels
        needs |= {"channels"}
    return needs


def missing_calibration_message(options: Any) -> str:
    """The one-line problem for a run that needs statistics (:func:`needed_stats`) but was given no data."""
    what = f"--strategy {options.strategy}" if options.router_init != "centroid" else "--router-init centroid"
    if getattr(options, "teacher", None):  # issue 13
        what = "--teacher (its FFN-input channels are chosen by importance)"
    return (f"{what} needs activation statistics; pass --calibration PATH "
            "(a folder of images, a .txt/.jsonl file or a dataset)")
