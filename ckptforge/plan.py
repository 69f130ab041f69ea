"""Plan: everything decided before a tensor is read. Pure data; ``--dry-run`` prints it.

    >>> ckpt = open_checkpoint("examples/tiny-vit-mnist")            # doctest: +SKIP
    >>> plan = build_plan(ckpt, UpcycleOptions(num_experts=4))        # doctest: +SKIP
    >>> plan.moe_layers, plan.params_active < plan.params_total        # doctest: +SKIP
    ([1, 3], True)
"""

from __future__ import annotations

import dataclasses

import math
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptforge.calibration_needs import missing_calibration_message, needed_stats
from ckptforge.consistency import bound_problems, weight_problems
from ckptforge.config import DTYPES, ROUTER_SETTINGS, UpcycleOptions, parse_layers, router_problems
from ckptforge.errors import PlanError, UsageError
from ckptforge.families import Dims, Family, MoELayout, OutputFormat, detect_family
from ckptforge.families.base import ROLE_SHAPES
from ckptforge.io.paths import check_free_disk
from ckptforge.io.source import DenseCheckpoint, dtype_itemsize, torch_dtype
from ckptforge.moe.layout import MoETensorLayout, active_expert_params, moe_tensor_layout
from ckptforge.strategies import STRATEGIES

if TYPE_CHECKING:  # the plan names dtypes; torch loads only when a tensor is made
    import torch

_LAYER_OF = re.compile(r"layers?\.(\d+)\.")
_HEADER_ALLOWANCE = 1 << 20  # per shard, for the safetensors JSON header


class TensorOp(str, Enum):
    """How the executor makes a planned tensor: one handler each (``ckptforge.execute._LayerMaker``)."""

    COPY = "copy"  #: the source tensor ``source`` as stored (cast to the planned dtype)
    EXPERT = "expert"  #: cut from the layer's dense FFN by the strategy's selection (see ``role``, ``group``)
    ROUTER = "router"  #: a router weight, as ``--router-init`` asks
    ZEROS = "zeros"  #: zeros (e.g. a zero shared expert that keeps the dense function)
    INIT = "init"  #: a fresh MoE-block parameter, initialised as ``role`` names (``MoETensorLayout.extras``)


