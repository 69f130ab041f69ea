"""Forward+backward time of each router's MoE layer vs the dense MLP at equal active FLOPs, with the
experts on the per-expert loop (``eager``) and on grouped GEMMs (``grouped_mm``).

d=768, d_ff=3072, E=32, k=2: experts of width d_ff/k so the k active experts cost what the dense
MLP costs (soft/sphero: one slot per expert, width chosen the same way). Reported as dense time /
MoE time (throughput ratio) from the same run; each repeat times every variant once, in turn, and
the medians are reported (a drifting machine affects all variants alike). soft / sphero run their
experts as one batched matmul per group already, so they have one row.

    PYTHONPATH=. python benchmarks/moe_layer.py --images 64                       # the issue's setting
    PYTHONPATH=. python benchmarks/moe_layer.py --images 8 --repeats 2            # quicker on a small CPU
    PYTHONPATH=. python benchmarks/moe_layer.py --device cpu --tiny --json r.json # smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ckptforge.moe import ROUTER_TYPES, build_moe_layer
from ckptforge.moe.experts import grouped_mm_compute_dtype

#: Routers whose experts run on token groups (these compare eager with grouped_mm).
TOKEN_ROUTED = ("topk", "expert-choice", "mh")


def _step(module: nn.Module, x: torch.Tensor) -> float:
    """Seconds of one forward + backward."""
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    module(x).float().sum().backward()
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _router_settings(kind: str, tokens: int, e: int, k: int) -> dict:
    router = {"type": kind, "normalize": True} if kind in ("topk", "mh") else {"type": kind}
    if kind == "mh":
        router["heads"] = 1  # h>1 multiplies routed tokens by h; h=1 keeps active FLOPs equal
    if kind in ("soft", "sphero"):
        # s slots per expert so E·s slots × width d_ff/k = T·d_ff per image: s = T·k/E (core path;
        # sphero's universal path adds 2E experts of ¼ width, i.e. +50% FLOPs)
        router["slots"] = max(1, round(tokens * k / e))
    return router


def variants(args: argparse.Namespace, d: int, d_ff: int, dtype: torch.dtype) -> dict[str, Callable[[], nn.Module]]:
    """Name → builder of every module timed: the dense MLP, then each router × implementation."""
    e, k = args.experts, args.top_k
    out: dict[str, Callable[[], nn.Module]] = {
        "dense": lambda: nn.Sequential(nn.Linear(d, d_ff), nn.GELU(), nn.Linear(d_ff, d)).to(args.device, dtype)}
    for kind in args.routers:
        router = _router_settings(kind, args.tokens, e, k)
        for impl in (args.impl if kind in TOKEN_ROUTED else ["batched"]):
            name = f"{kind}/{impl}" if kind in TOKEN_ROUTED else kind
            out[name] = (lambda router=router, impl=impl: build_moe_layer(
                d, d_ff // k, e, k, "gelu", router,
                experts_implementation="eager" if impl == "batched" else impl).to(args.device, dtype))
    return out


def run(args: argparse.Namespace) -> dict:
    d = args.hidden
    d_ff = 4 * d
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    x = torch.randn(args.images, args.tokens, d, device=args.device, dtype=dtype, requires_grad=True)
    modules = {name: build() for name, build in variants(args, d, d_ff, dtype).items()}
    for module in modules.values():  # warm-up: kernels, allocator, autotuning
        _step(module, x)
    times: dict[str, list[float]] = {name: [] for name in modules}
    for _ in range(args.repeats):
        for name, module in modules.items():
            times[name].append(_step(module, x))
    median = {name: statistics.median(t) for name, t in times.items()}
    auto = grouped_mm_compute_dtype(x, d, d_ff // args.top_k)
    return {
        "device": torch.cuda.get_device_name() if x.is_cuda else "cpu", "dtype": args.dtype,
        "torch": torch.__version__, "images": args.images, "tokens": args.tokens, "hidden": d, "d_ff": d_ff,
        "experts": args.experts, "top_k": args.top_k, "repeats": args.repeats,
        "auto_picks": "grouped_mm" if auto is not None else "eager",
        "ms": {n: round(t * 1e3, 3) for n, t in median.items()},
        "vs_dense": {n: round(median["dense"] / t, 3) for n, t in median.items() if n != "dense"},
        "grouped_vs_loop": {kind: round(median[f"{kind}/eager"] / median[f"{kind}/grouped_mm"], 3)
                            for kind in args.routers if kind in TOKEN_ROUTED
                            and {"eager", "grouped_mm"} <= set(args.impl)},
    }


def markdown(result: dict) -> str:
    lines = [f"{result['device']}, {result['dtype']}, {result['images']}×{result['tokens']} tokens, d={result['hidden']}, "
             f"E={result['experts']}, k={result['top_k']}, median of {result['repeats']} (auto → {result['auto_picks']})",
             "", "| layer | ms fwd+bwd | throughput vs dense |", "|---|---|---|"]
    lines.append(f"| dense MLP | {result['ms']['dense']:.1f} | 1.00× |")
    for name, ratio in result["vs_dense"].items():
        lines.append(f"| {name} | {result['ms'][name]:.1f} | {ratio:.2f}× |")
    for kind, ratio in result["grouped_vs_loop"].items():
        lines.append(f"| {kind}: grouped_mm vs loop | | {ratio:.2f}× |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=197)
    parser.add_argument("--hidden", type=int, default=768, help="d (d_ff = 4d).")
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="Default: bf16 on CUDA, fp32 on CPU.")
    parser.add_argument("--routers", nargs="+", default=list(ROUTER_TYPES), choices=list(ROUTER_TYPES))
    parser.add_argument("--impl", nargs="+", default=["eager", "grouped_mm"], choices=["eager", "grouped_mm", "auto"])
    parser.add_argument("--tiny", action="store_true", help="Smoke test: 2×16 tokens, d=64, E=8, 1 repeat.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the result here.")
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    if args.tiny:
        args.images, args.tokens, args.hidden, args.experts, args.repeats = 2, 16, 64, 8, 1
    result = run(args)
    print(markdown(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
