"""Conversion speed and memory: ckptforge upcycle vs `dd` (physical write rate) vs mergekit-moe.

Builds a synthetic dense LLaMA checkpoint of TinyLlama-1.1B shape (hidden 2048, intermediate 5632,
32 heads, 4 kv heads, vocab 32000, bf16; each tensor filled with its own constant, so building it
is cheap), converts it to 8 copy-all experts on every layer, and in the same run writes the same
number of bytes with `dd … conv=fdatasync` as the physical reference, and once more with
`oflag=direct` (the disk without the page cache, which is how ckptforge writes large shards).
When `mergekit-moe` is on PATH it converts the same input (8 × the same model, gate_mode random). Every command runs in its
own process; wall time includes the final flush to disk (ckptforge fsyncs every file; mergekit is
followed by a timed `sync`), peak RSS comes from GNU time.

    python benchmarks/convert.py --layers 22 33 --workdir .bench

Prints a Markdown table and writes WORKDIR/convert.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 2048, 5632, 32, 4, 32000


def build_dense(directory: Path, layers: int) -> int:
    """Write the synthetic dense checkpoint; returns its size in bytes."""
    if (directory / "config.json").is_file():
        return (directory / "model.safetensors").stat().st_size
    directory.mkdir(parents=True, exist_ok=True)
    head_dim = HIDDEN // HEADS
    config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE, "num_hidden_layers": layers, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB, "hidden_act": "silu", "rms_norm_eps": 1e-5,
        "max_position_embeddings": 2048, "tie_word_embeddings": False, "dtype": "bfloat16",
        "bos_token_id": 1, "eos_token_id": 2,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,),
              "lm_head.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
            p + "self_attn.k_proj.weight": (KV_HEADS * head_dim, HIDDEN),
            p + "self_attn.v_proj.weight": (KV_HEADS * head_dim, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
            p + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
            p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,),
        }
    tensors = {n: torch.full(s, (k % 97) / 1000, dtype=torch.bfloat16) for k, (n, s) in enumerate(shapes.items())}
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    _write_tokenizer(directory)
    return (directory / "model.safetensors").stat().st_size


def _write_tokenizer(directory: Path) -> None:
    """A small word-level tokenizer so tools that copy tokenizers (mergekit) find one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i + 3 for i in range(100)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(directory)


def timed(cmd: list[str], cwd: Path | None = None) -> dict:
    """Run ``cmd`` under GNU time: wall seconds, peak RSS (MiB) and CPU seconds (user + system) of
    that process alone (the CPU shows what a busy machine's wall time cannot).

    (wait4() from this process would count the pages a forked child shares with this one.)
    """
    report = Path(os.environ.get("TMPDIR", "/tmp")) / f"ckptforge-bench-{os.getpid()}.time"
    os.sync()  # the previous command's write-back must not slow this one down
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-f", "%M %U %S", "-o", str(report), *cmd], cwd=cwd,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} … exited {done.returncode}: {done.stderr[-2000:]}")
    peak_kib, user, system = report.read_text().split()[-3:]
    report.unlink()
    return {"seconds": wall, "peak_rss_mib": int(peak_kib) / 1024, "cpu_s": round(float(user) + float(system), 2)}


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_size(work: Path, layers: int, experts: int, with_mergekit: bool, repeats: int) -> dict:
    """ckptforge and dd alternately ``repeats`` times (this disk's rate drifts by 2–3× over minutes,
    so each ratio pairs neighbouring runs); the medians are reported."""
    dense = work / f"dense-{layers}L"
    dense_bytes = build_dense(dense, layers)
    out = work / f"moe-{layers}L"
    ours_runs, dd_runs, direct_runs = [], [], []
    for _ in range(repeats):
        shutil.rmtree(out, ignore_errors=True)
        ours_runs.append(timed([sys.executable, "-m", "ckptforge", "upcycle", str(dense), "--experts",
                                str(experts), "--layers", "all", "--out", str(out), "--force", "-q"]))
        out_bytes = dir_bytes(out)
        shutil.rmtree(out)
        block = 16 << 20
        dd = ["dd", "if=/dev/zero", f"of={work / 'dd.bin'}", f"bs={block}", f"count={out_bytes // block + 1}",
              "conv=fdatasync", "status=none"]
        dd_runs.append(timed(dd))
        (work / "dd.bin").unlink()
        direct_runs.append(timed([*dd, "oflag=direct"]))  # the disk without the page cache
        (work / "dd.bin").unlink()
    row = {"layers": layers, "dense_bytes": dense_bytes, "out_bytes": out_bytes}
    for key, runs in (("ckptforge", ours_runs), ("dd", dd_runs), ("dd_direct", direct_runs)):
        row[key] = _median(runs) | {"runs": [r["seconds"] for r in runs]}
    if with_mergekit and shutil.which("mergekit-moe"):
        row["mergekit"] = run_mergekit(work, dense, experts)
    return row


