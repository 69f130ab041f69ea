"""Calibration statistics + co-activation partition for one FFN of realistic size, on this CPU.

Cases: ViT-B (d=768, d_ff=3072, GELU) over 100k tokens, and LLaMA-7B (d=4096, d_ff=11008, SwiGLU)
over 20k tokens. Activations come from a random-init FFN on random inputs (the statistics cost does
not depend on the values). The reference run is the FFN forward alone over the same tokens; the
statistics time is reported as a ratio to it. Each case runs in its own process so its peak RSS is
its own.

    python benchmarks/calibration.py            # both cases, one JSON line each
    python benchmarks/calibration.py --case vit
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ckptforge.calibration import LayerStats  # noqa: E402
from ckptforge.strategies.graph import partition_units  # noqa: E402

CASES = {"vit": dict(d=768, d_ff=3072, tokens=100_000, gated=False, experts=32),
         "llama": dict(d=4096, d_ff=11008, tokens=20_000, gated=True, experts=8)}
BATCH = 4096


def run_case(name: str) -> dict:
    c = CASES[name]
    g = torch.Generator().manual_seed(0)
    up = torch.randn(c["d_ff"], c["d"], generator=g) / c["d"] ** 0.5
    gate = torch.randn(c["d_ff"], c["d"], generator=g) / c["d"] ** 0.5 if c["gated"] else None

    def acts(x: torch.Tensor) -> torch.Tensor:
        if gate is not None:
            return torch.nn.functional.silu(x @ gate.T) * (x @ up.T)
        return torch.nn.functional.gelu(x @ up.T)

    batches = [(i, min(BATCH, c["tokens"] - i)) for i in range(0, c["tokens"], BATCH)]
    x = torch.randn(BATCH, c["d"], generator=g)
    t0 = time.perf_counter()
    for _, n in batches:  # reference: the FFN forward alone
        acts(x[:n])
    forward_s = time.perf_counter() - t0
    stats = LayerStats(c["d_ff"], c["d"], needs={"scores", "coactivation"})
    stats_s = 0.0
    for _, n in batches:  # time the statistics update alone (subtracting the forward is noisy)
        a = acts(x[:n])
        t0 = time.perf_counter()
        stats.update(a)
        stats_s += time.perf_counter() - t0
    t0 = time.perf_counter()
    parts = partition_units(stats.coactivation, c["experts"])
    partition_s = time.perf_counter() - t0
    return {"case": name, **c, "threads": torch.get_num_threads(), "forward_s": round(forward_s, 2),
            "stats_s": round(stats_s, 2), "stats_tokens_per_s": round(c["tokens"] / stats_s),
            "stats_over_forward": round(stats_s / forward_s, 2), "graph_metis_s": round(partition_s, 2),
            "end_to_end_s": round(forward_s + stats_s + partition_s, 2),
            "part_sizes": sorted({p.numel() for p in parts}),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", choices=sorted(CASES))
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case)), flush=True)
        return
    for name in CASES:
        subprocess.run([sys.executable, __file__, "--case", name], check=True)


if __name__ == "__main__":
    main()