@dataclass(frozen=True)
class MoELayerPlan:
    """What the executor follows for one MoE layer: its block's tensor layout (expert groups and how
    many experts the strategy recycles) and ``down_scale``, the strategy's output scale folded into
    the expert down weights (1.0 when the output config stores it as ``moe_output_scale``)."""

    layout: MoETensorLayout
    down_scale: float = 1.0


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor and how to make it.

    ``op`` (:class:`TensorOp`): ``copy`` (from ``source``), ``expert`` (role of expert ``expert``, all
    experts stacked when ``expert`` is None, or the expert group ``group`` of a runtime block),
    ``router``, ``zeros`` or ``init``. ``dtype_name`` is the torch dtype's
    name (``float32``); :attr:`dtype` is the dtype itself (imports torch).
    """

    name: str
    shape: tuple[int, ...]
    dtype_name: str
    op: TensorOp
    source: str | None = None
    layer: int | None = None
    role: str | None = None
    expert: int | None = None
    group: str | None = None

    @property
    def dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype_name)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_itemsize(self.dtype_name)


@dataclass
class Plan:
    """What a conversion will do; built by :func:`build_plan`, followed by ``execute``."""

    source: str
    family: str
    output_format: OutputFormat
    dims: Dims
    moe_layers: list[int]
    options: UpcycleOptions
    expert_width: int
    source_prefix: str
    output_config: dict[str, Any]
    tensors: list[PlannedTensor]
    shards: list[list[int]]
    dropped: list[str] = field(default_factory=list)
    free_bytes: int | None = None
    teacher: dict[str, Any] | None = None  # issue 13: cross-size recycling
    #: MoE layer → its block layout and folded output scale (issue 12: the executor never recomputes them).
    moe: dict[int, MoELayerPlan] = field(default_factory=dict)

    @property
    def params_total(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def params_active(self) -> int:
        """Parameters one token uses: the dense parts, plus the share of the experts its router
        type gives it (k/E for top-k; see :data:`ckptforge.moe.layout.ROUTER_LAYOUTS`)."""
        o = self.options
        expert = sum(t.numel for t in self.tensors if t.op == TensorOp.EXPERT)
        return self.params_total - expert + active_expert_params(self.output_config.get("moe_router"), expert,
                                                                 o.num_experts, o.top_k)

    @property
    def bytes_to_write(self) -> int:
        return sum(t.nbytes for t in self.tensors) + _HEADER_ALLOWANCE * len(self.shards)

    def shard_names(self) -> list[str]:
        n = len(self.shards)
        if n == 1:
            return ["model.safetensors"]
        return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "family": self.family,
            "output_format": self.output_format.name,
            "architecture": (self.output_config.get("architectures") or [None])[0],
            "num_layers": self.dims.num_layers,
            "hidden_size": self.dims.hidden_size,
            "intermediate_size": self.dims.intermediate_size,
            "moe_layers": self.moe_layers,
            "num_experts": self.options.num_experts,
            "top_k": self.options.top_k,
            "expert_width": self.expert_width,
            "strategy": self.options.strategy,
            "strategy_params": self.options.strategy_params,
            "router": self.options.router,
            "router_init": self.options.router_init,
            "seed": self.options.seed,
            "params_total": self.params_total,
            "params_active": self.params_active,
            "tensors": len(self.tensors),
            "shards": self.shard_names(),
            "bytes_to_write": self.bytes_to_write,
            "free_bytes": self.free_bytes,
            "dropped_tensors": self.dropped,
            "teacher": self.teacher,
            "moe_tensors": [
                {"name": t.name, "shape": list(t.shape), "dtype": t.dtype_name}
                for t in self.tensors if t.op in ("expert", "router")
            ],
        }


def build_plan(ckpt: DenseCheckpoint, options: UpcycleOptions, out: Path | None = None, *,
               has_stats: bool = False, output_format: OutputFormat | None = None) -> Plan:
    """Validate ``options`` against ``ckpt`` (all problems at once) and lay out every output tensor.

    ``has_stats``: activation statistics are passed in directly (no ``options.calibration`` needed).
    ``output_format``: one the family offers, instead of the one it picks (issue 14: ``architecture``).
    """
    config = ckpt.config
    family = detect_family(config)
    _check_recipe_family(options, family.name)
    options = _resolved(options, has_stats)
    problems = options.problems() + family.check(config)
    dims = family.dims(config)
    if bounds := bound_problems(options.num_experts, options.top_k, options.router.get("universal_experts")):
        raise PlanError(problems + bounds)  # before anything is laid out per expert
    try:
        moe_layers = parse_layers(options.layers, dims.num_layers)
    except ValueError as exc:
        problems.append(str(exc))
        moe_layers = []
    canonical = family.canonical_names(list(ckpt.tensors))
    prefix = family.base_prefix(set(canonical))
    if prefix is None:
        problems.append(
            f"the tensors do not look like a {family.name} checkpoint (no "
            f"{' or '.join(p + family.anchor for p in family.base_prefixes)}); check the source"
        )
    strategy, expert_width, found = _strategy_check(options, dims)
    problems += found
    if not has_stats and not options.calibration and needed_stats(options):
        problems.append(missing_calibration_message(options))
    if prefix is not None:
        problems += _missing_ffn(family, prefix, moe_layers, canonical) or weight_problems(
            ckpt, family, prefix, dims, canonical)
    problems += _router_problems(family, options, dims, problems)
    teacher, found = _teacher_check(ckpt, options, family, dims, expert_width, moe_layers)
    problems += found
    if problems:
        raise PlanError(problems)

    fmt = output_format or family.output_format(config, moe_layers)
    layout = MoELayout(
        moe_layers=tuple(moe_layers), num_experts=options.num_experts, top_k=options.top_k,
        expert_width=expert_width, router=dict(options.router),
        output_scale=strategy.output_scale(options.strategy_params, options.num_experts, options.top_k,
                                           dims.intermediate_size),
        extra_config=family.extra_config(config, prefix, set(canonical)),
    )
    out_config = family.output_config(config, fmt, layout)
    moe = _moe_layer_plans(layout, dims.hidden_size, out_config)
    tensors, dropped = _lay_out(ckpt, family, fmt, dims, prefix, canonical, moe, options, out_config)
    plan = Plan(ckpt.source, family.name, fmt, dims, moe_layers, options, expert_width, prefix,
                out_config, tensors, _shard(tensors, options.shard_size), dropped,
                teacher=teacher.to_dict() if teacher else None, moe=moe)
    if out is not None:
        plan.free_bytes = check_free_disk(out, plan.bytes_to_write)
    return plan


def _moe_layer_plans(layout: MoELayout, hidden_size: int, out_config: dict[str, Any]) -> dict[int, MoELayerPlan]:
    """Each MoE layer's block layout and the output scale its down weights carry: folded in when the
    output config cannot store it (stock Mixtral / Qwen2-MoE have no ``moe_output_scale``)."""
    tensors = moe_tensor_layout(layout.router, hidden_size, layout.num_experts, layout.expert_width)
    down_scale = 1.0 if "moe_output_scale" in out_config else layout.output_scale
    return {layer: MoELayerPlan(tensors, down_scale) for layer in layout.moe_layers}


def _strategy_check(options: UpcycleOptions, dims: Dims) -> tuple[Any, int, list[str]]:
    """(the strategy or None, the expert width it gives, the problems with its parameters)."""
    strategy = STRATEGIES.get(options.strategy)
    if strategy is None:
        return None, dims.intermediate_size, [
            f"unknown strategy {options.strategy!r}; choose one of: {', '.join(STRATEGIES)}"]
    problems = strategy.validate(options.strategy_params, dims.intermediate_size, options.num_experts, options.top_k)
    return strategy, strategy.expert_width(options.strategy_params, dims.intermediate_size, options.num_experts), problems


def _teacher_check(ckpt: DenseCheckpoint, options: UpcycleOptions, family: Family, dims: Dims, expert_width: int,
                   moe_layers: list[int]) -> tuple[Any, list[str]]:
    """Cross-size recycling (issue 13): the teacher's record and its problems; (None, []) without one."""
    if not options.teacher:
        return None, []
    from ckptforge.cross_size import teacher_problems
    from ckptforge.io.source import open_checkpoint

    teacher_ckpt = open_checkpoint(options.teacher)
    try:
        return teacher_problems(teacher_ckpt, family, dims, options, expert_width, moe_layers, student=ckpt)
    finally:
        teacher_ckpt.close()


