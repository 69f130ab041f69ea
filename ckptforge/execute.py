"""Follow a Plan: stream tensors from the dense checkpoint into the MoE checkpoint.

Memory stays bounded by one layer's dense FFN plus the tensor being written: each MoE layer's FFN
is read once, experts are materialised one at a time and written straight to the shard file.

    >>> result = upcycle("examples/tiny-vit-mnist", "out/moe", UpcycleOptions(num_experts=4))  # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ckptforge import __version__
from ckptforge.card import check_base_model, render_card
from ckptforge.config import UpcycleOptions
from ckptforge.cross_size_student import open_student
from ckptforge.errors import UsageError
from ckptforge.io.paths import check_output_file, local_paths
from ckptforge.io.source import DenseCheckpoint, open_checkpoint, sha256_file
from ckptforge.io.writer import AtomicOutput, TensorSpec, write_index, write_shard
from ckptforge.loading import copy_files, write_remote_code
from ckptforge.moe import moe_tensor_layout
from ckptforge.plan import Plan, PlannedTensor, build_plan
from ckptforge.strategies import STRATEGIES, DenseFFN, ExpertInit, LayerSelection

Progress = Callable[[int], None]


@dataclass
class UpcycleResult:
    """What a conversion wrote: the plan it followed, file hashes, and the verify report if run."""

    out: Path
    plan: Plan
    files: dict[str, str]
    seconds: float
    verify: Any = None
    provenance: dict[str, Any] = field(default_factory=dict)
    #: MoE layer → each expert's hidden-unit indices (what the strategy chose).
    expert_units: dict[int, list[torch.Tensor]] = field(default_factory=dict)


def upcycle(
    source: str | Path | DenseCheckpoint,
    out: str | Path,
    options: UpcycleOptions,
    *,
    force: bool = False,
    verify: bool = False,
    tol: float = 1e-5,
    stats: Any = None,
    progress: Progress | None = None,
    plan: Plan | None = None,
    base_model: str | None = None,
) -> UpcycleResult:
    """Convert ``source`` into an MoE checkpoint at ``out`` (atomic; nothing is written on a bad input).

    ``source`` may be an already opened checkpoint and ``plan`` the plan built for it with these
    options (what the command does, so that a source is resolved and planned once). ``base_model``
    names the card's ``base_model`` (default: the Hub repo the source was resolved from, if any).
    """
    start = time.perf_counter()
    out = Path(out)
    if base_model is not None:
        check_base_model(base_model)
    ckpt = source if isinstance(source, DenseCheckpoint) else open_student(str(source), options.teacher)  # issue 13
    if plan is None:
        plan = build_plan(ckpt, options, out, has_stats=stats is not None)
    options = plan.options  # with the defaults the plan resolved (e.g. a data-free importance score)
    if verify and options.teacher:  # issue 13: nothing to reproduce
        raise UsageError("--verify checks that the MoE reproduces its dense source, but with --teacher the experts "
                         "come from another model; drop --verify and measure it with 'ckptforge eval'")
    teacher = open_checkpoint(options.teacher) if options.teacher else None  # issue 13: cross-size
    reads = [*ckpt.read_paths(), *(teacher.read_paths() if teacher else []), *local_paths([options.calibration])]
    target = AtomicOutput(out, force, reads)
    target.check()
    if options.stats_cache:
        check_output_file("--stats-cache", options.stats_cache, reads, writes=[out])
    if stats is None:
        from ckptforge.calibration import statistics_for
        from ckptforge.families import FAMILIES

        stats = statistics_for(teacher or ckpt, options, plan.moe_layers, FAMILIES[plan.family].modality)
    selections: dict[int, LayerSelection] = {}
    with ThreadPoolExecutor(max_workers=1) as pool, target as tmp:
        source_hashes = pool.submit(ckpt.file_hashes)  # reads the source again; overlaps the writing
        shard_hashes = write_tensors(plan, ckpt, tmp, stats=stats, progress=progress, selections=selections,
                                     teacher=teacher)
        (tmp / "config.json").write_text(json.dumps(plan.output_config, indent=2, sort_keys=True) + "\n")
        if plan.output_format.remote_module:
            write_remote_code(plan.output_format.remote_module, tmp)
        copy_files(ckpt.aux_files(), tmp)
        report = None
        if verify:
            from ckptforge.verify import verify_model

            report = verify_model(tmp, against=ckpt, tol=tol, options=options.to_dict())
            report.moe_dir = str(out)
        calibration = _calibration_record(stats, selections)
        if teacher is not None:  # issue 13: the card names the teacher and its channels
            calibration = {**(calibration or {}), "teacher_channels": _channels(selections)}
        (tmp / "README.md").write_text(render_card(plan, ckpt, report, calibration, base_model))
        provenance = _provenance(plan, ckpt, source_hashes.result(), tmp, shard_hashes, report)
        provenance["calibration"] = calibration
        if teacher is not None:  # issue 13
            provenance["teacher"] = {**plan.teacher, "files": teacher.file_hashes(), "channels": _channels(selections)}
            teacher.close()
        (tmp / "ckptforge.json").write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    ckpt.close()
    return UpcycleResult(out, plan, provenance["files"], time.perf_counter() - start, report, provenance,
                         {layer: [e.units for e in sel.experts] for layer, sel in selections.items()})


def write_tensors(plan: Plan, ckpt: DenseCheckpoint, out_dir: Path, *, stats: Any = None,
                  progress: Progress | None = None, selections: dict[int, LayerSelection] | None = None,
                  pieces: Callable[[PlannedTensor], Iterator[torch.Tensor] | None] | None = None,
                  teacher: DenseCheckpoint | None = None) -> dict[str, str]:
    """Write every planned tensor into its shard; returns shard name → sha256.

    ``selections``, when given, is filled with each MoE layer's strategy answer. ``pieces``, when
    given, makes the tensors it answers for (not None) instead of the dense source (issue 14);
    ``teacher``: the experts are sliced from its FFNs (cross-size recycling, issue 13)."""
    layers = _LayerMaker(plan, ckpt, stats, selections if selections is not None else {}, teacher)
    make = layers.pieces if pieces is None else (lambda t: pieces(t) or layers.pieces(t))
    names = plan.shard_names()
    hashes: dict[str, str] = {}
    weight_map: dict[str, str] = {}
    for shard_name, indices in zip(names, plan.shards, strict=True):
        planned = [plan.tensors[i] for i in indices]
        specs = [TensorSpec(t.name, t.dtype, t.shape) for t in planned]
        chunks = (_counted(make(t), progress) for t in planned)
        hashes[shard_name] = write_shard(out_dir / shard_name, specs, chunks)
        weight_map.update({t.name: shard_name for t in planned})
    if len(names) > 1:
        write_index(out_dir / "model.safetensors.index.json", weight_map, sum(t.nbytes for t in plan.tensors))
    return hashes


def _counted(pieces: Iterator[torch.Tensor], progress: Progress | None) -> Iterator[torch.Tensor]:
    for piece in pieces:
        yield piece
        if progress is not None:
            progress(piece.numel() * piece.element_size())


def generator_for(seed: int, *keys: object) -> torch.Generator:
    """A torch.Generator seeded from ``seed`` and ``keys``: the same keys give the same stream."""
    digest = hashlib.sha256(repr((seed, *keys)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


class _LayerMaker:
    """Produces each planned tensor's data; reads a MoE layer's dense FFN once and caches it."""

    def __init__(self, plan: Plan, ckpt: DenseCheckpoint, stats: Any, selections: dict[int, LayerSelection],
                 teacher: DenseCheckpoint | None = None):
        from ckptforge.families import FAMILIES

        self.plan, self.ckpt, self.stats, self.selections = plan, ckpt, stats, selections
        self.family = FAMILIES[plan.family]
        self.canonical = self.family.canonical_names(list(ckpt.tensors))
        # issue 13: the FFNs the experts come from (a wider teacher's, on d_student of its channels)
        self.ffn_ckpt, self.ffn_canonical, self.ffn_prefix, self.channels = ckpt, self.canonical, plan.source_prefix, None
        if teacher is not None:
            from ckptforge.cross_size import choose_channels

            self.ffn_ckpt, self.ffn_canonical = teacher, self.family.canonical_names(list(teacher.tensors))
            self.ffn_prefix = self.family.base_prefix(set(self.ffn_canonical))
            self.channels = choose_channels(stats, plan.moe_layers, plan.dims.hidden_size)
            getattr(ckpt, "use_channels", lambda channels: None)(self.channels)  # a config-only student
        self.strategy = STRATEGIES[plan.options.strategy]
        self._layer: int | None = None
        self._ffn: DenseFFN | None = None
        self._selection: LayerSelection | None = None

    def pieces(self, t: PlannedTensor) -> Iterator[torch.Tensor]:
        opts = self.plan.options
        if t.op == "copy":
            yield self.ckpt.read(t.source)
        elif t.op == "zeros":
            yield torch.zeros(t.shape, dtype=t.dtype)
        elif t.op == "router":
            yield self._router(t)
        elif t.op == "init":
            yield initial_tensor(t.role, t.shape, generator_for(opts.seed, t.layer, t.name)).to(t.dtype)
        elif t.group is not None:
            yield from self._group_experts(t)
        else:
            ffn, sel = self._load(t.layer)
            experts = range(opts.num_experts) if t.expert is None else [t.expert]
            for e in experts:
                yield expert_tensor(ffn, sel, e, t.role, generator_for(opts.seed, t.layer, e, t.role),
                                    self._folded_scale())

    def _folded_scale(self) -> float:
        """The strategy's output scale, folded into the down weights when the output format's
        config cannot store it (stock Mixtral / Qwen2-MoE have no ``moe_output_scale``)."""
        if "moe_output_scale" in self.plan.output_config:
            return 1.0
        o = self.plan.options
        return self.strategy.output_scale(o.strategy_params, o.num_experts, o.top_k, self.plan.dims.intermediate_size)

    def _group_experts(self, t: PlannedTensor) -> Iterator[torch.Tensor]:
        """Expert tensors of a runtime block's expert group: recycled expert ``first + i``, narrowed
        to a uniform subset of its units (universal experts) or a channel block (MH-MoE)."""
        opts = self.plan.options
        layout = moe_tensor_layout(opts.router, self.plan.dims.hidden_size, opts.num_experts, self.plan.expert_width)
        group = next(g for g in layout.groups if g.name == t.group)
        ffn, sel = self._load(t.layer, layout.recycled_experts)
        for i in range(group.count):
            e = group.first + i
            init = sel.experts[e]
            if group.width < init.units.numel():
                keep = torch.linspace(0, init.units.numel() - 1, group.width).round().long()
                init = ExpertInit(init.units[keep], channels=init.channels)
            one = LayerSelection([init], sel.down_bias_scale, sel.noise_std)
            x = expert_tensor(ffn, one, 0, t.role, generator_for(opts.seed, t.layer, t.group, i, t.role))
            if group.channel_blocks > 1:
                x = channel_block(x, t.role, i % group.channel_blocks, group.in_dim)
            yield x

    def _router(self, t: PlannedTensor) -> torch.Tensor:
        opts = self.plan.options
        if opts.router_init == "zeros":
            return torch.zeros(t.shape, dtype=t.dtype)
        if opts.router_init == "centroid":
            from ckptforge.calibration import centroid_router

            _, sel = self._load(t.layer)
            norm = opts.router_init_std * t.shape[1] ** 0.5  # the length a normal(std) row has
            return centroid_router([e.units for e in sel.experts], self.stats.layer(t.layer), norm).to(t.dtype)
        g = generator_for(opts.seed, t.layer, "router")
        return (torch.randn(t.shape, generator=g) * opts.router_init_std).to(t.dtype)

    def _load(self, layer: int, num_experts: int | None = None) -> tuple[DenseFFN, LayerSelection]:
        if self._layer != layer:
            self._ffn = self._selection = None
            _trim_heap()
            names = self.family.ffn_names(self.ffn_prefix, layer)
            weights = {role: self.ffn_ckpt.read(self.ffn_canonical[n]) for role, n in names.items()
                       if n in self.ffn_canonical}
            self._ffn = DenseFFN(weights)
            opts = self.plan.options
            layer_stats = self.stats.layer(layer) if self.stats is not None else None
            recycled = num_experts or moe_tensor_layout(
                opts.router, self.plan.dims.hidden_size, opts.num_experts, self.plan.expert_width).recycled_experts
            # recycled may exceed E (sphero's universal experts are cut from further recycled
            # experts): the width stays the planned one, not d_ff / recycled
            params = {**opts.strategy_params, "expert_width": self.plan.expert_width}
            self._selection = self.strategy.select(
                self._ffn, recycled, params, layer_stats, generator_for(opts.seed, layer, "select")
            )
            for expert in self._selection.experts if self.channels is not None else []:  # issue 13
                expert.channels = self.channels
            self._layer = layer
            self.selections[layer] = self._selection
        return self._ffn, self._selection


def _trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc's ``malloc_trim``; a no-op elsewhere).

    glibc keeps freed blocks of tens of MB in its heaps once its mmap threshold has grown, and the
    reading, hashing and staging threads fragment them: without this, peak RSS of a conversion grew
    with the number of layers (1012 MiB at 22, 1342 MiB at 33 TinyLlama-shape layers); trimmed
    once per MoE layer it stays flat.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _find_malloc_trim() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)  # absent with musl
    except OSError:
        return None


_MALLOC_TRIM = _find_malloc_trim()


def expert_tensor(ffn: DenseFFN, sel: LayerSelection, expert: int, role: str, g: torch.Generator,
                  down_scale: float = 1.0) -> torch.Tensor:
    """Expert ``expert``'s tensor of ``role``: rows (gate/up/up_bias) or columns (down) of its units,
    re-drawn units replaced from N(mean, std) of the dense matrix, Gaussian noise added; ``down`` and
    ``down_bias`` multiplied by ``down_scale`` (an output scale folded into the weights)."""
    t = _expert_tensor(ffn, sel, expert, role, g)
    if down_scale != 1.0 and role.startswith("down"):
        t = (t.float() * down_scale).to(t.dtype)
    return t


def _expert_tensor(ffn: DenseFFN, sel: LayerSelection, expert: int, role: str, g: torch.Generator) -> torch.Tensor:
    from ckptforge.cross_size import slice_channels

    init = sel.experts[expert]
    w = slice_channels(ffn.weights[role], role, init.channels)  # issue 13: a teacher's channels
    if role == "down_bias":
        return w * sel.down_bias_scale if sel.down_bias_scale != 1.0 else w
    full = init.units.numel() == w.shape[-1 if role == "down" else 0] and bool(
        (init.units == torch.arange(init.units.numel())).all()
    )
    if full:
        t = w
    else:
        t = w[:, init.units] if role == "down" else w[init.units]
    if init.redraw is not None and init.redraw.numel():
        t = t.clone()
        ref = w.float()
        shape = (t.shape[0], init.redraw.numel()) if role == "down" else (init.redraw.numel(), *t.shape[1:])
        fresh = (torch.randn(shape, generator=g) * ref.std() + ref.mean()).to(t.dtype)
        if role == "down":
            t[:, init.redraw] = fresh
        else:
            t[init.redraw] = fresh
    if sel.noise_std > 0 and not role.endswith("bias"):
        t = (t.float() + torch.randn(t.shape, generator=g) * sel.noise_std).to(t.dtype)
    return t


def _channels(selections: dict[int, LayerSelection]) -> list[int] | None:
    """The teacher channels the experts keep (one set for every layer), as a list."""
    first = next((sel.experts[0].channels for sel in selections.values() if sel.experts), None)
    return first.tolist() if first is not None else None


def _calibration_record(stats: Any, selections: dict[int, LayerSelection]) -> dict[str, Any] | None:
    """Calibration source, sample count, statistics summary and each layer's selection summary."""
    record: dict[str, Any] = {}
    if stats is not None and hasattr(stats, "describe"):
        record["statistics"] = stats.describe()
    if any(sel.summary for sel in selections.values()):
        record["selection"] = {str(layer): sel.summary for layer, sel in sorted(selections.items())}
    return record or None


