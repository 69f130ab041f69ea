"""What ``ckptforge.json`` records about a conversion: options, source and output file hashes,
the plan, the verify report, and the calibration and expert selections behind the experts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ckptforge.io.source import DenseCheckpoint, sha256_file
from ckptforge.strategies import LayerSelection
from ckptforge.version import __version__


def provenance(plan: Any, ckpt: DenseCheckpoint, source_hashes: dict[str, str], out_dir: Path,
               shard_hashes: dict[str, str], report: Any) -> dict[str, Any]:
    """The record of a conversion; ``files``: every file in ``out_dir`` (but ckptforge.json) → sha256."""
    files = {
        p.name: shard_hashes.get(p.name) or sha256_file(p)
        for p in sorted(out_dir.iterdir()) if p.is_file() and p.name != "ckptforge.json"
    }
    return {
        "ckptforge_version": __version__,
        "source": {"ref": ckpt.source, "revision": ckpt.revision, "files": source_hashes},
        "options": plan.options.to_dict(),
        "plan": {k: v for k, v in plan.to_dict().items() if k not in ("moe_tensors", "free_bytes")},
        "verify": report.to_dict() if report is not None else None,
        "files": files,
    }


def teacher_channels(selections: dict[int, LayerSelection]) -> list[int] | None:
    """The teacher channels the experts keep (one set for every layer), as a list (issue 13)."""
    first = next((sel.experts[0].channels for sel in selections.values() if sel.experts), None)
    return first.tolist() if first is not None else None


def calibration_record(stats: Any, selections: dict[int, LayerSelection]) -> dict[str, Any] | None:
    """Calibration source, sample count, statistics summary and each layer's selection summary."""
    record: dict[str, Any] = {}
    if stats is not None and hasattr(stats, "describe"):
        record["statistics"] = stats.describe()
    if any(sel.summary for sel in selections.values()):
        record["selection"] = {str(layer): sel.summary for layer, sel in sorted(selections.items())}
    return record or None
