#!/usr/bin/env python3
"""MoE Jetpack's cross-size recycling on the shipped example: a 2x wider teacher (trained by the
same script) recycled into the example's shape, against random init and against the example's own
dense weights, each fine-tuned for the same steps on the same data, over several seeds.

Arms (all the same MoE shape: examples/tiny-vit-mnist's config, 4 experts, top-2, MoE layers 1 and
3, expert width 256, top-k router):

- ``recycled``: ``upcycle STUDENT_CONFIG --teacher TEACHER`` — a student given as a config only
  (examples/tiny-vit-mnist/config.json): every weight sliced from the teacher (experts: hidden
  units by importance, channels by importance at the teacher's FFN input; attention heads / head
  dims, dense-layer units by weight norm);
- ``random init``: the same MoE architecture from random init (``finetune --scratch``);
- ``own dense``: ``upcycle examples/tiny-vit-mnist`` (copy-all: sparse upcycling of the example's
  own dense weights);
- ``teacher experts``: (``--mixed``) the example checkpoint as the student: experts from the
  teacher, every other weight the example's own.

Each seed runs ``ckptforge.finetune`` on the recycled MoE with ``compare`` = the own-dense MoE and
``scratch``, then (``--mixed``) on the teacher-experts MoE, with the same seeded data split, order,
steps and optimiser. Writes ``cross-size.json`` (every curve), ``cross-size.md`` (the table) and
``cross-size.png`` (mean eval loss and accuracy per arm, min-max band over seeds)::

    python examples/train_tiny_vit.py --hidden-size 128 --threads 1 --skip-images \\
        --out examples/tiny-vit-mnist-wide            # the shipped teacher (3.2 MB)
    python benchmarks/cross_size.py --seeds 0 1 2 --steps 200 --mixed --out out/cross-size
    # or one process per seed, then combine their reports:
    python benchmarks/cross_size.py --seeds 1 --mixed --out out/cs1   # (and so on)
    python benchmarks/cross_size.py --aggregate out/cross-size out/cs1 --out out/cross-size-all

Only metrics are reported (no timings): they do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's ckptforge
EXAMPLE = ROOT / "examples" / "tiny-vit-mnist"
TEACHER = ROOT / "examples" / "tiny-vit-mnist-wide"
DATA = ROOT / "examples" / "mnist-samples"
ARMS = {"moe": "recycled from the teacher", "scratch": "random init", "dense": "upcycled from own dense",
        "mixed": "teacher experts, own other weights"}


def build_models(work: Path, teacher: Path, mixed: bool) -> dict[str, Path]:
    """The MoE checkpoints of the arms (rebuilt each time: cheap, and the options stay visible)."""
    import ckptforge

    shape = dict(num_experts=4, top_k=2, layers="every-2")
    student = work / "student-config"
    student.mkdir(parents=True, exist_ok=True)
    shutil.copy(EXAMPLE / "config.json", student / "config.json")
    models = {"moe": work / "recycled", "dense": work / "own-dense"}
    cross = dict(teacher=str(teacher), calibration=str(DATA), strategy_params={"expert_ratio": 1.0})
    ckptforge.upcycle(student, models["moe"], ckptforge.UpcycleOptions(**shape, **cross), force=True)
    ckptforge.upcycle(EXAMPLE, models["dense"], ckptforge.UpcycleOptions(**shape), force=True)
    if mixed:
        models["mixed"] = work / "teacher-experts"
        ckptforge.upcycle(EXAMPLE, models["mixed"], ckptforge.UpcycleOptions(**shape, **cross), force=True)
    return models


def run_seed(models: dict[str, Path], work: Path, seed: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every arm's finetune curves for one seed (same data split, order, steps and optimiser)."""
    from ckptforge.finetune import FinetuneOptions, finetune

    common = dict(data=str(DATA), steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                  eval_every=args.eval_every, seed=seed, device="cpu")
    report = finetune(models["moe"], FinetuneOptions(**common, compare=str(models["dense"]), scratch=True,
                                                     report=str(work / f"seed{seed}")))
    runs = [r.to_dict() for r in report.runs]
    if "mixed" in models:
        mixed = finetune(models["mixed"], FinetuneOptions(**common, report=str(work / f"seed{seed}-mixed")))
        runs.append({**mixed.runs[0].to_dict(), "name": "mixed"})
    return [{**r, "seed": seed} for r in runs]


def load_runs(outs: list[Path]) -> list[dict[str, Any]]:
    """The runs that earlier calls wrote (``OUT/finetune/seedS[-mixed]/finetune.json``), to combine
    seeds run as separate processes."""
    runs = []
    for out in outs:
        for report in sorted((out / "finetune").glob("seed*/finetune.json")):
            data = json.loads(report.read_text())
            seed = data["options"]["seed"]
            mixed = report.parent.name.endswith("-mixed")
            runs += [{**r, "name": "mixed" if mixed else r["name"], "seed": seed} for r in data["runs"]]
    return runs


