#!/usr/bin/env python3
"""Aggregate ``ckptforge eval --capacity-factor … --json`` reports of several finetune seeds into
the markdown table and the plot of docs/capacity-sweep.md.

    for s in 0 1; do
      ckptforge finetune out/tiny-vit-moe --data examples/mnist-samples --steps 200 --eval-every 20 \\
          --lr 1e-3 --batch-size 32 --device cpu --seed $s --save out/ft$s --report out/ft$s-report
      ckptforge eval out/ft$s --data examples/mnist-samples --held-out --seed $s \\
          --capacity-factor 0.25,0.5,1,2 --json > out/eval$s.json
    done
    python benchmarks/capacity_sweep.py out/eval0.json out/eval1.json --png docs/capacity-sweep.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ckptforge.evaluate import EvalReport, plot_sweep


def markdown(reports: list[EvalReport]) -> str:
    """One row per (C, BPR): the metric of every seed, its mean and spread, loss, FLOPs, kept share."""
    first = reports[0]
    seeds = [r.options["seed"] for r in reports]
    head = (f"| C | BPR | {' | '.join(f'{first.metric} seed {s}' for s in seeds)} | mean {first.metric} (spread) "
            f"| mean eval loss (spread) | expert MFLOPs / example | GFLOPs / example | assignments kept |")
    lines = [head, "|" + "---|" * (8 + len(seeds) - 1)]
    for i, row in enumerate(first.rows):
        rows = [r.rows[i] for r in reports]
        values = [first.value(r) for r in rows]
        losses = [r.loss for r in rows]
        c = "none" if row.capacity_factor is None else f"{row.capacity_factor:g}"
        bpr = "-" if row.bpr is None else ("on" if row.bpr else "off")
        expert = sum(r.expert_flops_per_example for r in rows) / len(rows) / 1e6
        total = sum(r.flops_per_example for r in rows) / len(rows) / 1e9
        kept = sum(r.kept_assignments for r in rows) / len(rows)
        lines.append(
            f"| {c} | {bpr} | {' | '.join(f'{v:.3f}' for v in values)} | {_mean(values):.3f} ({_spread(values):.3f}) "
            f"| {_mean(losses):.4f} ({_spread(losses):.4f}) | {expert:.3f} | {total:.4f} | {kept:.3f} |")
    return "\n".join(lines) + "\n"


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _spread(values: list[float]) -> float:
    return max(values) - min(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", type=Path, help="eval --json outputs, one per seed")
    parser.add_argument("--png", type=Path, help="write the BPR / no-BPR plot here")
    args = parser.parse_args()
    reports = [EvalReport.from_dict(json.loads(p.read_text())) for p in args.reports]
    print(markdown(reports))
    if args.png:
        plot_sweep(reports, args.png, title=f"capacity sweep, {len(reports)} finetune seeds (mean, min–max)")


if __name__ == "__main__":
    main()
