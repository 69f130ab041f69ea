"""Tiny multi-source setups: a base and 'fine-tunes' whose FFN tensors are perturbed (or filled with
a constant fingerprint per source, so it is obvious where each expert came from)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from calib_helpers import add_tokenizer
from conftest import build_tiny

FFN_ROLES = ("gate_proj", "up_proj", "down_proj")


def finetune(base: Path, dest: Path, seed: int, fingerprint: float | None = None, std: float = 0.05) -> Path:
    """A copy of ``base`` whose FFN weights are perturbed (seeded), or all equal to ``fingerprint``."""
    shutil.copytree(base, dest)
    state = load_file(dest / "model.safetensors")
    g = torch.Generator().manual_seed(1000 + seed)
    for name, w in state.items():
        if ".mlp." in name:
            state[name] = (torch.full_like(w, fingerprint) if fingerprint is not None
                           else w + torch.randn(w.shape, generator=g) * std)
    save_file(state, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def family_setup(root: Path, kind: str = "llama", experts: int = 3, fingerprints: bool = False,
                 layers: int = 3, **overrides) -> tuple[Path, list[Path]]:
    """A tokenized base and ``experts`` fine-tunes of it."""
    base = add_tokenizer(build_tiny(kind, root / "base", num_hidden_layers=layers, **overrides))
    sources = [finetune(base, root / f"ft{e}", e, fingerprint=float(e + 1) if fingerprints else None)
               for e in range(experts)]
    return base, sources


def write_config(path: Path, base: Path, sources: list[Path], gate_mode: str = "random",
                 prompts: list[list[str]] | None = None, **extra) -> Path:
    """A mergekit-moe YAML."""
    experts = []
    for i, s in enumerate(sources):
        e = {"source_model": str(s)}
        if prompts is not None:
            e["positive_prompts"] = prompts[i]
        experts.append(e)
    data = {"base_model": str(base), "gate_mode": gate_mode, "experts": experts, **extra}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def read_config(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())
