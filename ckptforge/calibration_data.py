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

from ckptforge.errors import CalibrationError, HubError
from ckptforge.io.inputs import open_image
from ckptforge.io.source import DenseCheckpoint

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
TEXT_SUFFIXES = (".txt", ".jsonl")
_DATASET_FILES = ("dataset_info.json", "dataset_dict.json", "state.json")
_IMAGE_COLUMNS = ("image", "img", "pixel_values")
_TEXT_COLUMNS = ("text", "sentence", "content", "document")


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
    elif p.is_dir() and not _is_dataset_dir(p):
        kind, raw = "image", _image_files(p)
    else:
        kind, raw = _read_dataset(str(path))
    if kind != modality:
        want = "a folder of .jpg/.png images" if modality == "image" else "a .txt/.jsonl file or a text dataset"
        raise CalibrationError(f"calibration data '{path}' is {kind} but the model takes {modality} input; pass {want}")
    raw = _subsample(raw, samples, seed)
    inputs = _preprocess_images(raw, ckpt) if kind == "image" else _tokenise(raw, ckpt, max_length)
    digest = hashlib.sha256()
    for key in sorted(inputs):
        digest.update(key.encode() + inputs[key].contiguous().numpy().tobytes())
    return CalibrationSet(str(path), kind, inputs, batch_size, digest.hexdigest()[:16])


def _image_files(folder: Path) -> list[Path]:
    files = sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CalibrationError(f"calibration folder '{folder}' has no .jpg/.jpeg/.png images; put images in it "
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
    return _text_of(row) if isinstance(row, dict) else str(row)


def _text_of(row: dict[str, Any]) -> str:
    for column in _TEXT_COLUMNS:
        if isinstance(row.get(column), str):
            return row[column]
    return next((v for v in row.values() if isinstance(v, str)), "")


def _is_dataset_dir(path: Path) -> bool:
    if any((path / f).is_file() for f in _DATASET_FILES):
        return True
    return not any(f.suffix.lower() in IMAGE_SUFFIXES for f in path.rglob("*")) and any(
        f.suffix in (".arrow", ".parquet") for f in path.rglob("*"))


def _read_dataset(ref: str) -> tuple[str, list[Any]]:
    import datasets

    try:
        if Path(ref).is_dir() and any((Path(ref) / f).is_file() for f in _DATASET_FILES[1:]):
            ds = datasets.load_from_disk(ref)
        else:
            ds = datasets.load_dataset(ref)
    except FileNotFoundError:
        raise CalibrationError(f"calibration data '{ref}' is not a file, an image folder or a dataset; "
                               "check the path or the dataset id") from None
    except Exception as exc:  # datasets raises many kinds for offline / missing repos
        raise HubError(f"could not load dataset '{ref}': {' '.join(str(exc).split())[:200]}; check the id, "
                       "the network or HF_HUB_OFFLINE with a cached copy") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    for column in _IMAGE_COLUMNS:
        if column in ds.column_names:
            return "image", list(ds[column])
    for column in _TEXT_COLUMNS:
        if column in ds.column_names:
            return "text", [t for t in ds[column] if isinstance(t, str) and t.strip()]
    raise CalibrationError(f"dataset '{ref}' has no image ({'/'.join(_IMAGE_COLUMNS)}) or text "
                           f"({'/'.join(_TEXT_COLUMNS)}) column; its columns are {', '.join(ds.column_names)}")


def _subsample(items: list[Any], samples: int, seed: int) -> list[Any]:
    """A seeded subset (sorted folders group classes together; the first N would be one class)."""
    if len(items) <= samples:
        return items
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))[:samples]
    return [items[i] for i in sorted(order.tolist())]


def _preprocess_images(images: list[Any], ckpt: DenseCheckpoint) -> dict[str, torch.Tensor]:
    config = ckpt.config
    channels = int(config.get("num_channels", 3))
    size = config.get("image_size", 224)
    size = size if isinstance(size, int) else size[0]
    mode = "L" if channels == 1 else "RGB"
    pil = [open_image(i, mode) if isinstance(i, (str, Path)) else i.convert(mode) for i in images]
    if (ckpt.root / "preprocessor_config.json").is_file():
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(str(ckpt.root))
        pixels = processor(images=pil, return_tensors="pt")["pixel_values"]
    else:  # no processor saved: resize to the config's size, scale to [-1, 1] (ViT's defaults)
        arrays = [torch.tensor(list(im.resize((size, size)).getdata()), dtype=torch.float32) for im in pil]
        pixels = torch.stack(arrays).reshape(len(pil), size, size, channels).permute(0, 3, 1, 2) / 127.5 - 1
    if pixels.shape[1:] != (channels, size, size):
        raise CalibrationError(f"preprocessed images have shape {tuple(pixels.shape[1:])}, the model wants "
                               f"{(channels, size, size)}; fix preprocessor_config.json in {ckpt.root}")
    return {"pixel_values": pixels.float()}


def _tokenise(texts: list[str], ckpt: DenseCheckpoint, max_length: int) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(ckpt.root))
    except (OSError, ValueError, TypeError):
        raise CalibrationError(f"the checkpoint at {ckpt.root} has no tokenizer files; add the tokenizer "
                               "(tokenizer.json / tokenizer_config.json) next to config.json") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    limit = min(max_length, int(ckpt.config.get("max_position_embeddings", max_length)))
    enc = tokenizer(texts, padding=True, truncation=True, max_length=limit, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
