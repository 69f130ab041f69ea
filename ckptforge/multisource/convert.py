"""Follow a multi-source plan: base tensors copied, expert e's FFN read from source e one tensor at
a time, router rows from the gates, the shared expert from its source(s); atomic output with the
card and ``ckptforge.json`` naming every expert's source and its sha256.

    >>> result = upcycle_multisource(load_moe_config("moe.yml"), "out/moe")     # doctest: +SKIP
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ckptforge.version import __version__
from ckptforge.card import render_card
from ckptforge.execute import generator_for, write_tensors
from ckptforge.io.source import DenseCheckpoint, sha256_file
from ckptforge.io.writer import AtomicOutput
from ckptforge.loading import copy_files
from ckptforge.plan import PlannedTensor, TensorOp

from .gates import Gates, compute_gates
from .plan import MultiSourcePlan, plan_multisource, shared_role
from .spec import ExpertSpec, MoESpec, prompts_hash


@dataclass
class MultiSourceResult:
    """What a multi-source conversion wrote, with the gate warnings (degenerate router rows)."""

    out: Path
    plan: MultiSourcePlan
    files: dict[str, str]
    seconds: float
    provenance: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def upcycle_multisource(spec: MoESpec, out: str | Path, *, layers: str = "all", seed: int = 0,
                        shard_size: int = 5 * 10**9, force: bool = False, prompts_in_card: bool = True,
                        progress: Callable[[int], None] | None = None,
                        recipe: dict[str, Any] | None = None) -> MultiSourceResult:
    """Build the MoE ``spec`` describes at ``out`` (nothing is written when a source or option is wrong);
    ``recipe`` is the recipe record it came from (see :func:`plan_multisource`)."""
    start = time.perf_counter()
    out = Path(out)
    ms = plan_multisource(spec, out, layers=layers, seed=seed, shard_size=shard_size, recipe=recipe)
    try:
        target = AtomicOutput(out, force, reads=[p for c in ms.sources.by_ref.values() for p in c.read_paths()])
        target.check()
        gates = compute_gates(spec, ms.sources.base, ms.plan.moe_layers, generator_for(seed, "gates"))
        with ThreadPoolExecutor(max_workers=1) as pool, target as tmp:
            hashes = pool.submit(lambda: {ref: c.file_hashes() for ref, c in ms.sources.by_ref.items()})
            shard_hashes = write_tensors(ms.plan, ms.sources.base, tmp, progress=progress,
                                         pieces=ExpertPieces(ms, gates, seed))
            (tmp / "config.json").write_text(json.dumps(ms.plan.output_config, indent=2, sort_keys=True) + "\n")
            copy_files(ms.sources.base.aux_files(), tmp)
            record = multisource_record(ms, gates, hashes.result(), prompts_in_card)
            (tmp / "README.md").write_text(_card(ms, record))
            provenance = _provenance(ms, record, tmp, shard_hashes)
            (tmp / "ckptforge.json").write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    finally:
        ms.sources.close()
    return MultiSourceResult(out, ms, provenance["files"], time.perf_counter() - start, provenance, gates.warnings)


class ExpertPieces:
    """Makes the tensors a multi-source output takes from elsewhere than the base (None: the base's)."""

    def __init__(self, ms: MultiSourcePlan, gates: Gates, seed: int):
        self.ms, self.gates, self.seed = ms, gates, seed
        self.family = ms.family
        self._canonical: dict[str, tuple[dict[str, str], str]] = {}

    def __call__(self, t: PlannedTensor) -> Iterator[torch.Tensor] | None:
        if t.op == TensorOp.EXPERT:
            return iter([self._ffn(self.ms.spec.experts[t.expert], t.layer, t.role, t.dtype, ("expert", t.expert))])
        if t.op == TensorOp.ROUTER:
            return iter([self.gates.experts[t.layer].to(t.dtype)])
        role = shared_role(t.name) if t.op == TensorOp.ZEROS and self.ms.spec.shared_experts else None
        if role == "shared_gate":
            rows = self.gates.shared[t.layer].float().mean(0, keepdim=True)
            return iter([rows.to(t.dtype)])
        if role is not None:
            parts = [self._ffn(e, t.layer, role, t.dtype, ("shared", i)) for i, e in enumerate(self.ms.spec.shared_experts)]
            return iter([torch.cat(parts, dim=1 if role == "down" else 0)])
        return None

    def _ffn(self, expert: ExpertSpec, layer: int, role: str, dtype: torch.dtype, key: tuple) -> torch.Tensor:
        """One FFN tensor of ``expert``'s source, with its noise and residual scale (mergekit semantics)."""
        ckpt = self.ms.sources[expert.source_model]
        canonical, prefix = self._names(expert.source_model, ckpt)
        w = ckpt.read(canonical[self.family.ffn_names(prefix, layer)[role]])
        if expert.noise_scale or (expert.residual_scale is not None and role == "down"):
            w = w.float()
            if expert.noise_scale:
                g = generator_for(self.seed, layer, *key, role, "noise")
                w = w + torch.randn(w.shape, generator=g) * expert.noise_scale
            if expert.residual_scale is not None and role == "down":
                w = w * expert.residual_scale
        return w.to(dtype)

    def _names(self, ref: str, ckpt: DenseCheckpoint) -> tuple[dict[str, str], str]:
        if ref not in self._canonical:
            canonical = self.family.canonical_names(list(ckpt.tensors))
            self._canonical[ref] = canonical, self.family.base_prefix(set(canonical)) or ""
        return self._canonical[ref]


def multisource_record(ms: MultiSourcePlan, gates: Gates, hashes: dict[str, dict[str, str]],
                       prompts: bool = True) -> dict[str, Any]:
    """What ckptforge.json and the card say about the experts: source, revision, file sha256s, prompts."""
    spec = ms.spec

    def entry(e: ExpertSpec) -> dict[str, Any]:
        ckpt = ms.sources[e.source_model]
        d: dict[str, Any] = {"source": e.source_model, "revision": ckpt.revision, "files": hashes[e.source_model]}
        for key in ("positive_prompts", "negative_prompts"):
            value = list(getattr(e, key))
            d[key] = value if prompts else {"count": len(value), "sha256": prompts_hash(value)}
        d.update({k: getattr(e, k) for k in ("noise_scale", "residual_scale") if getattr(e, k) is not None})
        return d

    return {
        "base_model": {"source": spec.base_model, "revision": ms.sources.base.revision, "files": hashes[spec.base_model]},
        "gate_mode": spec.gate_mode, "experts_per_token": spec.experts_per_token, "dtype": spec.dtype,
        "architecture": spec.architecture, "prompts_in_card": prompts,
        "experts": [entry(e) for e in spec.experts],
        "shared_experts": [entry(e) for e in spec.shared_experts],
        "router_condition_number": {str(k): round(v, 4) for k, v in sorted(gates.condition.items())},
        "warnings": gates.warnings,
    }


def _card(ms: MultiSourcePlan, record: dict[str, Any]) -> str:
    text = render_card(ms.plan, ms.sources.base, None, None).replace(
        "with the **copy-all** expert initialisation", "with each expert's FFN from its own source model", 1)
    rows = ["## Experts", "", f"Multi-source MoE: attention, norms, embeddings and head from `{ms.spec.base_model}`; "
            f"expert e's FFN from its source. Routers: gate mode **{ms.spec.gate_mode}**.", "",
            "| expert | source | weights sha256 | positive prompts | negative prompts |", "|---|---|---|---|---|"]
    for group, entries in (("", record["experts"]), ("shared ", record["shared_experts"])):
        for i, e in enumerate(entries):
            digest = ", ".join(f"{n}: `{h[:12]}`" for n, h in e["files"].items() if n != "config.json")
            rows.append(f"| {group}{i} | `{e['source']}` | {digest} | {_prompts(e['positive_prompts'])} | "
                        f"{_prompts(e['negative_prompts'])} |")
    rows += [""] + [f"> warning: {w}" for w in record["warnings"]]
    return text.replace("## Verification", "\n".join(rows) + "\n\n## Verification", 1)


def _prompts(value: Any) -> str:
    if isinstance(value, dict):
        return f"{value['count']} (sha256 `{value['sha256'][:12]}`)"
    return "; ".join(p.replace("|", "\\|").replace("\n", " ") for p in value) or "—"


def _provenance(ms: MultiSourcePlan, record: dict[str, Any], out_dir: Path, shard_hashes: dict[str, str]) -> dict:
    files = {p.name: shard_hashes.get(p.name) or sha256_file(p)
             for p in sorted(out_dir.iterdir()) if p.is_file() and p.name != "ckptforge.json"}
    plan = {k: v for k, v in ms.to_dict().items() if k not in ("moe_tensors", "free_bytes", "multisource", "recipe")}
    return {
        "ckptforge_version": __version__,
        "source": {"ref": ms.spec.base_model, "revision": ms.sources.base.revision,
                   "files": record["base_model"]["files"]},
        "options": {**ms.plan.options.to_dict(), "strategy": "multi-source", "recipe": ms.recipe},
        "plan": plan, "multisource": record, "verify": None, "files": files,
    }
