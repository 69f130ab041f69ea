"""Tiny dense models built from configs with random weights (d=32, 2–4 layers), saved with the
installed transformers' own ``save_pretrained``; and helpers to run the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
import transformers

REPO = Path(__file__).resolve().parents[1]

#: family name → (config class, model class, config kwargs); every family of the registry has one.
TINY = {
    "vit": (transformers.ViTConfig, transformers.ViTForImageClassification, dict(
        image_size=28, patch_size=7, num_channels=1, hidden_size=32, num_hidden_layers=4,
        num_attention_heads=2, intermediate_size=64, num_labels=10)),
    "vit-base-model": (transformers.ViTConfig, transformers.ViTModel, dict(
        image_size=16, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64)),
    "bert": (transformers.BertConfig, transformers.BertForSequenceClassification, dict(
        vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=3)),
    "bert-mlm": (transformers.BertConfig, transformers.BertForMaskedLM, dict(
        vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64)),
    "bert-base-model": (transformers.BertConfig, transformers.BertModel, dict(
        vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64)),
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=64)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=64, sliding_window=8)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=64)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, intermediate_size=64, max_position_embeddings=64)),
}

#: A representative tiny model per registered family.
FAMILY_MODELS = {"vit": "vit", "bert": "bert", "llama": "llama", "qwen3": "qwen3"}


def build_tiny(kind: str, directory: Path, seed: int = 0, **overrides) -> Path:
    """Build the tiny ``kind`` model with random weights and ``save_pretrained`` it to ``directory``."""
    config_cls, model_cls, kwargs = TINY[kind]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**kwargs, **overrides}))
    with torch.no_grad():  # biases are zero at init; make them non-zero so a dropped bias shows
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    model.save_pretrained(directory)
    return directory


@pytest.fixture
def tiny(tmp_path: Path) -> Callable[..., Path]:
    """``tiny("vit")`` → path of a freshly saved tiny dense checkpoint."""

    def make(kind: str, name: str | None = None, **overrides) -> Path:
        return build_tiny(kind, tmp_path / (name or f"dense-{kind}"), **overrides)

    return make


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    """A tiny dense ViT shared by the tests of one module."""
    return build_tiny("vit", tmp_path_factory.mktemp("dense") / "vit")


@pytest.fixture(scope="module")
def converted(dense, tmp_path_factory) -> Path:
    """``dense`` upcycled to 4 copy-all experts (every other layer)."""
    import ckptforge

    out = tmp_path_factory.mktemp("moe") / "vit-moe"
    ckptforge.upcycle(dense, out, ckptforge.UpcycleOptions(num_experts=4))
    return out


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for CLI subprocesses: this checkout's package first on the path, offline Hub."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.update(extra)
    return env


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
            timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python -m ckptforge ARGS`` in a subprocess and return the completed process."""
    return subprocess.run(
        [sys.executable, "-m", "ckptforge", *args], cwd=cwd, env=env or cli_env(),
        capture_output=True, text=True, timeout=timeout,
    )


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
