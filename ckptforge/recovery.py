"""The Recovery report of a ``finetune``: the summary table, ``finetune.json``, ``curves.png`` and
the "Recovery" section of the model card.

    >>> summarise([], TASKS["causal-lm"])["metric"]
    'eval loss'
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ckptforge.datasets import TASKS, Task  # noqa: F401  (TASKS: used by the doctest)
from ckptforge.training import RunResult

_SECTION = re.compile(r"\n## Recovery\n.*?(?=\n## |\Z)", re.S)


def summarise(runs: list[RunResult], task: Task) -> dict[str, Any]:
    """Final and best metric per run, and the first eval step where the MoE reaches the dense run's
    final metric (accuracy for classifiers, higher is better; eval loss for LMs, lower is better)."""
    key, higher = ("accuracy", True) if task.classifies else ("loss", False)
    best = max if higher else min
    table = {
        r.name: {"final": r.eval[-1][key], "best": best(e[key] for e in r.eval),
                 "initial": r.eval[0][key], "throughput": r.throughput, "unit": f"{r.unit}/s"}
        for r in runs
    }
    out: dict[str, Any] = {"metric": f"eval {key}", "higher_is_better": higher, "runs": table,
                           "moe_steps_to_dense": None}
    by_name = {r.name: r for r in runs}
    if "dense" in by_name and "moe" in by_name:
        target = table["dense"]["final"]
        reached = [e["step"] for e in by_name["moe"].eval if (e[key] >= target if higher else e[key] <= target)]
        out["moe_steps_to_dense"] = reached[0] if reached else None
    return out


def write_outputs(report: Any, model_dir: Path, report_dir: Path) -> None:
    """``finetune.json`` and ``curves.png`` into ``report_dir``; the Recovery section into the card."""
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "finetune.json").write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    plot_curves(report.runs, report_dir / "curves.png", title=f"finetune {model_dir.name}")
    append_card_section(model_dir / "README.md", recovery_markdown(report))
    from ckptforge.hub import record_hashes  # issue 6: keep the output pushable after finetune

    inside = [p.name for p in (report_dir / "finetune.json", report_dir / "curves.png")
              if p.resolve().parent == model_dir.resolve()]
    record_hashes(model_dir, ["README.md", *inside])


def plot_curves(runs: list[RunResult], path: Path, title: str = "") -> Path:
    """Loss (train thin, eval thick) and eval accuracy against steps, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, run in enumerate(runs):
        colour = f"C{i}"
        steps = [r["step"] for r in run.train]
        loss_ax.plot(steps, [r["loss"] for r in run.train], color=colour, alpha=0.3, lw=0.8)
        loss_ax.plot([e["step"] for e in run.eval], [e["loss"] for e in run.eval], color=colour, lw=2,
                     marker="o", ms=3, label=f"{run.name} (eval)")
        acc_ax.plot([e["step"] for e in run.eval], [e["accuracy"] for e in run.eval], color=colour, lw=2,
                    marker="o", ms=3, label=run.name)
    loss_ax.set(xlabel="step", ylabel="loss", title="loss (thin: train, thick: eval)")
    acc_ax.set(xlabel="step", ylabel="eval accuracy", title="eval accuracy", ylim=(0, 1))
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def recovery_markdown(report: Any) -> str:
    """The card's "Recovery" section: settings, the per-run table and the steps-to-dense line."""
    rec = report.recovery
    metric = rec["metric"]
    s = report.settings
    rows = [f"| {name} | {v['initial']:.4f} | {v['final']:.4f} | {v['best']:.4f} | {v['throughput']:,.1f} {v['unit']} |"
            for name, v in rec["runs"].items()]
    lines = [
        "## Recovery", "",
        f"`ckptforge finetune` on `{report.data['source']}` ({report.data['train_examples']} train / "
        f"{report.data['eval_examples']} eval examples): {s['steps']} steps, batch {s['batch_size']}, "
        f"AdamW lr {s['lr']:g}, seed {s['seed']}, on {report.device['name']} "
        f"({report.device['mixed_precision']} mixed precision, {report.device['num_processes']} process(es)).",
        "", f"| run | {metric} at step 0 | final {metric} | best {metric} | throughput |",
        "|---|---|---|---|---|", *rows, "",
    ]
    if "dense" in rec["runs"]:
        steps = rec["moe_steps_to_dense"]
        lines.append(f"The MoE reached the dense run's final {metric} at step {steps}." if steps is not None
                     else f"The MoE did not reach the dense run's final {metric} within {s['steps']} steps.")
        lines.append("")
    where = _relative(Path(report.report_dir), Path(report.model_dir))
    lines.append(f"Curves: `{where}/curves.png`; every number: `{where}/finetune.json`.")
    return "\n".join(lines) + "\n"


def append_card_section(card: Path, section: str) -> None:
    """Append the Recovery section to the card, replacing the one an earlier run wrote."""
    text = card.read_text() if card.is_file() else ""
    text = _SECTION.sub("", text).rstrip("\n")
    card.write_text((text + "\n\n" if text else "") + section)


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path)
