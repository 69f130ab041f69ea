"""Multi-source MoE speed and memory: `ckptforge upcycle --config` vs `mergekit-moe` on the same YAML.

Builds a synthetic dense LLaMA base (TinyLlama-1.1B shape by default: hidden 2048, intermediate 5632,
22 layers, 32 heads, 4 kv heads, vocab 32000, bf16, seeded random weights) and four dense
"fine-tunes" of it (the base with small seeded perturbations of every FFN), writes one mergekit-moe
YAML per gate mode (``random`` and ``hidden``, one prompt per expert, all of the same token count so
no prompt is padded), and runs both tools on it, each in its own process under GNU time (wall time,
peak RSS). Then it checks that the expert tensors of both outputs are byte-identical (mergekit's
packed ``mlp.experts.gate_up_proj`` / ``down_proj`` layout, if it writes that, is split into
ckptforge's per-expert names first) and, for ``hidden``, the cosine of each pair of router rows.

``--memory-cap MIB`` runs ckptforge's ``hidden`` conversion again under a cgroup v1 memory limit
(page cache included; as root) or else ``ulimit -v``, with the models' page cache dropped first, to
show the layer-by-layer runner gates a base larger than the cap (e.g. 1050 for half the 2.05 GiB base).

    python benchmarks/multisource.py --size tinyllama --workdir .bench-ms --mergekit /work/venvs/mk/bin/mergekit-moe
    python benchmarks/multisource.py --size tiny --workdir /tmp/ms          # smoke run

Prints a Markdown table and writes WORKDIR/multisource.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert import _write_tokenizer, dir_bytes, timed  # noqa: E402

SIZES = {
    "tinyllama": dict(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000),
    "tiny": dict(hidden=64, intermediate=176, layers=4, heads=4, kv_heads=2, vocab=512),
}
EXPERTS = 4
PROMPTS = ["w1 w2 w3 w4", "w10 w11 w12 w13", "w20 w21 w22 w23", "w30 w31 w32 w33"]  # same token count each


def _shapes(s: dict) -> dict[str, tuple[int, ...]]:
    h, f, kv = s["hidden"], s["intermediate"], s["kv_heads"] * s["hidden"] // s["heads"]
    shapes = {"model.embed_tokens.weight": (s["vocab"], h), "model.norm.weight": (h,), "lm_head.weight": (s["vocab"], h)}
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                   p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                   p + "mlp.down_proj.weight": (h, f), p + "input_layernorm.weight": (h,),
                   p + "post_attention_layernorm.weight": (h,)}
    return shapes


def build_models(work: Path, s: dict) -> tuple[Path, list[Path]]:
    """The base and four fine-tunes (FFNs perturbed by seeded noise), one tensor in memory at a time
    per file; returns their directories."""
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": s["hidden"],
              "intermediate_size": s["intermediate"], "num_hidden_layers": s["layers"],
              "num_attention_heads": s["heads"], "num_key_value_heads": s["kv_heads"], "vocab_size": s["vocab"],
              "hidden_act": "silu", "rms_norm_eps": 1e-5, "max_position_embeddings": 2048,
              "tie_word_embeddings": False, "dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}
    dirs = [work / "base", *(work / f"ft{e}" for e in range(EXPERTS))]
    if all((d / "model.safetensors").is_file() for d in dirs):
        return dirs[0], dirs[1:]
    shapes = _shapes(s)
    for k, d in enumerate(dirs):
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(config, indent=2))
        _write_tokenizer(d)
        tensors = {}
        for n, (name, shape) in enumerate(shapes.items()):
            g = torch.Generator().manual_seed(n)
            w = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.02
            if k and ".mlp." in name:
                w = w + torch.randn(shape, generator=torch.Generator().manual_seed(10_000 * k + n)) * 0.002
            tensors[name] = w.to(torch.bfloat16)
        save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
        del tensors
    return dirs[0], dirs[1:]


def write_yaml(path: Path, base: Path, sources: list[Path], gate_mode: str) -> Path:
    lines = [f"base_model: {base}", f"gate_mode: {gate_mode}", "dtype: bfloat16", "experts_per_token: 2", "experts:"]
    for s, p in zip(sources, PROMPTS):
        lines += [f"  - source_model: {s}", "    positive_prompts:", f"      - \"{p}\""]
    path.write_text("\n".join(lines) + "\n")
    return path


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _per_expert(state: dict[str, torch.Tensor], layers: int) -> tuple[dict, dict]:
    """(layer, expert, w1|w2|w3) → tensor, and layer → router rows, from either naming."""
    experts, routers = {}, {}
    for i in range(layers):
        for prefix in (f"model.layers.{i}.block_sparse_moe.", f"model.layers.{i}.mlp."):
            if prefix + "gate.weight" in state:
                routers[i] = state[prefix + "gate.weight"].float()
            packed = state.get(prefix + "experts.gate_up_proj")
            if packed is not None:
                f = packed.shape[1] // 2
                for e in range(packed.shape[0]):
                    experts[i, e, "w1"], experts[i, e, "w3"] = packed[e, :f], packed[e, f:]
                    experts[i, e, "w2"] = state[prefix + "experts.down_proj"][e]
            for e in range(EXPERTS):
                for w in ("w1", "w2", "w3"):
                    if (t := state.get(f"{prefix}experts.{e}.{w}.weight")) is not None:
                        experts[i, e, w] = t
    return experts, routers


def compare(ours: Path, theirs: Path, layers: int) -> dict:
    a, ra = _per_expert(_tensors(ours), layers)
    b, rb = _per_expert(_tensors(theirs), layers)
    same = set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    cos = [torch.nn.functional.cosine_similarity(ra[i], rb[i], dim=-1).min().item() for i in ra if i in rb]
    names = sorted(_tensors(theirs))
    layout = "packed" if any(n.endswith("experts.gate_up_proj") for n in names) else "per-expert"
    return {"experts_byte_identical": same, "expert_tensors": len(a), "mergekit_layout": layout,
            "router_min_cosine": min(cos) if cos else None}


def run(args: argparse.Namespace) -> list[dict]:
    s = SIZES[args.size]
    work = args.workdir
    base, sources = build_models(work, s)
    rows = []
    for mode in args.gate_modes:
        cfg = write_yaml(work / f"moe-{mode}.yml", base, sources, mode)
        ours = work / f"ours-{mode}"
        shutil.rmtree(ours, ignore_errors=True)
        row = {"size": args.size, "gate_mode": mode, "base_bytes": dir_bytes(base)}
        warm([base, *sources])
        row["ckptforge"] = timed([sys.executable, "-m", "ckptforge", "upcycle", "--config", str(cfg), "--out", str(ours), "-q"])
        row["out_bytes"] = dir_bytes(ours)
        if args.memory_cap and mode == "hidden":
            row["ckptforge_capped"] = capped_run(work, cfg, [base, *sources], args.memory_cap)
        if args.mergekit:
            theirs = work / f"mergekit-{mode}"
            shutil.rmtree(theirs, ignore_errors=True)
            warm([base, *sources])
            row["mergekit"] = timed([args.mergekit, str(cfg), str(theirs), "--device", "cpu"])
            row.update(compare(ours, theirs, s["layers"]))
            if mode not in ("hidden", "hidden_avg", "cheap_embed"):
                row["router_min_cosine"] = None  # random rows: the two tools draw from different generators
            shutil.rmtree(theirs)
        shutil.rmtree(ours)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def warm(models: list[Path]) -> None:
    """Read every model file once, so that each tool starts with the sources in the page cache (a
    run after mergekit's 9 GB would otherwise read them cold from disk, one before it warm)."""
    for model in models:
        for f in sorted(model.iterdir()):
            if f.is_file():
                with open(f, "rb") as fh:
                    while fh.read(64 << 20):
                        pass


CGROUP = Path("/sys/fs/cgroup/memory")  # cgroup v1's memory controller


def capped_run(work: Path, cfg: Path, models: list[Path], cap_mib: int) -> dict:
    """The conversion under a memory cap: a cgroup v1 memory limit (page cache included) when this
    process may create one (root), else ``ulimit -v`` (address space). The models' page cache is
    dropped first, so that the capped run is charged for reading them."""
    capped = work / "ours-capped"
    shutil.rmtree(capped, ignore_errors=True)
    for m in models:
        for f in m.glob("*.safetensors"):
            fd = os.open(f, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
    convert = f"exec {sys.executable} -m ckptforge upcycle --config {cfg} --out {capped} -q"
    group = CGROUP / f"ckptforge-bench-{os.getpid()}"
    if os.access(CGROUP, os.W_OK):
        group.mkdir(exist_ok=True)
        (group / "memory.limit_in_bytes").write_text(str(cap_mib << 20))
        cmd, how = f"echo $$ > {group}/cgroup.procs; {convert}", "cgroup"
    else:
        cmd, how = f"ulimit -v {cap_mib * 1024}; {convert}", "ulimit -v"
    try:
        result = {"cap_mib": cap_mib, "cap": how, **timed(["bash", "-c", cmd]), "ok": True}
    except RuntimeError as exc:  # killed by the cap
        result = {"cap_mib": cap_mib, "cap": how, "ok": False, "error": str(exc)[-300:]}
    if how == "cgroup":
        result["cgroup_max_usage_mib"] = int((group / "memory.max_usage_in_bytes").read_text()) / 2**20
        group.rmdir()
    shutil.rmtree(capped, ignore_errors=True)
    return result


def markdown(rows: list[dict]) -> str:
    lines = ["| size | gate | ckptforge s | RSS MiB | capped run | mergekit s | RSS MiB | speed-up | experts identical "
             "| router cos min |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ours, mk, cap = r["ckptforge"], r.get("mergekit"), r.get("ckptforge_capped")
        capped = "—" if not cap else ("ok under {} MiB ({}), peak RSS {:.0f} MiB".format(
            cap["cap_mib"], cap["cap"], cap["peak_rss_mib"]) if cap["ok"] else "killed under {} MiB".format(cap["cap_mib"]))
        mk_s = "{:.1f}".format(mk["seconds"]) if mk else "—"
        mk_rss = "{:.0f}".format(mk["peak_rss_mib"]) if mk else "—"
        speed = "{:.2f}×".format(mk["seconds"] / ours["seconds"]) if mk else "—"
        cos = r.get("router_min_cosine")
        lines.append(f"| {r['size']} | {r['gate_mode']} | {ours['seconds']:.1f} | {ours['peak_rss_mib']:.0f} | {capped} | "
                     f"{mk_s} | {mk_rss} | {speed} | {r.get('experts_byte_identical', '—')} | "
                     f"{'—' if cos is None else f'{cos:.4f}'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tinyllama")
    parser.add_argument("--gate-modes", nargs="+", default=["random", "hidden"])
    parser.add_argument("--workdir", type=Path, default=Path(".bench-ms"))
    parser.add_argument("--mergekit", help="Path of the mergekit-moe executable (its own venv); omit to skip it.")
    parser.add_argument("--memory-cap", type=int, help="Also run the hidden conversion under ulimit -v MIB.")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = run(args)
    (args.workdir / "multisource.json").write_text(json.dumps(rows, indent=2))
    print(markdown(rows))


if __name__ == "__main__":
    main()