def initial_tensor(init: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """A fresh tensor for an MoE block's own parameter: normal, zeros, ones, identity, orthogonal or a constant.

        >>> initial_tensor("identity", (2, 2), torch.Generator()).tolist()
        [[1.0, 0.0], [0.0, 1.0]]
    """
    if init == "zeros":
        return torch.zeros(shape)
    if init == "ones":
        return torch.ones(shape)
    if init == "identity":
        return torch.eye(*shape)
    if init == "normal":
        return torch.randn(shape, generator=g) * 0.02
    if init == "orthogonal":
        q, r = torch.linalg.qr(torch.randn(max(shape), min(shape), generator=g))
        q = q * torch.sign(torch.diagonal(r))
        return q if shape[0] >= shape[1] else q.T
    return torch.full(shape, float(init))


def channel_block(t: torch.Tensor, role: str, block: int, width: int) -> torch.Tensor:
    """Keep channels ``block·width … (block+1)·width`` of the model dimension of an expert tensor."""
    part = slice(block * width, (block + 1) * width)
    if role in ("up", "gate"):
        return t[:, part]
    if role == "down":
        return t[part]
    return t[part] if role == "down_bias" else t


def _provenance(plan: Plan, ckpt: DenseCheckpoint, source_hashes: dict[str, str], out_dir: Path,
                shard_hashes: dict[str, str], report: Any) -> dict[str, Any]:
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