def _median(runs: list[dict]) -> dict:
    ordered = sorted(runs, key=lambda r: r["seconds"])
    return {"seconds": ordered[len(ordered) // 2]["seconds"], "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
            "cpu_s": [r["cpu_s"] for r in runs]}


def run_mergekit(work: Path, dense: Path, experts: int) -> dict:
    config = work / "mergekit-moe.yml"
    lines = [f"base_model: {dense}", "gate_mode: random", "dtype: bfloat16", "experts:"]
    lines += [f"  - source_model: {dense}"] * experts
    config.write_text("\n".join(lines) + "\n")
    out = work / "mergekit-out"
    shutil.rmtree(out, ignore_errors=True)
    result = timed(["mergekit-moe", str(config), str(out), "--i-understand-this-is-not-useful-without-training"])
    sync = timed(["sync"])
    result["sync_seconds"] = sync["seconds"]
    result["out_bytes"] = dir_bytes(out)
    shutil.rmtree(out)
    return result


def markdown(rows: list[dict]) -> str:
    lines = ["| layers | dense GB | out GB | ckptforge s | MB/s | peak RSS MiB | dd s | vs dd | dd direct s | vs dd direct "
             "| mergekit s (+sync) | mergekit RSS MiB | speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ours, dd, direct = r["ckptforge"], r["dd"], r["dd_direct"]
        rate = r["out_bytes"] / ours["seconds"] / 1e6
        dd_rate = r["out_bytes"] / dd["seconds"] / 1e6
        mk = r.get("mergekit")
        mk_s = f"{mk['seconds']:.1f} (+{mk['sync_seconds']:.1f})" if mk else "—"
        mk_rss = f"{mk['peak_rss_mib']:.0f}" if mk else "—"
        speed = f"{(mk['seconds'] + mk['sync_seconds']) / ours['seconds']:.2f}×" if mk else "—"
        lines.append(
            f"| {r['layers']} | {r['dense_bytes'] / 1e9:.2f} | {r['out_bytes'] / 1e9:.2f} | {ours['seconds']:.1f} | "
            f"{rate:.0f} | {ours['peak_rss_mib']:.0f} | {dd['seconds']:.1f} | {rate / dd_rate:.2f}× | "
            f"{direct['seconds']:.1f} | {direct['seconds'] / ours['seconds']:.2f}× | {mk_s} | {mk_rss} | {speed} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[22, 33])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=Path(".bench"))
    parser.add_argument("--no-mergekit", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="ckptforge / dd pairs per size (medians).")
    parser.add_argument("--keep-dense", action="store_true", help="Keep the synthetic dense checkpoints.")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for layers in args.layers:
        rows.append(run_size(args.workdir, layers, args.experts, not args.no_mergekit, args.repeats))
        print(json.dumps(rows[-1]), flush=True)
        if not args.keep_dense:
            shutil.rmtree(args.workdir / f"dense-{layers}L")
    (args.workdir / "convert.json").write_text(json.dumps(rows, indent=2))
    print(markdown(rows))


if __name__ == "__main__":
    main()
