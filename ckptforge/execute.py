"""Follow a Plan: stream tensors from the dense checkpoint into the MoE checkpoint (orchestration only:
the tensor maths is in :mod:`ckptforge.expert_tensors`, the records in :mod:`ckptforge.provenance`,
heap trimming in :mod:`ckptforge.memory`).

Memory stays bounded by one layer's dense FFN plus the tensor being written, per shard being
written (three at once, :data:`PARALLEL_SHARDS`): each MoE layer's FFN is read once per shard that
holds it, experts are materialised one at a time and written straight to the shard file.

    >>> result = upcycle("examples/tiny-vit-mnist", "out/moe", UpcycleOptions(num_experts=4))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ckptforge.card import check_base_model, render_card
from ckptforge.config import UpcycleOptions
from ckptforge.expert_tensors import channel_block, expert_tensor, generator_for, initial_tensor
from ckptforge.cross_size_student import open_student
from ckptforge.errors import UsageError
from ckptforge.io.paths import check_output_file, local_paths
from ckptforge.io.source import DenseCheckpoint, open_checkpoint
from ckptforge.io.writer import AtomicOutput, TensorSpec, write_index, write_shard
from ckptforge.loading import copy_files
from ckptforge.memory import trim_heap
from ckptforge.plan import Plan, PlannedTensor, TensorOp, build_plan
from ckptforge.provenance import calibration_record, provenance, teacher_channels
from ckptforge.remote_code import write_remote_code
from ckptforge.strategies import STRATEGIES, DenseFFN, ExpertInit, LayerSelection

#: Re-exported for callers that cut expert tensors themselves (multi-source conversion, tests).
__all__ = ["UpcycleResult", "expert_tensor", "generator_for", "upcycle", "write_tensors"]

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
    target = _output_target(out, force, ckpt, teacher, options)
    if stats is None:
        from ckptforge.calibration import statistics_for
        from ckptforge.families import FAMILIES

        stats = statistics_for(teacher or ckpt, options, plan.moe_layers, FAMILIES[plan.family].modality)
    selections: dict[int, LayerSelection] = {}
    with ThreadPoolExecutor(max_workers=1) as pool, target as tmp:
        source_hashes = pool.submit(ckpt.file_hashes)  # reads the source again; overlaps the writing
        shard_hashes = write_tensors(plan, ckpt, tmp, stats=stats, progress=progress, selections=selections,
                                     teacher=teacher)
        report = _write_model_files(plan, ckpt, tmp, out, verify, tol)
        record = _write_records(plan, ckpt, tmp, report, stats, selections, teacher, base_model,
                                source_hashes.result(), shard_hashes)
    ckpt.close()
    return UpcycleResult(out, plan, record["files"], time.perf_counter() - start, report, record,
                         {layer: [e.units for e in sel.experts] for layer, sel in selections.items()})


def _output_target(out: Path, force: bool, ckpt: DenseCheckpoint, teacher: DenseCheckpoint | None,
                   options: UpcycleOptions) -> AtomicOutput:
    """The atomic output directory, checked not to overwrite anything the conversion reads."""
    reads = [*ckpt.read_paths(), *(teacher.read_paths() if teacher else []), *local_paths([options.calibration])]
    target = AtomicOutput(out, force, reads=reads)
    target.check()
    if options.stats_cache:
        check_output_file("--stats-cache", options.stats_cache, reads, writes=[out])
    return target


def _write_model_files(plan: Plan, ckpt: DenseCheckpoint, tmp: Path, out: Path, verify: bool, tol: float) -> Any:
    """config.json, the remote code of ckptforge's own formats, the source's tokenizer / processor
    files; then the verify report when asked (run on the written files)."""
    (tmp / "config.json").write_text(json.dumps(plan.output_config, indent=2, sort_keys=True) + "\n")
    if plan.output_format.remote_module:
        write_remote_code(plan.output_format.remote_module, tmp)
    copy_files(ckpt.aux_files(), tmp)
    if not verify:
        return None
    from ckptforge.verify import verify_model

    report = verify_model(tmp, against=ckpt, tol=tol, options=plan.options.to_dict())
    report.moe_dir = str(out)
    return report


def _write_records(plan: Plan, ckpt: DenseCheckpoint, tmp: Path, report: Any, stats: Any,
                   selections: dict[int, LayerSelection], teacher: DenseCheckpoint | None, base_model: str | None,
                   source_hashes: dict[str, str], shard_hashes: dict[str, str]) -> dict[str, Any]:
    """README.md (the card) and ckptforge.json (the provenance, returned)."""
    calibration = calibration_record(stats, selections)
    if teacher is not None:  # issue 13: the card names the teacher and its channels
        calibration = {**(calibration or {}), "teacher_channels": teacher_channels(selections)}
    (tmp / "README.md").write_text(render_card(plan, ckpt, report, calibration, base_model))
    record = provenance(plan, ckpt, source_hashes, tmp, shard_hashes, report)
    record["calibration"] = calibration
    if teacher is not None:  # issue 13
        record["teacher"] = {**plan.teacher, "files": teacher.file_hashes(), "channels": teacher_channels(selections)}
        teacher.close()
    (tmp / "ckptforge.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


#: Shards written at once (issue 15): each shard's sha256 is one serial chain (~1.8 GB/s per core)
#: and each writes with its own requests in flight, so several shards keep the cores hashing and the
#: disk's queue fuller than one sequential writer does. Three, not two: with two, the last shard of
#: an odd count ran alone on one core (the 22-layer job's writing took 7.6–8.3 s with two, 6.9–7.6 s
#: with three, on this 2-core VM); each shard in flight holds one layer's FFN and 64 MiB of buffers.
PARALLEL_SHARDS = 3


def write_tensors(plan: Plan, ckpt: DenseCheckpoint, out_dir: Path, *, stats: Any = None,
                  progress: Progress | None = None, selections: dict[int, LayerSelection] | None = None,
                  pieces: Callable[[PlannedTensor], Iterator[torch.Tensor] | None] | None = None,
                  teacher: DenseCheckpoint | None = None) -> dict[str, str]:
    """Write every planned tensor into its shard; returns shard name → sha256.

    ``selections``, when given, is filled with each MoE layer's strategy answer. ``pieces``, when
    given, makes the tensors it answers for (not None) instead of the dense source (issue 14);
    ``teacher``: the experts are sliced from its FFNs (cross-size recycling, issue 13).

    Up to :data:`PARALLEL_SHARDS` shards are written at once, each by its own thread with its own
    :class:`_LayerMaker` (the makers are deterministic, so a layer split over two shards gets the
    same selection in both); with ``pieces`` (whose state is not known to be thread-safe) one at a time.
    """
    selections = selections if selections is not None else {}
    local, stop = threading.local(), threading.Event()

    def make(t: PlannedTensor) -> Iterator[torch.Tensor]:
        if not hasattr(local, "maker"):
            local.maker = _LayerMaker(plan, ckpt, stats, selections, teacher)
        return (pieces(t) if pieces is not None else None) or local.maker.pieces(t)

    def write(shard_name: str, indices: list[int]) -> str:
        planned = [plan.tensors[i] for i in indices]
        specs = [TensorSpec(t.name, t.dtype, t.shape) for t in planned]
        return write_shard(out_dir / shard_name, specs, (_counted(make(t), progress, stop) for t in planned))

    names = plan.shard_names()
    with ThreadPoolExecutor(max_workers=PARALLEL_SHARDS if pieces is None else 1) as pool:
        futures = [pool.submit(write, name, indices) for name, indices in zip(names, plan.shards, strict=True)]
        try:
            hashes = {name: future.result() for name, future in zip(names, futures)}
        except BaseException:  # an error or Ctrl-C: the other shards stop at their next piece
            stop.set()
            for future in futures:
                future.cancel()
            raise
    if len(names) > 1:
        weight_map = {plan.tensors[i].name: name for name, indices in zip(names, plan.shards) for i in indices}
        write_index(out_dir / "model.safetensors.index.json", weight_map, sum(t.nbytes for t in plan.tensors))
    return hashes


class _Stopped(Exception):
    """Another shard failed or the run was interrupted: this shard stops writing."""


def _counted(pieces: Iterator[torch.Tensor], progress: Progress | None,
             stop: threading.Event | None = None) -> Iterator[torch.Tensor]:
    for piece in pieces:
        if stop is not None and stop.is_set():
            raise _Stopped()
        yield piece
        if progress is not None:
            progress(piece.numel() * piece.element_size())


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
        """The data of ``t`` (one piece, or one per expert), made as its :class:`TensorOp` says."""
        return _MAKERS[t.op](self, t)

    def _copy(self, t: PlannedTensor) -> Iterator[torch.Tensor]:
        yield self.ckpt.read(t.source)

    def _zeros(self, t: PlannedTensor) -> Iterator[torch.Tensor]:
        yield torch.zeros(t.shape, dtype=t.dtype)

    def _init(self, t: PlannedTensor) -> Iterator[torch.Tensor]:
        yield initial_tensor(t.role, t.shape, generator_for(self.plan.options.seed, t.layer, t.name)).to(t.dtype)

    def _experts(self, t: PlannedTensor) -> Iterator[torch.Tensor]:
        """Expert tensors: one expert's, every expert's stacked (stock formats, the plan's folded
        output scale on the down weights) or a runtime block's expert group."""
        if t.group is not None:
            yield from self._group_experts(t)
            return
        opts = self.plan.options
        ffn, sel = self._load(t.layer)
        for e in range(opts.num_experts) if t.expert is None else [t.expert]:
            yield expert_tensor(ffn, sel, e, t.role, generator_for(opts.seed, t.layer, e, t.role),
                                self.plan.moe[t.layer].down_scale)

    def _group_experts(self, t: PlannedTensor) -> Iterator[torch.Tensor]:
        """Expert tensors of a runtime block's expert group: recycled expert ``first + i``, narrowed
        to a uniform subset of its units (universal experts) or a channel block (MH-MoE)."""
        opts = self.plan.options
        group = next(g for g in self.plan.moe[t.layer].layout.groups if g.name == t.group)
        ffn, sel = self._load(t.layer)
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

    def _router(self, t: PlannedTensor) -> Iterator[torch.Tensor]:
        yield self._router_weight(t)

    def _router_weight(self, t: PlannedTensor) -> torch.Tensor:
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

    def _load(self, layer: int) -> tuple[DenseFFN, LayerSelection]:
        if self._layer != layer:
            self._ffn = self._selection = None
            trim_heap()
            names = self.family.ffn_names(self.ffn_prefix, layer)
            weights = {role: self.ffn_ckpt.read(self.ffn_canonical[n]) for role, n in names.items()
                       if n in self.ffn_canonical}
            self._ffn = DenseFFN(weights)
            opts = self.plan.options
            layer_stats = self.stats.layer(layer) if self.stats is not None else None
            recycled = self.plan.moe[layer].layout.recycled_experts
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


#: Tensor operation → the :class:`_LayerMaker` method that makes it (one per :class:`TensorOp`).
_MAKERS: dict[TensorOp, Callable[[_LayerMaker, PlannedTensor], Iterator[torch.Tensor]]] = {
    TensorOp.COPY: _LayerMaker._copy, TensorOp.ZEROS: _LayerMaker._zeros, TensorOp.ROUTER: _LayerMaker._router,
    TensorOp.INIT: _LayerMaker._init, TensorOp.EXPERT: _LayerMaker._experts,
}
if set(_MAKERS) != set(TensorOp):
    raise ImportError(f"execute._MAKERS lacks {sorted(set(TensorOp) - set(_MAKERS))}")
