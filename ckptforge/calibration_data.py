"""Calibration inputs: a folder of images, a ``.txt`` / ``.jsonl`` text file, or a Hugging Face
dataset (id or directory), turned into model-ready batches with the checkpoint's own image
processor / tokenizer.

    >>> data = load_calibration("imgs/", ckpt, samples=64, batch_size=16)     # doctest: +SKIP
    >>> next(iter(data.batches()))["pixel_values"].shape                      # doctest: +SKIP
    torch.Size([16, 1, 28, 28])
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from ckptforge.errors import CalibrationError
from ckptforge.io.inputs import (
    IMAGE_COLUMNS, IMAGE_SUFFIXES, TEXT_COLUMNS, is_dataset_dir, is_image_file, load_image_processor, load_tokenizer,
    open_dataset, text_of,
)
from ckptforge.io.source import DenseCheckpoint

TEXT_SUFFIXES = (".txt", ".jsonl")


@dataclass
class CalibrationSet:
    """Preprocessed calibration samples (all in memory, one dict of tensors) and where they came from."""

    source: str
    kind: str  # "image" | "text"
    inputs: dict[str, torch.Tensor]
    batch_size: int
    fingerprint: str
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return next(iter(self.inputs.values())).shape[0]

    def batches(self, start: int = 0, stop: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Model input dicts of ``batch_size`` samples from samples ``start:stop``."""
        stop = self.num_samples if stop is None else stop
        for i in range(start, stop, self.batch_size):
            yield {k: v[i:min(i + self.batch_size, stop)] for k, v in self.inputs.items()}

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "kind": self.kind, "samples": self.num_samples,
                "batch_size": self.batch_size, "fingerprint": self.fingerprint, **self.details}


def load_calibration(path: str | Path, ckpt: DenseCheckpoint, modality: str, *, samples: int = 256,
                     batch_size: int = 16, seed: int = 0, max_length: int = 128) -> CalibrationSet:
    """Read up to ``samples`` calibration samples from ``path`` and preprocess them for ``ckpt``.

    ``modality`` is the model's (``image`` or ``text``); data of the other kind raises
    :class:`CalibrationError`, as do empty folders and files.
    """
    if samples < 1 or batch_size < 1:
        raise CalibrationError(f"--calib-samples {samples} and --calib-batch-size {batch_size} must be at least 1")
    p = Path(path)
    if p.is_file():
        if p.suffix.lower() not in TEXT_SUFFIXES:
            raise CalibrationError(f"calibration file '{p}' is not .txt or .jsonl; pass a text file, "
                                   "a folder of images or a dataset")
        kind, raw = "text", read_text_samples(p, samples)
    elif p.is_dir() and not is_dataset_dir(p):
        kind, raw = "image", _image_files(p)
    else:
        kind, raw = _read_dataset(str(path))
    if kind != modality:
        want = "a folder of images" if modality == "image" else "a .txt/.jsonl file or a text dataset"
        raise CalibrationError(f"calibration data '{path}' is {kind} but the model takes {modality} input; pass {want}")
    raw = _subsample(raw, samples, seed)
    inputs = _preprocess_images(raw, ckpt) if kind == "image" else _tokenise(raw, ckpt, max_length)
    digest = hashlib.sha256()
    for key in sorted(inputs):
        digest.update(key.encode() + inputs[key].contiguous().numpy().tobytes())
    return CalibrationSet(str(path), kind, inputs, batch_size, digest.hexdigest()[:16])


def _image_files(folder: Path) -> list[Path]:
    files = sorted(f for f in folder.rglob("*") if f.is_file() and is_image_file(f))
    if not files:
        raise CalibrationError(f"calibration folder '{folder}' has no images ({'/'.join(IMAGE_SUFFIXES)}); put images in it "
                               "(nested folders are fine) or pass a .txt/.jsonl file")
    return files


def read_text_samples(path: Path, limit: int) -> list[str]:
    """The first ``limit`` non-empty samples of a .txt (one per line) or .jsonl ({"text": …} per
    line) file, read line by line: a large file is read only as far as the samples it gives."""
    texts: list[str] = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if len(texts) >= limit:
                    break
                text = _jsonl_text(path, n, line) if path.suffix.lower() == ".jsonl" and line.strip() else line
                if text and text.strip():
                    texts.append(text.rstrip("\r\n"))
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"calibration file '{path}' is not UTF-8 text (invalid byte at position "
                               f"{exc.start} of a line); save it as UTF-8") from None
    if not texts:
        raise CalibrationError(f"calibration file '{path}' has no text; put one sample per line (.txt) "
                               "or one {\"text\": …} object per line (.jsonl)")
    return texts


def _jsonl_text(path: Path, n: int, line: str) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        raise CalibrationError(f"'{path}' line {n} is not JSON; write one {{\"text\": …}} object per line") from None
    return text_of(row) if isinstance(row, dict) else str(row)


def _read_dataset(ref: str) -> tuple[str, list[Any]]:
    ds = open_dataset(ref, "--calibration")
    for column in IMAGE_COLUMNS:
        if column in ds.column_names:
            return "image", list(ds[column])
    for column in TEXT_COLUMNS:
        if column in ds.column_names:
            return "text", [t for t in ds[column] if isinstance(t, str) and t.strip()]
    raise CalibrationError(f"dataset '{ref}' has no image ({'/'.join(IMAGE_COLUMNS)}) or text "
                           f"({'/'.join(TEXT_COLUMNS)}) column; its columns are {', '.join(ds.column_names)}")


def _subsample(items: list[Any], samples: int, seed: int) -> list[Any]:
    """A seeded subset (sorted folders group classes together; the first N would be one class)."""
    if len(items) <= samples:
        return items
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))[:samples]
    return [items[i] for i in sorted(order.tolist())]


def _preprocess_images(images: list[Any], ckpt: DenseCheckpoint) -> dict[str, torch.Tensor]:
    return {"pixel_values": load_image_processor(ckpt.root, ckpt.config).pixels(images)}


def _tokenise(texts: list[str], ckpt: DenseCheckpoint, max_length: int) -> dict[str, torch.Tensor]:
    tokenizer = load_tokenizer(ckpt.root, "text calibration")
    limit = min(max_length, int(ckpt.config.get("max_position_embeddings", max_length)))
    enc = tokenizer(texts, padding=True, truncation=True, max_length=limit, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