def _resolved(options: UpcycleOptions, has_stats: bool) -> UpcycleOptions:
    """``options`` with the strategy's data-dependent defaults filled in (e.g. importance without
    calibration data scores units from the weights); the plan carries the result."""
    strategy = STRATEGIES.get(options.strategy)
    if strategy is None:
        return options
    params = strategy.resolve_params(options.strategy_params, has_stats or bool(options.calibration))
    return options if params is options.strategy_params else dataclasses.replace(options, strategy_params=params)


def _check_recipe_family(options: UpcycleOptions, family: str) -> None:
    """A recipe written for one family refuses a checkpoint of another (before anything else)."""
    wanted = (options.recipe or {}).get("family")
    if wanted is not None and wanted != family:
        raise UsageError(
            f"recipe '{options.recipe['name']}' is for {wanted} checkpoints, but the source is a {family} "
            f"checkpoint; pick a {family} recipe from 'ckptforge recipes list'"
        )


def _router_problems(family: Family, options: UpcycleOptions, dims: Dims, found: list[str]) -> list[str]:
    kind = options.router.get("type", "topk")
    if kind in ROUTER_SETTINGS and kind not in family.routers:
        return [f"--router {kind} is not available for the {family.name} family: its output loads with the stock "
                f"transformers router ({', '.join(family.routers)}); drop --router or convert a ViT or BERT model"]
    return [p for p in router_problems(options.router, dims.hidden_size) if p not in found]


def _missing_ffn(family: Family, prefix: str, moe_layers: list[int], canonical: dict[str, str]) -> list[str]:
    missing = [
        name for layer in moe_layers for name in family.ffn_names(prefix, layer).values() if name not in canonical
    ]
    if not missing:
        return []
    return [f"FFN tensor {missing[0]} is missing from the checkpoint ({len(missing)} missing); the checkpoint is incomplete"]


