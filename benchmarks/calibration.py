"""Calibration statistics + co-activation partition for one FFN of realistic size, on this CPU.

Cases: ViT-B (d=768, d_ff=3072, GELU) over 100k tokens, and LLaMA-7B (d=4096, d_ff=11008, SwiGLU)
over 20k tokens. Activations come from a random-init FFN on random inputs (the statistics cost does
not depend on the values). The reference run is the FFN forward alone over the same tokens; the
statistics time is reported as a ratio to it. Each case runs in its own process so its peak RSS is
its own.

    python benchmarks/calibration.py            # both cases, one JSON line each
    python benchmarks/calibration.py --case vit

``--pass`` measures the whole calibration pass instead: a random-init ViT-B/16 (224 px), the hooked
forward that collects the statistics of the MoE layers (every-2: 1, 3, …, 11) against the bare
forward over the same batches, alternating, in the same process; once for what ``importance``
needs (scores) and once for ``coactivation`` (scores + co-activation counts).

    python benchmarks/calibration.py --pass --images 64 --batch 16     # the issue's whole-pass ratio
    python benchmarks/calibration.py --pass --tiny                     # smoke test
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


def run_pass(images: int, batch: int, tiny: bool) -> dict:
    """Whole calibration pass (hooked forward + statistics) vs the bare forward, same batches."""
    import transformers

    from ckptforge.calibration import LayerStats, _HookedForward, release_scratch
    from ckptforge.families import detect_family

    size = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=2, image_size=32,
                patch_size=8) if tiny else {}
    config = transformers.ViTConfig(**size)
    torch.manual_seed(0)
    model = transformers.ViTModel(config, add_pooling_layer=False).eval()
    family = detect_family(config.to_dict())
    layers = list(range(1, config.num_hidden_layers, 2))
    g = torch.Generator().manual_seed(0)
    pixels = [torch.randn(min(batch, images - i), 3, config.image_size, config.image_size, generator=g)
              for i in range(0, images, batch)]
    out = {"images": images, "batch": batch, "layers": layers, "threads": torch.get_num_threads(),
           "hidden": config.hidden_size, "d_ff": config.intermediate_size}
    with torch.no_grad():
        model(pixel_values=pixels[0])  # warm-up
        for name, needs in (("importance", {"scores"}), ("coactivation", {"scores", "coactivation"})):
            stats = {i: LayerStats(config.intermediate_size, config.hidden_size, needs=needs) for i in layers}
            runner = _HookedForward(model, family, layers, stats, want_inputs=False)
            bare = hooked = 0.0
            for x in pixels:  # alternate, so drift on a shared machine hits both alike
                t0 = time.perf_counter()
                model(pixel_values=x)
                bare += time.perf_counter() - t0
                with runner.hooked():
                    t0 = time.perf_counter()
                    runner.forward({"pixel_values": x})
                    hooked += time.perf_counter() - t0
            release_scratch()
            out[name] = {"bare_forward_s": round(bare, 3), "calibration_pass_s": round(hooked, 3),
                         "ratio": round(hooked / bare, 3)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", choices=sorted(CASES))
    parser.add_argument("--pass", dest="whole_pass", action="store_true", help="Whole calibration pass vs forward.")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    if args.whole_pass:
        print(json.dumps(run_pass(args.images, args.batch, args.tiny)), flush=True)
        return
    if args.case:
        print(json.dumps(run_case(args.case)), flush=True)
        return
    for name in CASES:
        subprocess.run([sys.executable, __file__, "--case", name], check=True)


if __name__ == "__main__":
    main()
