"""One seeded training run through accelerate: the loop, the per-task loss and the evaluation.

Every run of a ``finetune`` comparison goes through :func:`train_run` with the same data, data
order, batch size, steps and optimiser; only the model differs.

    >>> run, model = train_run("moe", model, data, settings, accelerator)       # doctest: +SKIP
    >>> run.eval[-1]["accuracy"]                                          # doctest: +SKIP
    0.93
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader

from ckptforge.checkpoints import load_checkpoint, save_checkpoint
from ckptforge.datasets import TaskData
from ckptforge.errors import TrainingDiverged, UsageError
from ckptforge.schedules import lr_factor

#: (run name, step, total steps, train loss, throughput in data units/s) → None; main process only.
StepCallback = Callable[[str, int, int, float, float], None]


@dataclass
class TrainSettings:
    """The budget every run shares."""

    steps: int
    lr: float
    batch_size: int
    eval_every: int
    seed: int
    #: None: the load-balancing weight the model stores (its router's ``aux_loss_weight`` or
    #: ``router_aux_loss_coef``); a number replaces it in every MoE block for this run.
    aux_weight: float | None
    weight_decay: float
    warmup_steps: int
    # issue 13: schedule, clipping, checkpoints
    schedule: str = "constant"
    max_grad_norm: float = 1.0
    checkpoint_every: int = 0
    checkpoint_dir: str | None = None
    resume_dir: str | None = None


@dataclass
class RunResult:
    """One run's curves: ``train`` (every step) and ``eval`` (step 0, every eval_every, the last)."""

    name: str
    source: str
    params: int
    train: list[dict[str, float]] = field(default_factory=list)
    eval: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0
    examples: int = 0
    throughput: float = 0.0
    unit: str = ""
    head_replaced: bool = False
    trainable: int = 0
    resumed_from: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def train_run(name: str, source: str, model: nn.Module, data: TaskData, settings: TrainSettings,
              accelerator: Any, on_step: StepCallback | None = None) -> tuple[RunResult, nn.Module]:
    """Train ``model`` for ``settings.steps`` steps on ``data``, evaluating along the way; return the
    curves and the trained (unwrapped) model. Only parameters with ``requires_grad`` train."""
    torch.manual_seed(settings.seed)
    if settings.aux_weight is not None:
        set_aux_weight(model, settings.aux_weight)
    order = torch.Generator().manual_seed(settings.seed)
    loader = DataLoader(data.train, batch_size=settings.batch_size, shuffle=True, generator=order,
                        drop_last=len(data.train) >= settings.batch_size)
    eval_loader = DataLoader(data.eval, batch_size=settings.batch_size)
    run = RunResult(name, source, sum(p.numel() for p in model.parameters()), unit=data.task.unit,
                    trainable=sum(p.numel() for p in model.parameters() if p.requires_grad))
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.lr,
                                  weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lr_factor(settings.schedule, settings.warmup_steps, settings.steps))
    resumed = _resume(run, model, optimiser, schedule, settings)
    model, optimiser, loader, eval_loader, schedule = accelerator.prepare(
        model, optimiser, loader, eval_loader, schedule)
    step_fn = STEP_FNS[data.task.name]
    if resumed is None:
        run.eval.append(evaluate(model, eval_loader, step_fn, accelerator, 0))
    batches = _forever(loader)
    for _ in range(run.resumed_from):  # replay the data order up to the checkpoint
        next(batches)
    if resumed is not None:
        torch.set_rng_state(resumed["rng"])
    loop = _Loop(run, model, optimiser, schedule, settings, accelerator, step_fn, data)
    for step in range(run.resumed_from + 1, settings.steps + 1):
        loop.step(step, next(batches))
        if on_step is not None and accelerator.is_main_process:
            on_step(name, step, settings.steps, run.train[-1]["loss"], loop.throughput())
        if step % settings.eval_every == 0 or step == settings.steps:
            run.eval.append(evaluate(model, eval_loader, step_fn, accelerator, step))
        if settings.checkpoint_every and (step % settings.checkpoint_every == 0 or step == settings.steps):
            _checkpoint(run, model, optimiser, schedule, settings, accelerator, step)
    _finish(run, accelerator, loop.examples, loop.seconds, data)
    return run, accelerator.unwrap_model(model)