def _lay_out(ckpt: DenseCheckpoint, family: Family, fmt: OutputFormat, dims: Dims, prefix: str,
             canonical: dict[str, str], moe: dict[int, MoELayerPlan], options: UpcycleOptions,
             out_config: dict[str, Any]) -> tuple[list[PlannedTensor], list[str]]:
    forced = DTYPES[options.dtype]
    ffn_of = {layer: family.ffn_names(prefix, layer) for layer in moe}
    moe_ffn = {name for names in ffn_of.values() for name in names.values()}
    tensors: list[PlannedTensor] = []
    for layer, block in moe.items():
        ffn_dtype = forced or ckpt.tensors[canonical[ffn_of[layer]["up"]]].dtype_name
        e, d = options.num_experts, dims.hidden_size
        if fmt.moe_module is not None:
            has_bias = {role: ffn_of[layer].get(role) in canonical for role in ("up_bias", "down_bias")}
            tensors += _runtime_block(fmt, layer, block.layout, ffn_dtype, has_bias)
            continue
        expert_width = block.layout.groups[0].width
        tensors.append(PlannedTensor(fmt.router.format(layer=layer), block.layout.router_shape, ffn_dtype,
                                     TensorOp.ROUTER, layer=layer))
        for name, role, expert in fmt.expert_names(layer, e):
            if role.endswith("bias") and ffn_of[layer].get(role) not in canonical:
                continue
            shape = ROLE_SHAPES[role](expert_width, d)
            shape = shape if expert is not None else (e, *shape)
            tensors.append(PlannedTensor(name, shape, ffn_dtype, TensorOp.EXPERT, layer=layer, role=role, expert=expert))
        for template, shape_of in fmt.zeros.items():
            tensors.append(PlannedTensor(template.format(layer=layer), shape_of(d), ffn_dtype, TensorOp.ZEROS,
                                         layer=layer))
    wanted = _expected_names(fmt, out_config)
    out_prefix = family.output_prefix(ckpt.config, out_config)
    used: set[str] = set()
    for canon, stored in canonical.items():
        if canon in moe_ffn:
            used.add(canon)
            continue
        name = out_prefix + canon[len(prefix):] if canon.startswith(prefix) else canon
        if wanted is not None and name not in wanted:
            continue
        info = ckpt.tensors[stored]
        tensors.append(PlannedTensor(name, info.shape, forced or info.dtype_name, TensorOp.COPY, source=stored))
        used.add(canon)
    planned = {t.name for t in tensors}
    if wanted is not None and (absent := sorted(wanted - planned)):
        raise PlanError([f"the source has no tensor for {absent[0]} ({len(absent)} missing); the checkpoint is incomplete"])
    tensors.sort(key=lambda t: (_layer_of(t.name), t.name))
    return tensors, sorted(set(canonical) - used)


def _runtime_block(fmt: OutputFormat, layer: int, layout: MoETensorLayout, dtype: str,
                   has_bias: dict[str, bool]) -> list[PlannedTensor]:
    """The tensors of one ckptforge runtime MoE block, as its router type lays them out (``layout``)."""
    module = fmt.moe_module.format(layer=layer)
    out = []
    if layout.router_shape is not None:
        out.append(PlannedTensor(module + "router.weight", layout.router_shape, dtype, TensorOp.ROUTER, layer=layer))
    for group in layout.groups:
        for template, role in fmt.experts.items():
            if role.endswith("bias") and not has_bias[role]:
                continue
            name = module + group.name + "." + template.rsplit(".", 1)[-1]
            shape = (group.count, *ROLE_SHAPES[role](group.width, group.in_dim))
            out.append(PlannedTensor(name, shape, dtype, TensorOp.EXPERT, layer=layer, role=role, group=group.name))
    for name, (shape, init) in layout.extras.items():
        out.append(PlannedTensor(module + name, shape, dtype, TensorOp.INIT, layer=layer, role=str(init)))
    return out


def _expected_names(fmt: OutputFormat, out_config: dict[str, Any]) -> set[str] | None:
    """For ckptforge's own formats: the exact tensor names the modeling class declares (from the
    config when the format knows them, else from the class built on the meta device)."""
    if fmt.remote_module is None:
        return None
    if fmt.state_names is not None:
        return fmt.state_names(out_config)
    from ckptforge.loading import state_names

    return state_names(out_config)


def _layer_of(name: str) -> int:
    m = _LAYER_OF.search(name)
    return int(m.group(1)) if m else (-1 if "embed" in name else 1 << 30)


def _shard(tensors: list[PlannedTensor], shard_size: int) -> list[list[int]]:
    shards: list[list[int]] = [[]]
    size = 0
    for i, t in enumerate(tensors):
        if shards[-1] and size + t.nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += t.nbytes
    return shards
