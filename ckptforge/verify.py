"""Prove a conversion: run the dense and the MoE model on the same inputs and compare.

Reports, per MoE layer, the max-abs and relative L2 error of that layer's output hidden states,
and the same for the final output (logits, or the last hidden state of a bare encoder).

    >>> report = verify_model("out/tiny-vit-moe")                   # doctest: +SKIP
    >>> report.passed, report.final.relative < 1e-5                 # doctest: +SKIP
    (True, True)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ckptforge.errors import SourceError, VerificationFailed
from ckptforge.io.source import DenseCheckpoint, open_checkpoint, sha256_file
from ckptforge.loading import load_model

@dataclass
class Error:
    max_abs: float
    relative: float


@dataclass
class VerifyReport:
    """Per-MoE-layer and final-output errors, the tolerance and whether the check passed."""

    moe_dir: str
    against: str
    tol: float
    layers: dict[int, Error]
    final: Error
    inputs: str
    exact_expected: bool
    passed: bool = field(init=False)

    def __post_init__(self) -> None:
        worst = max([self.final.relative, *(e.relative for e in self.layers.values())])
        self.passed = worst <= self.tol

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = {str(k): asdict(v) for k, v in self.layers.items()}
        return d

    def to_markdown(self) -> str:
        status = "passed" if self.passed else "above tolerance"
        rows = [f"| layer {k} | {e.max_abs:.3e} | {e.relative:.3e} |" for k, e in self.layers.items()]
        rows.append(f"| final output | {self.final.max_abs:.3e} | {self.final.relative:.3e} |")
        gap = "" if self.exact_expected else (
            "\n\nThis strategy does not reproduce the dense function at init; the numbers are its "
            "*init gap*, which fine-tuning (`ckptforge finetune`) closes."
        )
        return (
            f"`ckptforge verify` against `{self.against}` on {self.inputs}: **{status}** (tol {self.tol:g}, "
            "relative L2).\n\n| output | max abs error | relative error |\n|---|---|---|\n"
            + "\n".join(rows) + gap
        )


def verify_model(
    moe_dir: str | Path,
    against: str | DenseCheckpoint | None = None,
    *,
    tol: float = 1e-5,
    batch_size: int = 2,
    seq_len: int = 16,
    seed: int = 0,
    options: dict[str, Any] | None = None,
) -> VerifyReport:
    """Compare the MoE at ``moe_dir`` with its dense source (from ``ckptforge.json`` unless given)."""
    moe_dir = Path(moe_dir)
    if not moe_dir.is_dir():
        raise SourceError(f"'{moe_dir}' is not a directory; pass a ckptforge output directory")
    moe_config = open_checkpoint(moe_dir).config  # every shard's header and size checked: exit 3 if broken
    provenance = check_recorded_hashes(moe_dir)
    if against is None:
        against = (provenance.get("source") or {}).get("ref")
        if against is None:
            raise SourceError(f"'{moe_dir}' has no ckptforge.json naming its source; pass --against SOURCE")
    dense_ckpt = against if isinstance(against, DenseCheckpoint) else open_checkpoint(against)
    options = options or provenance.get("options") or {}
    dense = load_model(_weights_path(dense_ckpt), dense_ckpt.config)
    moe = load_model(moe_dir, moe_config)
    inputs, description = make_inputs(dense_ckpt.config, batch_size, seq_len, seed)
    with torch.no_grad():
        d_out = dense(**inputs, output_hidden_states=True)
        m_out = moe(**inputs, output_hidden_states=True)
    layers = {
        layer: _error(d_out.hidden_states[layer + 1], m_out.hidden_states[layer + 1])
        for layer in _moe_layers(moe_config)
    }
    final_key = "logits" if getattr(d_out, "logits", None) is not None else "last_hidden_state"
    final = _error(getattr(d_out, final_key), getattr(m_out, final_key))
    return VerifyReport(str(moe_dir), dense_ckpt.source, tol, layers, final, description,
                        _exact(options) and _exact_router(moe_config.get("moe_router")))


def check_recorded_hashes(moe_dir: Path) -> dict[str, Any]:
    """The provenance in ``moe_dir/ckptforge.json`` after checking every file's recorded sha256
    (:class:`VerificationFailed` naming the first file edited since conversion); {} when absent."""
    from ckptforge.hub import read_provenance

    if not (moe_dir / "ckptforge.json").is_file():
        return {}
    meta = read_provenance(moe_dir, "pass --against SOURCE")
    for name, digest in sorted(meta["files"].items()):
        path = moe_dir / name
        if not path.is_file():
            raise SourceError(f"'{path}' is listed in ckptforge.json but missing; restore it or re-run 'ckptforge upcycle'")
        if sha256_file(path) != digest:
            raise VerificationFailed(f"'{path}' changed since conversion (its sha256 differs from the one in "
                                     "ckptforge.json); restore it or re-run 'ckptforge upcycle'")
    return meta


def _exact(options: dict[str, Any]) -> bool:
    """Whether the recorded strategy reproduces the dense function (then the tolerance is the claim)."""
    from ckptforge.strategies import STRATEGIES

    strategy = STRATEGIES.get(options.get("strategy", ""))
    return strategy is not None and strategy.exact(options.get("strategy_params") or {})


def _exact_router(router: dict[str, Any] | None) -> bool:
    """Only renormalised top-k without a capacity limit keeps copy-all experts exactly dense (issue 4)."""
    router = router or {"type": "topk", "normalize": True}
    return router.get("type", "topk") == "topk" and router.get("normalize", True) and not router.get("capacity_factor")


def make_inputs(config: dict[str, Any], batch_size: int, seq_len: int, seed: int) -> tuple[dict[str, torch.Tensor], str]:
    """Seeded inputs of the model's modality: images for ViT, token ids for text models."""
    g = torch.Generator().manual_seed(seed)
    if config.get("model_type", "").startswith("vit"):
        size = config.get("image_size", 224)
        size = size if isinstance(size, int) else size[0]
        shape = (batch_size, config.get("num_channels", 3), size, size)
        return {"pixel_values": torch.randn(shape, generator=g)}, f"{batch_size} random images {tuple(shape[1:])}"
    vocab = int(config.get("vocab_size", 1000))
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
    return {"input_ids": ids}, f"{batch_size}×{seq_len} random token ids"


def _moe_layers(config: dict[str, Any]) -> list[int]:
    from ckptforge.families.base import stock_moe_layers

    return stock_moe_layers(config)


def _error(reference: torch.Tensor, candidate: torch.Tensor) -> Error:
    ref, cand = reference.double(), candidate.double()
    diff = cand - ref
    norm = ref.norm().item()
    return Error(diff.abs().max().item(), diff.norm().item() / norm if norm else diff.norm().item())


def _weights_path(ckpt: DenseCheckpoint) -> Path:
    if len(ckpt.weight_files) == 1 and ckpt.weight_files[0].name not in ("model.safetensors", "pytorch_model.bin"):
        return ckpt.weight_files[0]
    return ckpt.root