def training_loss(model: nn.Module, batch: Any, step_fn: Callable | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(the loss a step minimises, per-example task losses, the weighted load-balancing term or None).

    The weight of the load-balancing loss has one owner: the model (each MoE block's
    ``aux_loss_weight``, or a stock model's ``router_aux_loss_coef``); it is added here as it is.

        >>> loss, losses, aux = training_loss(model, batch, "image-classification")   # doctest: +SKIP
    """
    step_fn = STEP_FNS[step_fn] if isinstance(step_fn, str) else step_fn
    losses, _, aux = step_fn(model, batch)
    return losses.mean() + (aux if aux is not None else 0.0), losses, aux


def set_aux_weight(model: nn.Module, weight: float) -> None:
    """Use ``weight`` for the load-balancing loss of every MoE block of ``model`` (``finetune --aux-weight``)."""
    for module in model.modules():
        if hasattr(module, "aux_loss_weight"):
            module.aux_loss_weight = float(weight)
    config = _config(model)
    if config is not None and hasattr(config, "router_aux_loss_coef"):
        config.router_aux_loss_coef = float(weight)


class _Loop:
    """One optimiser step at a time: forward, loss (+ weighted router aux loss), backward, clip, step."""

    def __init__(self, run: RunResult, model: nn.Module, optimiser: Any, schedule: Any, settings: TrainSettings,
                 accelerator: Any, step_fn: Callable, data: TaskData):
        self.run, self.model, self.optimiser, self.schedule = run, model, optimiser, schedule
        self.settings, self.accelerator, self.step_fn = settings, accelerator, step_fn
        self.per_example = data.seq_len if data.task.name == "causal-lm" else 1
        self.examples, self.seconds = 0, 0.0

    def step(self, step: int, batch: Any) -> None:
        start = time.perf_counter()
        self.model.train()
        with self.accelerator.autocast():
            loss, losses, aux = training_loss(self.model, batch, self.step_fn)
        self.accelerator.backward(loss)
        lr = self.schedule.get_last_lr()[0]
        norm = None
        if self.settings.max_grad_norm > 0:  # the norm before clipping
            norm = self.accelerator.clip_grad_norm_(
                [p for p in self.model.parameters() if p.requires_grad], self.settings.max_grad_norm)
        self.optimiser.step()
        self.schedule.step()
        self.optimiser.zero_grad()
        self.seconds += time.perf_counter() - start
        self.examples += len(losses)
        record = {"step": step, "loss": self.accelerator.reduce(losses.detach().mean(), "mean").item(), "lr": lr}
        if norm is not None:
            record["grad_norm"] = float(norm)
        if aux is not None:
            record["aux_loss"] = self.accelerator.reduce(aux.detach().float(), "mean").item()
        if not math.isfinite(record["loss"]):  # issue 11: stop a diverged run before anything is written
            raise TrainingDiverged(f"run '{self.run.name}': the training loss became {record['loss']} at step {step}; "
                                   f"lower --lr (now {self.settings.lr:g}); nothing was written")
        self.run.train.append(record)

    def throughput(self) -> float:
        """This process's data units (tokens, images, sequences) per second so far."""
        return self.examples * self.per_example / self.seconds if self.seconds else 0.0


def _resume(run: RunResult, model: nn.Module, optimiser: Any, schedule: Any,
            settings: TrainSettings) -> dict[str, Any] | None:
    """Load ``run``'s state from ``settings.resume_dir`` (weights, optimiser, schedule, curves)."""
    if settings.resume_dir is None:
        return None
    state = load_checkpoint(Path(settings.resume_dir), run.name, model)
    if state is None:
        return None
    if state["step"] > settings.steps:
        raise UsageError(f"--resume {settings.resume_dir}: the {run.name} run is already at step {state['step']}, "
                         f"past --steps {settings.steps}; pass --steps {state['step']} or more")
    optimiser.load_state_dict(state["optimiser"])
    schedule.load_state_dict(state["schedule"])
    run.train, run.eval, run.resumed_from = state["train"], state["eval"], state["step"]
    return state


def _checkpoint(run: RunResult, model: nn.Module, optimiser: Any, schedule: Any, settings: TrainSettings,
                accelerator: Any, step: int) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"step": step, "optimiser": optimiser.state_dict(), "schedule": schedule.state_dict(),
                 "rng": torch.get_rng_state(), "train": run.train, "eval": run.eval}
        save_checkpoint(Path(settings.checkpoint_dir), run.name, accelerator.unwrap_model(model), state)
    accelerator.wait_for_everyone()


def evaluate(model: nn.Module, loader: DataLoader, step_fn: Callable, accelerator: Any, step: int) -> dict[str, float]:
    """Mean eval loss (and accuracy) over every eval example, gathered across processes."""
    model.eval()
    losses, correct = [], []
    with torch.no_grad(), accelerator.autocast():
        for batch in loader:
            batch_losses, batch_correct, _ = step_fn(model, batch)
            gathered = accelerator.gather_for_metrics((batch_losses.float(), batch_correct.float()))
            losses.append(gathered[0])
            correct.append(gathered[1])
    return {"step": step, "loss": torch.cat(losses).mean().item(), "accuracy": torch.cat(correct).mean().item()}


def _finish(run: RunResult, accelerator: Any, examples: int, seconds: float, data: TaskData) -> None:
    total = accelerator.reduce(torch.tensor(examples, device=accelerator.device), "sum").item()
    per_example = data.seq_len if data.task.name == "causal-lm" else 1
    run.examples = int(total)
    run.train_seconds = round(seconds, 3)
    run.throughput = round(total * per_example / seconds, 2) if seconds else 0.0


def _forever(loader: DataLoader) -> Iterator[Any]:
    while True:
        yield from loader


def _aux(out: Any) -> torch.Tensor | None:
    aux = getattr(out, "aux_loss", None)
    return aux if isinstance(aux, torch.Tensor) else None


def _image_step(model: nn.Module, batch: list[torch.Tensor]):
    pixels, labels = batch
    out = model(pixel_values=pixels)
    losses = nn.functional.cross_entropy(out.logits.float(), labels, reduction="none")
    return losses, (out.logits.argmax(-1) == labels).float(), _aux(out)


def _sequence_step(model: nn.Module, batch: list[torch.Tensor]):
    ids, mask, labels = batch
    out = model(input_ids=ids, attention_mask=mask)
    losses = nn.functional.cross_entropy(out.logits.float(), labels, reduction="none")
    return losses, (out.logits.argmax(-1) == labels).float(), _aux(out)


def _causal_step(model: nn.Module, batch: list[torch.Tensor]):
    (blocks,) = batch
    inputs, targets = blocks[:, :-1], blocks[:, 1:]
    kwargs = {"output_router_logits": True} if hasattr(_config(model), "router_aux_loss_coef") else {}
    out = model(input_ids=inputs, use_cache=False, **kwargs)
    logits = out.logits.float()
    token_losses = nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    aux = _aux(out)  # stock transformers MoE models return it unweighted; their config holds the weight
    if aux is not None:
        aux = aux * _config(model).router_aux_loss_coef
    return token_losses.mean(-1), (logits.argmax(-1) == targets).float().mean(-1), aux


def _config(model: nn.Module) -> Any:
    return getattr(getattr(model, "module", model), "config", None)


#: Task name → (model, batch) → (per-example loss, per-example accuracy, weighted router aux loss or None).
STEP_FNS: dict[str, Callable] = {
    "image-classification": _image_step,
    "sequence-classification": _sequence_step,
    "causal-lm": _causal_step,
}
