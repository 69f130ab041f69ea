"""``eval``: held-out accuracy (classifiers) or loss (LMs) of a dense or MoE checkpoint, and for
top-k routers the capacity sweep of V-MoE: the metric against the FLOPs actually spent per example
at capacity factors C (Batch Prioritized Routing on and off).

The data goes through the same reader as ``finetune`` (:func:`ckptforge.datasets.load_task_data`)
and the loss through the same per-task step (:data:`ckptforge.training.STEP_FNS`). FLOPs come from
two counters: every expert block counts the tokens its experts processed
(:attr:`ckptforge.moe.StackedExperts.dispatched`), and ``torch.utils.flop_counter`` counts every
matmul of the forward pass.

    >>> report = evaluate("out/tiny-vit-moe-ft", EvalOptions(data="examples/mnist-samples",
    ...                   capacity_factors=[0.5, 1.0]))                    # doctest: +SKIP
    >>> [(r.capacity_factor, r.bpr) for r in report.rows]                  # doctest: +SKIP
    [(None, None), (0.5, True), (0.5, False), (1.0, True), (1.0, False)]
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ckptforge.version import __version__
from ckptforge.calibration import dense_weights_path
from ckptforge.config import ROUTER_SETTINGS
from ckptforge.datasets import TASKS, TaskData, load_task_data, task_for
from ckptforge.errors import PlanError, UsageError
from ckptforge.families import format_of
from ckptforge.io.source import open_checkpoint
from ckptforge.loading import load_model
from ckptforge.moe import StackedExperts, TopKRouter
from ckptforge.training import STEP_FNS

DEVICES = ("auto", "cpu", "cuda")
#: Router types whose settings take both a capacity factor and BPR: the token-choice top-k routers.
CAPACITY_ROUTERS = tuple(kind for kind, keys in ROUTER_SETTINGS.items() if {"capacity_factor", "bpr"} <= set(keys))


@dataclass
class EvalOptions:
    """Everything one ``eval`` call uses; recorded in its JSON.

    ``capacity_factors``: the sweep (None: evaluate the model as saved); ``bpr``: None sweeps both
    settings; ``held_out``: only the seeded share ``finetune --seed`` held out of DATA.
    """

    data: str
    capacity_factors: list[float] | None = None
    bpr: bool | None = None
    batch_size: int = 32
    seq_len: int = 64
    held_out: bool = False
    seed: int = 0
    device: str = "auto"

    def problems(self) -> list[str]:
        """Problems that need no model or data to find."""
        out = []
        if self.batch_size < 1:
            out.append(f"--batch-size {self.batch_size} must be at least 1")
        if self.seq_len < 2:
            out.append(f"--seq-len {self.seq_len} must be at least 2")
        if self.device not in DEVICES:
            out.append(f"--device {self.device!r} is not one of {', '.join(DEVICES)}")
        bad = [c for c in self.capacity_factors or [] if not (math.isfinite(c) and c > 0)]
        if bad:
            out.append(f"--capacity-factor {bad[0]:g} must be a positive number, e.g. 0.25,0.5,1,2")
        if self.bpr is not None and self.capacity_factors is None:
            out.append("--bpr/--no-bpr only changes which tokens a capacity drops; add --capacity-factor, e.g. 0.5,1")
        return out


@dataclass
class EvalRow:
    """One evaluation: capacity factor (None: no capacity) and BPR (None: does not apply), the
    metric, and the compute spent per example."""

    capacity_factor: float | None
    bpr: bool | None
    loss: float
    accuracy: float
    examples: int
    flops_per_example: float
    expert_flops_per_example: float | None
    kept_assignments: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EvalReport:
    """The rows of one ``eval``, what was evaluated and how."""

    model: str
    task: str
    metric: str
    higher_is_better: bool
    router: str | None
    data: dict[str, Any]
    options: dict[str, Any]
    rows: list[EvalRow] = field(default_factory=list)
    plot: str | None = None

    def value(self, row: EvalRow) -> float:
        """The headline metric of ``row`` (accuracy for classifiers, loss for LMs)."""
        return row.accuracy if self.higher_is_better else row.loss

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rows"] = [r.to_dict() for r in self.rows]
        d["ckptforge_version"] = __version__
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalReport:
        """The report back from ``to_dict`` (``eval --json``), e.g. to plot several seeds together."""
        fields = {k: v for k, v in d.items() if k in cls.__dataclass_fields__ and k != "rows"}
        return cls(**fields, rows=[EvalRow(**r) for r in d["rows"]])


def parse_capacity_factors(text: str) -> list[float]:
    """'0.25,0.5,1,2' → [0.25, 0.5, 1.0, 2.0]; anything else raises UsageError.

        >>> parse_capacity_factors("0.25, 1,2")
        [0.25, 1.0, 2.0]
    """
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--capacity-factor {text!r} is not a comma-separated list of numbers; "
                         "write e.g. 0.25,0.5,1,2") from None
    if not values:
        raise UsageError("--capacity-factor is empty; write e.g. 0.25,0.5,1,2")
    return values


def evaluate(model_ref: str | Path, options: EvalOptions) -> EvalReport:
    """Evaluate ``model_ref`` (an MoE output or a dense source) on ``options.data``; with
    ``options.capacity_factors`` one row per capacity factor and BPR setting after a no-capacity row."""
    if problems := options.problems():
        raise PlanError(problems)
    ckpt = open_checkpoint(str(model_ref))
    config, root = ckpt.config, ckpt.root
    task = _task(config)
    weights = dense_weights_path(ckpt)
    ckpt.close()
    model = load_model(weights, config)
    routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
    if options.capacity_factors is not None and not routers:
        raise UsageError(_no_capacity_router(config, model_ref))
    data = _held_out_data(options, config, root)
    _match_labels(data, model.config)
    device = _device(options.device)
    model.to(device)
    report = EvalReport(str(model_ref), task.name, "accuracy" if task.classifies else "loss", task.classifies,
                        _router_name(config), data.to_dict(), asdict(options))
    if options.capacity_factors is None:
        report.rows.append(_run(model, data, options, device, None, None, keep_saved=True))
        return report
    report.rows.append(_run(model, data, options, device, None, None))
    settings = [options.bpr] if options.bpr is not None else [True, False]
    for capacity in options.capacity_factors:
        for bpr in settings:
            report.rows.append(_run(model, data, options, device, capacity, bpr))
    return report


def _task(config: dict[str, Any]) -> Any:
    try:
        return task_for(config)
    except UsageError:
        heads = ", ".join(t.arch_suffix for t in TASKS.values())
        raise UsageError(f"eval needs a model with a head ({heads}); architectures="
                         f"{config.get('architectures')} has none") from None


def _router_name(config: dict[str, Any]) -> str | None:
    if "moe_router" in config:
        return config["moe_router"].get("type", "topk")
    fmt = format_of(config)  # a stock MoE format (Mixtral, Qwen-MoE): transformers' own router
    return fmt.name if fmt is not None else None


def _no_capacity_router(config: dict[str, Any], model_ref: Any) -> str:
    router = _router_name(config)
    what = (f"its router is {router!r}" if router in ROUTER_SETTINGS else
            f"it is a {config.get('model_type')} model with transformers' own router, which has no capacity"
            if router else f"it is a dense {config.get('model_type')} model with no router")
    return (f"--capacity-factor needs a top-k token-choice router with capacity, and {model_ref} has none: {what}; "
            f"routers that accept it: {', '.join(CAPACITY_ROUTERS)} (ViT/BERT outputs of "
            f"ckptforge upcycle --router {CAPACITY_ROUTERS[0]}); drop --capacity-factor to evaluate it as saved")


def _held_out_data(options: EvalOptions, config: dict[str, Any], root: Path) -> TaskData:
    """All of DATA, or (``held_out``) the seeded 10% ``finetune --seed`` evaluates on."""
    fraction = {} if options.held_out else {"eval_fraction": 1.0}
    return load_task_data(options.data, config, root, seq_len=options.seq_len, seed=options.seed, **fraction)


def _match_labels(data: TaskData, config: Any) -> None:
    """Give the eval labels the model's label ids: by name when the model names every class of
    DATA, else by order when the counts agree; otherwise the metric would mean nothing."""
    if not data.class_names:
        return
    names = {str(name): int(i) for i, name in (getattr(config, "id2label", None) or {}).items()}
    labels = data.eval.tensors[-1]
    if all(c in names for c in data.class_names):
        ids = torch.tensor([names[c] for c in data.class_names])
        data.eval.tensors = (*data.eval.tensors[:-1], ids[labels])
    elif len(data.class_names) != config.num_labels:
        shown = ", ".join(data.class_names[:6]) + (", …" if len(data.class_names) > 6 else "")
        raise UsageError(f"{data.description} has {len(data.class_names)} classes ({shown}), the model "
                         f"{config.num_labels} labels; evaluate on data with the model's classes, or finetune on it first")


def _device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible to torch; use --device cpu or --device auto")
    return torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")


def _grouped_mm_flops(a_shape: torch.Size, b_shape: torch.Size, *args: object, **kwargs: object) -> int:
    """FLOPs of a grouped GEMM with 2-D ``a`` (M, K) split into groups over 3-D ``b`` (G, K, N): 2·M·K·N.

    torch's FLOP counter has no formula for ``grouped_mm`` (the experts' fast path), so it is given here."""
    return 2 * a_shape[-2] * a_shape[-1] * b_shape[-1]


def _run(model: nn.Module, data: TaskData, options: EvalOptions, device: torch.device,
         capacity: float | None, bpr: bool | None, keep_saved: bool = False) -> EvalRow:
    """One pass over the eval set with every top-k router set to ``capacity`` / ``bpr``."""
    from torch.utils.flop_counter import FlopCounterMode

    routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
    if not keep_saved:
        for router in routers:
            router.capacity_factor, router.bpr = capacity, True if bpr is None else bpr
    experts = [m for m in model.modules() if isinstance(m, StackedExperts)]
    for block in experts:
        block.dispatched = 0
    for router in routers:
        router.requested = 0
    step = STEP_FNS[data.task.name]
    losses, correct = [], []
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten._grouped_mm: _grouped_mm_flops})
    with torch.no_grad(), counter:
        for batch in DataLoader(data.eval, batch_size=options.batch_size):
            batch = [t.to(device) for t in batch]
            batch_losses, batch_correct, _ = step(model, batch)
            losses.append(batch_losses.float().cpu())
            correct.append(batch_correct.float().cpu())
    n = len(data.eval)
    dispatched = sum(getattr(b, "dispatched", 0) for b in experts)
    wanted = sum(getattr(r, "requested", 0) for r in routers)
    expert_flops = sum(getattr(b, "dispatched", 0) * b.flops_per_token for b in experts) / n if experts else None
    return EvalRow(capacity, bpr, torch.cat(losses).mean().item(), torch.cat(correct).mean().item(), n,
                   counter.get_total_flops() / n, expert_flops, dispatched / wanted if wanted else None)


def plot_sweep(reports: list[EvalReport], path: str | Path, title: str = "") -> Path:
    """The metric against expert FLOPs per example, BPR (left) and no BPR (right) side by side.

    Several reports (e.g. finetune seeds) give each point's mean and a min–max bar; the dashed line
    (band: min–max) is the model without capacity.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    first = reports[0]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    base = [first.value(r.rows[0]) for r in reports] if first.rows[0].capacity_factor is None else []
    for ax, bpr in zip(axes, (True, False)):
        points = _sweep_points(reports, bpr)
        if base:
            ax.axhline(sum(base) / len(base), color="grey", ls="--", lw=1, label="no capacity")
            ax.axhspan(min(base), max(base), color="grey", alpha=0.15)
        if points:
            xs, ys, lo, hi, labels = zip(*points)
            ax.errorbar(xs, ys, yerr=[[y - a for y, a in zip(ys, lo)], [b - y for y, b in zip(ys, hi)]],
                        marker="o", capsize=3, color="C0" if bpr else "C3", label=f"C = {', '.join(labels)}")
            for x, y, label in zip(xs, ys, labels):
                ax.annotate(f"C={label}", (x, y), textcoords="offset points", xytext=(4, -12), fontsize=8)
        ax.set(xlabel="expert MFLOPs per example (tokens the experts processed)",
               title="Batch Prioritized Routing" if bpr else "no BPR (position order)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right" if first.higher_is_better else "upper right", fontsize=8)
    axes[0].set_ylabel(f"eval {first.metric}" + (f" (mean, min–max of {len(reports)})" if len(reports) > 1 else ""))
    fig.suptitle(title or f"capacity sweep: {first.model}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _sweep_points(reports: list[EvalReport], bpr: bool) -> list[tuple[float, float, float, float, str]]:
    """(mean expert MFLOPs, mean metric, min, max, C label) per capacity factor with this BPR setting."""
    out = []
    for i, row in enumerate(reports[0].rows):
        if row.bpr is not bpr or row.capacity_factor is None:
            continue
        rows = [r.rows[i] for r in reports]
        values = [reports[0].value(r) for r in rows]
        flops = [(r.expert_flops_per_example if r.expert_flops_per_example is not None else r.flops_per_example) / 1e6
                 for r in rows]
        out.append((sum(flops) / len(flops), sum(values) / len(values), min(values), max(values),
                    f"{row.capacity_factor:g}"))
    return out
