"""The parts of ``benchmarks/gpu_check.sh`` that need Python: the Mixtral bf16 check on the device, and
the summary (one JSON + one Markdown table).

    python benchmarks/gpu_check.py mixtral --device cuda --work W --out OUT
    python benchmarks/gpu_check.py summary --out OUT
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

#: A LLaMA small enough to build in seconds, large enough that GEMMs reach the GPU's kernels.
LLAMA = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
             num_key_value_heads=4, max_position_embeddings=512)
TINY_LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)


def _cli(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "ckptforge", *args, "--json"], capture_output=True, text=True)
    payload = json.loads(done.stdout) if done.stdout.strip() else {}
    return {"exit_code": done.returncode, "stderr": done.stderr[-2000:], **payload}


def mixtral(device: str, work: Path, tiny: bool) -> dict:
    """Dense LLaMA (bf16) → Mixtral (8 copy-all experts, bf16); ``ckptforge verify`` (its fp32 CPU
    check); then dense vs MoE logits on ``device`` in bf16 with each of transformers' experts backends."""
    import transformers

    dense_dir, moe_dir = work / "dense-llama", work / "mixtral"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**(TINY_LLAMA if tiny else LLAMA)))
    model.to(torch.bfloat16).save_pretrained(dense_dir)
    start = time.perf_counter()
    upcycle = _cli("upcycle", str(dense_dir), "--experts", "8", "--top-k", "2", "--layers", "all", "--dtype",
                   "bfloat16", "--out", str(moe_dir), "--force")
    result = {"upcycle_exit_code": upcycle["exit_code"], "upcycle_seconds": round(time.perf_counter() - start, 2)}
    verify = _cli("verify", str(moe_dir))
    result["verify_cli"] = {k: verify.get(k) for k in ("exit_code", "passed", "final", "inputs")}
    ids = torch.randint(3, model.config.vocab_size, (4, 128 if not tiny else 16), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    dense = transformers.AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.bfloat16).to(device).eval()
    with torch.no_grad():
        ref = dense(input_ids=ids).logits.float()
    del dense
    result["device_check"] = {}
    for backend in ("eager", "grouped_mm"):
        moe = transformers.AutoModelForCausalLM.from_pretrained(
            moe_dir, dtype=torch.bfloat16, experts_implementation=backend).to(device).eval()
        with torch.no_grad():
            got = moe(input_ids=ids).logits.float()
        rel = ((got - ref).norm() / ref.norm()).item()
        result["device_check"][backend] = {"relative_l2": rel, "max_abs": (got - ref).abs().max().item()}
        del moe
    return result


def summary(out: Path) -> dict:
    """Collect the step outputs under ``out`` into gpu_check.json and gpu_check.md."""
    parts = {}
    for name in ("environment", "moe_layer", "finetune", "mixtral", "fsdp"):
        f = out / f"{name}.json"
        parts[name] = json.loads(f.read_text()) if f.is_file() and f.stat().st_size else {"missing": True}
    (out / "gpu_check.json").write_text(json.dumps(parts, indent=2) + "\n")
    lines = [f"# GPU check: {parts['environment'].get('device', '?')} (torch {parts['environment'].get('torch', '?')})", ""]
    moe = parts["moe_layer"]
    if "ms" in moe:
        lines += [f"## MoE layer fwd+bwd, {moe['dtype']}, {moe['images']}×{moe['tokens']} tokens, E={moe['experts']}, "
                  f"k={moe['top_k']} (auto → {moe['auto_picks']})", "",
                  "| layer | ms | vs dense MLP |", "|---|---|---|", f"| dense MLP | {moe['ms']['dense']:.2f} | 1.00× |"]
        lines += [f"| {n} | {moe['ms'][n]:.2f} | {r:.2f}× |" for n, r in moe["vs_dense"].items()]
        lines += [f"| {k}: grouped_mm over loop | | {r:.2f}× |" for k, r in moe["grouped_vs_loop"].items()]
    ft = parts["finetune"]
    if "recovery" in ft:
        lines += ["", f"## Recovery demo ({ft['device'].get('name')}, {ft['device'].get('mixed_precision')})", "",
                  "| run | initial | final | best | throughput |", "|---|---|---|---|---|"]
        lines += [f"| {n} | {v['initial']:.4f} | {v['final']:.4f} | {v['best']:.4f} | {v['throughput']:,.1f} {v['unit']} |"
                  for n, v in ft["recovery"]["runs"].items()]
    mx = parts["mixtral"]
    if "device_check" in mx:
        lines += ["", "## Mixtral (bf16) vs its dense LLaMA", "",
                  f"`ckptforge verify` (fp32, CPU): exit {mx['verify_cli']['exit_code']}, passed {mx['verify_cli']['passed']}", "",
                  "| backend on device | relative L2 of logits | max abs |", "|---|---|---|"]
        lines += [f"| {b} | {v['relative_l2']:.2e} | {v['max_abs']:.2e} |" for b, v in mx["device_check"].items()]
    fsdp = parts["fsdp"]
    if "recovery" in fsdp:
        lines += ["", "## The same finetune under FSDP (accelerate config benchmarks/accelerate_fsdp.yaml)", "",
                  "| run | initial | final | throughput |", "|---|---|---|---|"]
        lines += [f"| {n} | {v['initial']:.4f} | {v['final']:.4f} | {v['throughput']:,.1f} {v['unit']} |"
                  for n, v in fsdp["recovery"]["runs"].items()]
    missing = [n for n, p in parts.items() if p.get("missing")]
    if missing:
        lines += ["", f"Steps without output (failed or timed out): {', '.join(missing)}; see the logs beside this file."]
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["environment", "mixtral", "summary"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--work", type=Path, default=Path(".bench/gpu"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.step == "environment":
        env = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": args.device,
               "grouped_mm": hasattr(torch.nn.functional, "grouped_mm")}
        if args.device.startswith("cuda"):
            env |= {"device": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability())}
        (args.out / "environment.json").write_text(json.dumps(env, indent=2) + "\n")
    elif args.step == "mixtral":
        (args.out / "mixtral.json").write_text(json.dumps(mixtral(args.device, args.work, args.tiny), indent=2) + "\n")
    else:
        print((args.out / "gpu_check.md").read_text() if summary(args.out) else "")


if __name__ == "__main__":
    main()
