"""The causal-LM recovery demo: does continuing the upcycled MoE beat continuing the dense model?

Upcycles the shipped ``examples/tiny-llama-pydoc`` (copy-all, 8 experts, top-2, every layer →
stock Mixtral), then runs ``finetune MOE --compare DENSE [--scratch]`` with finetune's DEFAULT
optimiser settings (only data, steps, seed, device and report dir are set) for each seed on:

- ``new`` text: ``examples/stdlib-docstrings`` (train.txt / eval.txt), prose the dense model has
  not seen; runs: MoE, dense continued, and (``--scratch-seeds``, default seed 0) MoE from scratch;
- ``same`` text: the example's own ``pydoc_data.topics`` split (train / held-out paragraphs);
  runs: MoE, dense continued.

Writes one JSON (every eval curve, final losses, tokens/s, the MoE − dense gap per seed and the
seed-to-seed spread), a markdown table and a PNG of the held-out loss curves.

    PYTHONPATH=. python benchmarks/recovery_llm.py                            # the documented run
    PYTHONPATH=. python benchmarks/recovery_llm.py --steps 4 --seeds 0 --out /tmp/r   # smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "tiny-llama-pydoc"
NEW_TEXT = REPO / "examples" / "stdlib-docstrings"


def same_text_files(directory: Path) -> tuple[Path, Path]:
    """The example's training / held-out paragraphs of ``pydoc_data.topics`` as two .txt files."""
    sys.path.insert(0, str(REPO / "examples"))
    from train_tiny_llama import load_topics

    train, held = load_topics(10)
    paths = directory / "pydoc-train.txt", directory / "pydoc-heldout.txt"
    for path, texts in zip(paths, (train, held)):
        path.write_text("\n\n".join(texts), encoding="utf-8")
    return paths


def run_setting(moe: Path, text: tuple[Path, Path], seed: int, steps: int, scratch: bool, report: Path) -> dict[str, Any]:
    """One ``finetune`` with the defaults (reusing ``report/finetune.json`` when it exists);
    returns per-run curves, final loss and tokens/s."""
    from ckptforge.finetune import FinetuneOptions, finetune

    written = report / "finetune.json"
    if not written.is_file():
        options = FinetuneOptions(data=str(text[0]), eval_data=str(text[1]), steps=steps, compare=str(EXAMPLE),
                                  scratch=scratch, seed=seed, device="cpu", report=str(report))
        finetune(moe, options)
    result = json.loads(written.read_text())
    return {
        "settings": result["settings"], "data": result["data"], "wall_seconds": result["wall_seconds"],
        "runs": {r["name"]: {"eval": [(e["step"], e["loss"]) for e in r["eval"]], "initial": r["eval"][0]["loss"],
                             "final": r["eval"][-1]["loss"], "tokens_per_s": r["throughput"], "params": r["params"]}
                 for r in result["runs"]},
    }