def summary(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per arm: eval loss / accuracy at step 0 and at the end, per seed, mean and spread (max - min)."""
    out = {}
    for arm in ARMS:
        mine = sorted((r for r in runs if r["name"] == arm), key=lambda r: r["seed"])
        if not mine:
            continue
        row: dict[str, Any] = {"label": ARMS[arm], "params": mine[0]["params"], "seeds": [r["seed"] for r in mine]}
        for when, pick in (("start", 0), ("end", -1)):
            for metric in ("loss", "accuracy"):
                values = [r["eval"][pick][metric] for r in mine]
                row[f"{when}_{metric}"] = {"values": values, "mean": sum(values) / len(values),
                                           "spread": max(values) - min(values)}
        out[arm] = row
    return out


def markdown(table: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    """The table: one row per arm, eval loss and accuracy at step 0 and after ``steps``."""
    seeds = ", ".join(map(str, args.seeds))
    lines = [f"Eval loss / accuracy on the 50 held-out images of each seed's split (seeds {seeds}; mean, "
             f"spread = max - min over seeds), before and after {args.steps} steps (lr {args.lr:g}, batch "
             f"{args.batch_size}).", "",
             "| start | params | eval loss, step 0 | eval acc, step 0 | eval loss, step "
             f"{args.steps} | eval acc, step {args.steps} | final loss per seed |",
             "|---|---|---|---|---|---|---|"]
    for row in table.values():
        cell = lambda key, f: f"{row[key]['mean']:{f}} ({row[key]['spread']:{f}})"  # noqa: E731
        per_seed = " / ".join(f"{v:.3f}" for v in row["end_loss"]["values"])
        lines.append(f"| {row['label']} | {row['params']:,} | {cell('start_loss', '.3f')} | "
                     f"{cell('start_accuracy', '.3f')} | {cell('end_loss', '.3f')} | {cell('end_accuracy', '.3f')} "
                     f"| {per_seed} |")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    """Mean eval loss and accuracy against steps per arm, the min-max band over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, arm in enumerate(a for a in ARMS if any(r["name"] == a for r in runs)):
        mine = [r for r in runs if r["name"] == arm]
        steps = [e["step"] for e in mine[0]["eval"]]
        for ax, metric in zip(axes, ("loss", "accuracy")):
            values = [[r["eval"][j][metric] for r in mine] for j in range(len(steps))]
            ax.plot(steps, [sum(v) / len(v) for v in values], color=f"C{i}", lw=2, marker="o", ms=3, label=ARMS[arm])
            ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=f"C{i}", alpha=0.2)
    axes[0].set(xlabel="step", ylabel="eval loss", title="eval loss (mean, min-max over seeds)")
    axes[1].set(xlabel="step", ylabel="eval accuracy", title="eval accuracy", ylim=(0, 1))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, default=TEACHER, help="the wider dense ViT (default: the shipped one)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--mixed", action="store_true", help="also the teacher-experts arm (student checkpoint)")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "cross-size")
    parser.add_argument("--no-png", action="store_true")
    parser.add_argument("--aggregate", type=Path, nargs="+", help="only combine the finetune reports under these "
                        "earlier --out directories (seeds run as separate processes) into --out")
    args = parser.parse_args(argv)
    if args.aggregate:
        runs = load_runs(args.aggregate)
        first = json.loads(next((args.aggregate[0] / "finetune").glob("seed*/finetune.json")).read_text())["options"]
        args.steps, args.lr, args.batch_size = first["steps"], first["lr"], first["batch_size"]
        args.seeds = sorted({r["seed"] for r in runs})
        return write_outputs(runs, args)
    if not (args.teacher / "config.json").is_file():
        sys.exit(f"no teacher at {args.teacher}; train it with: python examples/train_tiny_vit.py "
                 f"--hidden-size 128 --threads 1 --skip-images --out {args.teacher}")
    args.out.mkdir(parents=True, exist_ok=True)
    models = build_models(args.out / "models", args.teacher, args.mixed)
    runs = [run for seed in args.seeds for run in run_seed(models, args.out / "finetune", seed, args)]
    write_outputs(runs, args)


def write_outputs(runs: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """cross-size.json, cross-size.md and (unless --no-png) cross-size.png into --out; print the table."""
    args.out.mkdir(parents=True, exist_ok=True)
    table = summary(runs)
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    record = {"options": options, "summary": table, "runs": runs}
    (args.out / "cross-size.json").write_text(json.dumps(record, default=str, indent=1) + "\n")
    text = markdown(table, args)
    (args.out / "cross-size.md").write_text(text)
    if not args.no_png:
        plot(runs, args.out / "cross-size.png")
    print(text)


if __name__ == "__main__":
    main()
