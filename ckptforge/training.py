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
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader

from ckptforge.datasets import TaskData
from ckptforge.errors import TrainingDiverged

#: (run name, step, total steps, train loss) → None; called on the main process only.
StepCallback = Callable[[str, int, int, float], None]


@dataclass
class TrainSettings:
    """The budget every run shares."""

    steps: int
    lr: float
    batch_size: int
    eval_every: int
    seed: int
    aux_weight: float
    weight_decay: float
    warmup_steps: int


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def train_run(name: str, source: str, model: nn.Module, data: TaskData, settings: TrainSettings,
              accelerator: Any, on_step: StepCallback | None = None) -> tuple[RunResult, nn.Module]:
    """Train ``model`` for ``settings.steps`` steps on ``data``, evaluating along the way; return the
    curves and the trained (unwrapped) model."""
    torch.manual_seed(settings.seed)
    order = torch.Generator().manual_seed(settings.seed)
    loader = DataLoader(data.train, batch_size=settings.batch_size, shuffle=True, generator=order,
                        drop_last=len(data.train) >= settings.batch_size)
    eval_loader = DataLoader(data.eval, batch_size=settings.batch_size)
    optimiser = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    warmup = max(settings.warmup_steps, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: min(1.0, (s + 1) / warmup))
    model, optimiser, loader, eval_loader, schedule = accelerator.prepare(
        model, optimiser, loader, eval_loader, schedule)
    run = RunResult(name, source, sum(p.numel() for p in model.parameters()), unit=data.task.unit)
    step_fn = STEP_FNS[data.task.name]
    run.eval.append(evaluate(model, eval_loader, step_fn, accelerator, 0))
    batches, examples, seconds = _forever(loader), 0, 0.0
    for step in range(1, settings.steps + 1):
        start = time.perf_counter()
        model.train()
        batch = next(batches)
        with accelerator.autocast():
            losses, _, aux = step_fn(model, batch)
            loss = losses.mean() + (settings.aux_weight * aux if aux is not None else 0.0)
        accelerator.backward(loss)
        optimiser.step()
        schedule.step()
        optimiser.zero_grad()
        seconds += time.perf_counter() - start
        examples += len(losses)
        record = {"step": step, "loss": accelerator.reduce(losses.detach().mean(), "mean").item()}
        if aux is not None:
            record["aux_loss"] = accelerator.reduce(aux.detach().float(), "mean").item()
        if not math.isfinite(record["loss"]):  # issue 11: stop a diverged run before anything is written
            raise TrainingDiverged(f"run '{name}': the training loss became {record['loss']} at step {step}; "
                                   f"lower --lr (now {settings.lr:g}); nothing was written")
        run.train.append(record)
        if on_step is not None and accelerator.is_main_process:
            on_step(name, step, settings.steps, record["loss"])
        if step % settings.eval_every == 0 or step == settings.steps:
            run.eval.append(evaluate(model, eval_loader, step_fn, accelerator, step))
    _finish(run, accelerator, examples, seconds, data)
    return run, accelerator.unwrap_model(model)


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
    return token_losses.mean(-1), (logits.argmax(-1) == targets).float().mean(-1), _aux(out)


def _config(model: nn.Module) -> Any:
    return getattr(getattr(model, "module", model), "config", None)


#: Task name → (model, batch) → (per-example loss, per-example accuracy, router aux loss or None).
STEP_FNS: dict[str, Callable] = {
    "image-classification": _image_step,
    "sequence-classification": _sequence_step,
    "causal-lm": _causal_step,
}