def summarise(results: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """Per setting: mean final loss per run, MoE − dense per seed, seed-to-seed spread, tokens/s ratio."""
    out = {}
    for setting, by_seed in results.items():
        names = {name for r in by_seed.values() for name in r["runs"]}
        finals = {name: [r["runs"][name]["final"] for r in by_seed.values() if name in r["runs"]] for name in sorted(names)}
        gaps = [r["runs"]["moe"]["final"] - r["runs"]["dense"]["final"] for r in by_seed.values()]
        spread = max((max(v) - min(v) for v in finals.values() if len(v) > 1), default=0.0)
        ratio = [r["runs"]["moe"]["tokens_per_s"] / r["runs"]["dense"]["tokens_per_s"] for r in by_seed.values()]
        out[setting] = {
            "final_loss": finals, "moe_minus_dense": gaps, "seed_spread": spread,
            "moe_ahead_beyond_spread": all(-g > spread for g in gaps),
            "moe_over_dense_tokens_per_s": ratio,
        }
    return out


def markdown(results: dict[str, dict[int, dict[str, Any]]], summary: dict[str, Any], steps: int) -> str:
    """The table: one row per setting and run, final held-out loss per seed, tokens/s."""
    seeds = sorted(next(iter(results.values())))
    head = " | ".join(f"seed {s}" for s in seeds)
    first = next(iter(results.values()))[seeds[0]]
    st = first["settings"]
    lines = [
        "# Causal-LM recovery: upcycled MoE vs dense continued", "",
        "`PYTHONPATH=. python benchmarks/recovery_llm.py` — `examples/tiny-llama-pydoc` upcycled with copy-all, "
        "8 experts, top-2, every layer (stock Mixtral), then `ckptforge finetune MOE --compare DENSE` "
        f"(+ `--scratch` on seed(s) {', '.join(map(str, sorted(s for s, r in results.get('new', {}).items() if 'scratch' in r['runs']))) or '—'}) "
        f"with finetune's defaults: {st['steps']} steps, batch {st['batch_size']} × {first['data']['seq_len']} tokens, "
        f"AdamW lr {st['lr']:g} ({st['schedule']}, warm-up {st['warmup_steps']}), aux weight {'the model' + chr(39) + 's' if st['aux_weight'] is None else format(st['aux_weight'], 'g')}, "
        f"gradient clipping {st['max_grad_norm']:g}. *new* text: `examples/stdlib-docstrings` (train.txt → eval.txt); "
        "*same* text: the example's own `pydoc_data.topics` training / held-out paragraphs. Loss in nats/token on "
        "the held-out file; tokens/s measured on a shared, busy 2-core CPU (compare only within a row group).", "",
    ]
    lines += [f"| text | run | held-out loss at step 0 | after {steps} steps: {head} | tokens/s (seed {seeds[0]}) |",
             "|---|---|---|" + "---|" * len(seeds) + "---|"]
    names = {"moe": "MoE (upcycled)", "dense": "dense continued", "scratch": "MoE from scratch"}
    for setting, by_seed in results.items():
        for name, run in by_seed[seeds[0]]["runs"].items():
            finals = " | ".join(f"{by_seed[s]['runs'][name]['final']:.4f}" if name in by_seed[s]["runs"] else "—"
                                for s in seeds)
            lines.append(f"| {setting} | {names[name]} | {run['initial']:.4f} | {finals} | {run['tokens_per_s']:,.0f} |")
    lines.append("")
    for setting, s in summary.items():
        gaps = ", ".join(f"{g:+.4f}" for g in s["moe_minus_dense"])
        ratio = ", ".join(f"{r:.2f}" for r in s["moe_over_dense_tokens_per_s"])
        lines.append(f"- {setting} text: MoE − dense = {gaps} (per seed); largest seed-to-seed spread of a run "
                     f"{s['seed_spread']:.4f}; MoE ahead by more than the spread: {s['moe_ahead_beyond_spread']}; "
                     f"MoE tokens/s ÷ dense tokens/s = {ratio}.")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict[int, dict[str, Any]]], path: Path) -> None:
    """Held-out loss against steps, one panel per text, one colour per run, one line style per seed."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    colours = {"moe": "C0", "dense": "C1", "scratch": "C2"}
    for ax, (setting, by_seed) in zip(axes[0], results.items()):
        for i, (seed, res) in enumerate(sorted(by_seed.items())):
            for name, run in res["runs"].items():
                steps, losses = zip(*run["eval"])
                ax.plot(steps, losses, color=colours[name], ls=("-", "--", ":")[i % 3], marker="o", ms=2,
                        label=f"{name} seed {seed}")
        finals = [r["final"] for res in by_seed.values() for n, r in res["runs"].items() if n != "scratch"]
        ax.set_ylim(min(finals) - 0.3, max(r["runs"]["dense"]["initial"] for r in by_seed.values()) + 0.5)
        ax.set(xlabel="step", ylabel="held-out loss (nats/token)", title=f"{setting} text")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("tiny-llama-pydoc: upcycled MoE (8 experts, top-2) vs dense vs MoE from scratch", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--scratch-seeds", type=int, nargs="*", default=[0],
                        help="seeds whose new-text finetune also trains the MoE from scratch")
    parser.add_argument("--settings", nargs="+", default=["new", "same"], choices=["new", "same"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "docs", help="where the JSON, .md and PNG go")
    parser.add_argument("--name", default="recovery-tiny-llama")
    parser.add_argument("--work", type=Path, default=None,
                        help="keep the upcycled MoE and each finetune report here; reports already there are reused")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import ckptforge

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        moe = work / "moe"
        if not moe.is_dir():
            ckptforge.upcycle(EXAMPLE, moe, ckptforge.UpcycleOptions(num_experts=8, top_k=2, layers="all",
                                                                     strategy="copy-all", seed=0))
        texts = {"new": (NEW_TEXT / "train.txt", NEW_TEXT / "eval.txt"), "same": same_text_files(work)}
        results: dict[str, dict[int, dict[str, Any]]] = {}
        for setting in args.settings:
            for seed in args.seeds:
                scratch = setting == "new" and seed in args.scratch_seeds
                res = run_setting(moe, texts[setting], seed, args.steps, scratch, work / f"{setting}-{seed}")
                results.setdefault(setting, {})[seed] = res
                print(f"{setting} seed {seed}: " + ", ".join(f"{n} {r['final']:.4f}" for n, r in res["runs"].items()),
                      flush=True)
    summary = summarise(results)
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"model": "examples/tiny-llama-pydoc", "upcycle": "copy-all, 8 experts, top-2, every layer (mixtral)",
               "steps": args.steps, "seeds": args.seeds, "threads": args.threads, "torch": torch.__version__,
               "wall_seconds": round(time.perf_counter() - start, 1), "summary": summary, "results": results}
    (args.out / f"{args.name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    table = markdown(results, summary, args.steps)
    (args.out / f"{args.name}.md").write_text(table)
    plot(results, args.out / f"{args.name}.png")
    print(table)


if __name__ == "__main__":
    main()
