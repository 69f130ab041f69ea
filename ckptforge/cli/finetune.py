"""``ckptforge finetune``: short recovery training of the MoE beside the dense baseline."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Iterator

import typer

from .options import ForceOpt, JsonOpt, QuietOpt, SeedOpt, emit_json, show_progress, stderr, stdout, rich_table

if TYPE_CHECKING:  # the library (and torch) load when the command runs, not for --help
    from ckptforge.finetune import FinetuneReport


def finetune(
    model_dir: Annotated[Path, typer.Argument(help="An upcycled MoE directory (ckptforge upcycle --out).")],
    data: Annotated[str, typer.Option("--data", help="Class folders, .txt/.jsonl file, saved dataset dir or Hub dataset id.")],
    steps: Annotated[int, typer.Option("--steps", help="Optimiser steps per run.")] = 200,
    compare: Annotated[str | None, typer.Option("--compare", help="Also train this dense source on the same budget.")] = None,
    scratch: Annotated[bool, typer.Option("--scratch", help="Also train the same MoE architecture from random init.")] = False,
    lr: Annotated[float, typer.Option("--lr", help="AdamW learning rate.")] = 1e-4,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Examples per step (per process).")] = 16,
    eval_every: Annotated[int, typer.Option("--eval-every", help="Evaluate every N steps (0: steps/10).")] = 0,
    eval_data: Annotated[str | None, typer.Option("--eval-data", help="Eval data (default: a seeded 10% of --data).")] = None,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per text example.")] = 64,
    aux_weight: Annotated[float | None, typer.Option("--aux-weight", help="Weight of the routers' load-balancing loss (default: the weight the MoE stores, e.g. upcycle --aux-loss-weight).")] = None,
    seed: SeedOpt = 0,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda.")] = "auto",
    precision: Annotated[str, typer.Option("--precision", help="auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16.")] = "auto",
    save: Annotated[Path | None, typer.Option("--save", help="Save the fine-tuned MoE here.")] = None,
    report: Annotated[Path | None, typer.Option("--report", help="Report directory (default MODEL_DIR/finetune).")] = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    # --- issue 13: what trains, LoRA, schedule, clipping, checkpoints ---
    train: Annotated[str, typer.Option("--train", help="Weights to train: all | router | experts (the rest stay frozen).")] = "all",
    lora: Annotated[bool, typer.Option("--lora", help="Train peft LoRA adapters on the experts; base weights frozen.")] = False,
    lora_rank: Annotated[int, typer.Option("--lora-rank", help="LoRA rank r (alpha = 2r).")] = 8,
    merge_lora: Annotated[bool, typer.Option("--merge-lora", help="Fold the LoRA adapters into the weights on --save.")] = False,
    schedule: Annotated[str, typer.Option("--schedule", help="Learning-rate schedule: constant | cosine | inverse-sqrt.")] = "constant",
    warmup_steps: Annotated[int, typer.Option("--warmup-steps", help="Linear warm-up steps before the schedule.")] = 0,
    max_grad_norm: Annotated[float, typer.Option("--max-grad-norm", help="Clip the gradient norm (0: no clipping).")] = 1.0,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", help="Write REPORT/checkpoint every N steps (0: never).")] = 0,
    resume: Annotated[Path | None, typer.Option("--resume", help="Continue from a --checkpoint-every directory.")] = None,
) -> None:
    """Train the MoE (and --compare dense, --scratch) for a few steps; write curves and a Recovery table."""
    from ckptforge.finetune import FinetuneOptions
    from ckptforge.finetune import finetune as run_finetune

    options = FinetuneOptions(
        data=data, steps=steps, compare=compare, scratch=scratch, lr=lr, batch_size=batch_size,
        eval_every=eval_every, eval_data=eval_data, seed=seed, device=device, precision=precision,
        seq_len=seq_len, aux_weight=aux_weight, save=str(save) if save else None,
        report=str(report) if report else None, force=force,
        train=train, lora=lora, lora_rank=lora_rank, merge_lora=merge_lora, schedule=schedule,  # issue 13
        warmup_steps=warmup_steps, max_grad_norm=max_grad_norm, checkpoint_every=checkpoint_every,
        resume=str(resume) if resume else None,
    )
    with _live(show_progress(quiet, as_json)) as on_step:
        result = run_finetune(model_dir, options, on_step=on_step)
    if not _is_main():
        return
    if as_json:
        emit_json(result.to_dict())
    elif not quiet:
        render_report(result)


def _is_main() -> bool:
    from accelerate.state import PartialState

    return PartialState().is_main_process


@contextmanager
def _live(enabled: bool) -> Iterator[Any]:
    """A rich progress bar per run on stderr showing the train loss and throughput; a no-op when disabled."""
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    tasks: dict[str, Any] = {}
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  "loss {task.fields[loss]:.4f}", "{task.fields[speed]:,.0f}/s", TimeRemainingColumn(),
                  console=stderr.get()) as bar:

        def on_step(run: str, step: int, total: int, loss: float, speed: float) -> None:
            if run not in tasks:
                tasks[run] = bar.add_task(f"train {run}", total=total, loss=float("nan"), speed=0.0)
            bar.update(tasks[run], completed=step, loss=loss, speed=speed)

        yield on_step


def render_report(report: FinetuneReport) -> None:
    rec = report.recovery
    metric = rec["metric"]
    table = rich_table("run", f"{metric} at 0", f"final {metric}", f"best {metric}", "throughput",
                       title=f"finetune {report.model_dir} ({report.device['name']}, {report.settings['steps']} steps)")
    for name, v in rec["runs"].items():
        table.add_row(name, f"{v['initial']:.4f}", f"{v['final']:.4f}", f"{v['best']:.4f}",
                      f"{v['throughput']:,.1f} {v['unit']}")
    stdout.print(table)
    if "dense" in rec["runs"]:
        steps = rec["moe_steps_to_dense"]
        stdout.print(f"MoE reached the dense final {metric} at step {steps}" if steps is not None
                     else f"MoE did not reach the dense final {metric} in {report.settings['steps']} steps")
    stdout.print(f"wrote {report.report_dir}/finetune.json, curves.png and the card's Recovery section"
                 + (f"; saved the model to {report.saved}" if report.saved else ""))
