"""Calibration data built in the test: image folders, text files, tokenizers for tiny models."""

from __future__ import annotations

from pathlib import Path

import numpy as np

WORDS = "the cat sat on a mat while dogs ran far and fast under big red sun".split()


def image_folder(root: Path, count: int = 12, size: int = 28, nested: bool = True, seed: int = 0) -> Path:
    """PNG images (grey, random) in class sub-folders (or flat)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = root / str(i % 3) if nested else root
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def add_tokenizer(model_dir: Path) -> Path:
    """Save a word-level fast tokenizer (ids < 20) next to a tiny text model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1, **{w: i + 2 for i, w in enumerate(dict.fromkeys(WORDS))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(model_dir)
    return model_dir


def text_file(path: Path, lines: int = 12, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    path.write_text("\n".join(" ".join(rng.choice(WORDS, size=rng.integers(3, 10))) for _ in range(lines)) + "\n")
    return path
