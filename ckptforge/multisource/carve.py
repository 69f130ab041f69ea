"""Carve a dense FFN into a shared expert and routed experts (CMoE-style), as a Qwen2-MoE.

Per MoE layer, calibration data (pushed through the layer-by-layer runner) counts how often each
hidden unit fires; the ``w_shared`` most active units form the shared expert and the rest are
partitioned by co-activation (METIS, balanced) into E routed experts of ``w`` units each, where
``w = d_ff // (E + 1)`` and the shared expert takes the remainder (``d_ff − E·w``). Output scales
make the dense function exact when every routed expert is active with equal weight (``--top-k E``
and ``--router-init zeros``): routed down projections × k, the shared one × 2 (its sigmoid gate
starts at zero, σ(0) = ½).

    >>> result = carve_shared_expert("tiny-llama", "out", num_experts=4, top_k=4, calibration="c.txt")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ckptforge.version import __version__
from ckptforge.calibration_data import load_calibration
from ckptforge.card import render_card
from ckptforge.config import UpcycleOptions
from ckptforge.errors import PlanError
from ckptforge.execute import generator_for, write_tensors
from ckptforge.families import detect_family
from ckptforge.io.paths import local_paths
from ckptforge.io.source import open_checkpoint, sha256_file
from ckptforge.io.writer import AtomicOutput
from ckptforge.loading import copy_files
from ckptforge.plan import Plan, PlannedTensor, TensorOp, build_plan
from ckptforge.strategies.graph import partition_units

from .plan import _with_shared_width, shared_role
from .runner import collect_stats_layerwise


def carve_widths(intermediate_size: int, num_experts: int) -> tuple[int, int]:
    """(routed expert width w, shared expert width): d_ff split into E + 1 parts, the remainder shared.

        >>> carve_widths(64, 4)
        (12, 16)
    """
    w = intermediate_size // (num_experts + 1)
    return w, intermediate_size - num_experts * w


def carve_shared_expert(source: str | Path, out: str | Path, *, num_experts: int, top_k: int, calibration: str,
                        layers: str = "all", calib_samples: int = 256, calib_batch_size: int = 16,
                        router_init: str = "normal", router_init_std: float = 0.02, seed: int = 0,
                        dtype: str = "auto", shard_size: int = 5 * 10**9, force: bool = False,
                        progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Convert ``source`` into a Qwen2-MoE with a carved shared expert; returns the provenance record."""
    start = time.perf_counter()
    ckpt = open_checkpoint(str(source))
    try:
        family = detect_family(ckpt.config)
        dims = family.dims(ckpt.config)
        width, shared = carve_widths(dims.intermediate_size, num_experts)
        fmt = family.offered_formats.get("qwen2_moe")
        problems = [] if fmt is not None else [
            f"a carved shared expert needs an output format with one (Qwen2-MoE); {family.name} sources have none"]
        if width < 1:
            problems.append(f"--experts {num_experts} leaves no units per expert (d_ff {dims.intermediate_size}); use fewer")
        if router_init not in ("normal", "zeros"):
            problems.append(f"--router-init {router_init} does not apply to a carved shared expert; use normal or zeros")
        if problems:
            raise PlanError(problems)
        options = UpcycleOptions(num_experts=num_experts, top_k=top_k, layers=layers, strategy="uniform",
                                 strategy_params={"expert_width": width}, router_init=router_init,
                                 router_init_std=router_init_std, seed=seed, dtype=dtype, shard_size=shard_size)
        plan = build_plan(ckpt, options, Path(out), output_format=_with_shared_width(fmt, shared))
        plan.output_config["shared_expert_intermediate_size"] = shared
        target = AtomicOutput(Path(out), force, reads=[*ckpt.read_paths(), *local_paths([calibration])])
        target.check()
        data = load_calibration(calibration, ckpt, family.modality, samples=calib_samples,
                                batch_size=calib_batch_size, seed=seed)
        stats = collect_stats_layerwise(ckpt, data, plan.moe_layers, needs={"scores", "coactivation"})
        carver = _Carver(plan, ckpt, family, stats, shared, top_k)
        with target as tmp:
            hashes = write_tensors(plan, ckpt, tmp, progress=progress, pieces=carver)
            (tmp / "config.json").write_text(json.dumps(plan.output_config, indent=2, sort_keys=True) + "\n")
            copy_files(ckpt.aux_files(), tmp)
            (tmp / "README.md").write_text(render_card(plan, ckpt, None, {"statistics": stats.describe()}).replace(
                "with the **uniform** expert initialisation", "with a carved shared expert (CMoE-style)", 1))
            record = _record(plan, ckpt, stats, carver, tmp, hashes, time.perf_counter() - start)
            (tmp / "ckptforge.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    finally:
        ckpt.close()
    return record


class _Carver:
    """Makes the carved expert, shared-expert and router tensors of each MoE layer."""

    def __init__(self, plan: Plan, ckpt: Any, family: Any, stats: Any, shared: int, top_k: int):
        self.plan, self.ckpt, self.family, self.stats = plan, ckpt, family, stats
        self.shared, self.top_k = shared, top_k
        self.canonical = family.canonical_names(list(ckpt.tensors))
        self._layer: int | None = None
        self.units: dict[int, dict[str, Any]] = {}

    def __call__(self, t: PlannedTensor) -> Iterator[torch.Tensor] | None:
        role = shared_role(t.name) if t.op == TensorOp.ZEROS else None
        if t.op == TensorOp.EXPERT:
            ffn, units = self._load(t.layer)
            return iter([self._slice(ffn, units["experts"][t.expert], t.role, float(self.top_k)).to(t.dtype)])
        if role in ("gate", "up", "down"):
            ffn, units = self._load(t.layer)
            return iter([self._slice(ffn, units["shared"], role, 2.0).to(t.dtype)])
        if t.op == TensorOp.ROUTER and self.plan.options.router_init == "normal":
            g = generator_for(self.plan.options.seed, t.layer, "router")
            return iter([(torch.randn(t.shape, generator=g) * self.plan.options.router_init_std).to(t.dtype)])
        return None  # zeros (router with --router-init zeros, shared gate), copies

    @staticmethod
    def _slice(ffn: dict[str, torch.Tensor], units: torch.Tensor, role: str, scale: float) -> torch.Tensor:
        w = ffn[role][:, units] if role == "down" else ffn[role][units]
        return w.float() * scale if role == "down" else w

    def _load(self, layer: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        if self._layer != layer:
            names = self.family.ffn_names(self.plan.source_prefix, layer)
            self._ffn = {role: self.ckpt.read(self.canonical[n]) for role, n in names.items()}
            self.units[layer] = carve_units(self.stats.layer(layer), self.shared, self.plan.options.num_experts)
            self._layer = layer
        return self._ffn, self.units[layer]


def carve_units(stats: Any, shared: int, num_experts: int) -> dict[str, Any]:
    """Shared units (the ``shared`` most often active) and E balanced co-activation parts of the rest."""
    order = stats.count.argsort(descending=True, stable=True)
    shared_units, rest = order[:shared].sort().values, order[shared:].sort().values
    co = stats.coactivation[rest][:, rest]
    parts = partition_units(co, num_experts)
    return {"shared": shared_units, "experts": [rest[p].sort().values for p in parts]}


def _record(plan: Plan, ckpt: Any, stats: Any, carver: _Carver, out_dir: Path, hashes: dict[str, str],
            seconds: float) -> dict[str, Any]:
    files = {p.name: hashes.get(p.name) or sha256_file(p)
             for p in sorted(out_dir.iterdir()) if p.is_file() and p.name != "ckptforge.json"}
    return {
        "ckptforge_version": __version__,
        "source": {"ref": ckpt.source, "revision": ckpt.revision, "files": ckpt.file_hashes()},
        "options": {**plan.options.to_dict(), "strategy": "carved-shared"},
        "plan": {**{k: v for k, v in plan.to_dict().items() if k not in ("moe_tensors", "free_bytes")},
                 "strategy": "carved-shared", "shared_expert_width": carver.shared},
        "calibration": {"statistics": stats.describe()},
        "carve": {str(layer): {"shared_units": u["shared"].tolist()} for layer, u in sorted(carver.units.items())},
        "verify": None, "files": files, "seconds": round(seconds, 3),
    }


__all__ = ["carve_shared_expert", "carve_units", "carve_widths"]
