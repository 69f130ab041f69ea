"""Forward+backward time of each router's MoE layer vs the dense MLP at equal active FLOPs.

d=768, d_ff=3072, E=32, k=2: experts of width d_ff/k so the k active experts cost what the dense
MLP costs (soft/sphero: one slot per expert, width chosen the same way). Reported as dense time /
MoE time (throughput ratio) from the same run.

    PYTHONPATH=. python benchmarks/moe_layer.py --images 64             # the issue's setting
    PYTHONPATH=. python benchmarks/moe_layer.py --images 8 --repeats 2  # quicker on a small CPU
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from ckptforge.moe import ROUTER_TYPES, build_moe_layer


def _time(module: nn.Module, x: torch.Tensor, repeats: int) -> float:
    for _ in range(1 + repeats):
        if _ == 1:
            if x.is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
        module(x).float().sum().backward()
    if x.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=197)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    d, d_ff, e, k = 768, 3072, 32, 2
    torch.manual_seed(0)
    x = torch.randn(args.images, args.tokens, d, device=args.device, dtype=dtype, requires_grad=True)
    dense = nn.Sequential(nn.Linear(d, d_ff), nn.GELU(), nn.Linear(d_ff, d)).to(args.device, dtype)
    t_dense = _time(dense, x, args.repeats)
    print(f"device={args.device} dtype={dtype} tokens={args.images}x{args.tokens} d={d} E={e} k={k}")
    print(f"dense MLP: {t_dense * 1e3:.1f} ms fwd+bwd")
    for kind in ROUTER_TYPES:
        router = {"type": kind, "normalize": True} if kind in ("topk", "mh") else {"type": kind}
        if kind == "mh":
            router["heads"] = 1  # h>1 multiplies routed tokens by h; h=1 keeps active FLOPs equal
        if kind in ("soft", "sphero"):
            # s slots per expert so E·s slots × width d_ff/k = T·d_ff per image: s = T·k/E (core path;
            # sphero's universal path adds 2E experts of ¼ width, i.e. +50% FLOPs)
            router["slots"] = max(1, round(args.tokens * k / e))
        moe = build_moe_layer(d, d_ff // k, e, k, "gelu", router).to(args.device, dtype)
        t = _time(moe, x, args.repeats)
        print(f"{kind:14s} {t * 1e3:8.1f} ms   throughput vs dense: {t_dense / t:.2f}x")


if __name__ == "__main__":
    main()
