"""The one input module: what the data files of calibration, ``finetune``, ``eval`` and ``routes``
may be (image suffixes, dataset columns), how they are read, and how an image or a text reaches
the model — always through the checkpoint's own image processor and tokenizer
(:func:`load_image_processor`, :func:`load_tokenizer`), so one image gives the same pixels in
every command.

A corrupt, truncated or decompression-bomb image, or text that is not UTF-8, is a one-line
:class:`UsageError` naming the file.

    >>> open_image("digits/0/a.png", "L").size          # doctest: +SKIP
    (28, 28)
    >>> read_utf8(Path("notes.txt"))[:5]                 # doctest: +SKIP
    'Hello'
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptforge.errors import UsageError

if TYPE_CHECKING:
    import torch


def open_image(path: str | os.PathLike[str], mode: str) -> Any:
    """The decoded image at ``path`` converted to ``mode`` ("L" or "RGB").

    Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) is enforced as an error, not
    a warning, so a tiny file that decodes into gigabytes is refused before it is decoded.
    """
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as image:
                return image.convert(mode)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise UsageError(f"image '{path}' has more pixels than Pillow's limit of {Image.MAX_IMAGE_PIXELS:,} "
                             "(a decompression bomb?); remove it or pass a smaller image") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise UsageError(f"image '{Path(path)}' cannot be decoded ({reason[:120]}); remove or replace it") from None


def read_utf8(path: Path) -> str:
    """The whole text of ``path``; :class:`UsageError` when it is not UTF-8."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"'{path}' is not UTF-8 text (invalid byte at position {exc.start}); save it as UTF-8") from None


# --- what the data files may be ------------------------------------------------------------------

#: Image files every command reads (calibration folders, finetune/eval class folders, routes --input).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
#: Dataset columns that hold an image or a text, first match wins.
IMAGE_COLUMNS = ("image", "img", "pixel_values")
TEXT_COLUMNS = ("text", "sentence", "content", "document")
#: Files that mark a ``datasets.save_to_disk`` directory.
SAVED_DATASET_FILES = ("dataset_info.json", "dataset_dict.json", "state.json")
#: Files a tokenizer is built from; a model directory with none of them has no tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json")


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` has one of :data:`IMAGE_SUFFIXES` (any case)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a directory written by ``datasets``' ``save_to_disk``."""
    return any((path / name).is_file() for name in SAVED_DATASET_FILES)


def is_dataset_dir(path: Path) -> bool:
    """Whether the directory ``path`` holds a dataset rather than images: a ``save_to_disk`` output,
    or Arrow / Parquet files and no image file."""
    if is_saved_dataset(path):
        return True
    tables = False
    for f in path.rglob("*"):  # stops at the first image: an image folder is not listed twice
        if is_image_file(f):
            return False
        tables = tables or f.suffix in (".arrow", ".parquet")
    return tables


def open_dataset(ref: str, flag: str) -> Any:
    """The rows of a Hugging Face dataset: a ``save_to_disk`` directory, a folder of Arrow / Parquet
    files or a Hub dataset id; its ``train`` split, else its first. One rule for calibration,
    finetune and eval: a local path that is none of these, or a name found nowhere, is refused
    (:class:`UsageError`, exit 2); the Hub or the network failing is a :class:`HubError` (exit 4)."""
    import datasets

    from ckptforge.errors import HubError

    path = Path(ref).expanduser()
    local = path.exists()
    if local and not (path.is_dir() and is_dataset_dir(path)):
        raise UsageError(f"{flag} '{ref}' is not a dataset (a save_to_disk folder, Arrow/Parquet files or a Hub id) "
                         "nor data this command reads directly; see --help")
    try:
        if local and any((path / name).is_file() for name in SAVED_DATASET_FILES[1:]):
            ds = datasets.load_from_disk(str(path))
        else:
            ds = datasets.load_dataset(str(path) if local else ref)
    except FileNotFoundError:
        raise UsageError(f"{flag} '{ref}' is not a file, a folder or a dataset id; check the path or the id") from None
    except Exception as exc:  # datasets raises many kinds for offline / missing repos and unreadable files
        reason = f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
        if local:
            raise UsageError(f"{flag} '{ref}': the dataset cannot be read ({reason}); check its files") from None
        raise HubError(f"could not load dataset '{ref}' ({reason}); check the id and the network, or set "
                       "HF_HUB_OFFLINE=1 with a cached copy") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    return ds


def text_of(row: dict[str, Any]) -> str:
    """The text of a JSON/dataset row: its first :data:`TEXT_COLUMNS` column, else its first string."""
    for column in TEXT_COLUMNS:
        if isinstance(row.get(column), str):
            return row[column]
    return next((v for v in row.values() if isinstance(v, str)), "")


# --- the checkpoint's own preprocessing ----------------------------------------------------------

#: The processor of a ViT checkpoint that ships no ``preprocessor_config.json``: transformers'
#: ViTImageProcessor defaults — bilinear resize to the config's ``image_size``, scale to [0, 1],
#: normalise with mean 0.5 and std 0.5 per channel (pixels in [-1, 1]).
FALLBACK_PROCESSOR = {"image_processor_type": "ViTImageProcessor", "do_resize": True, "resample": 2,
                      "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": False}


@dataclass(frozen=True)
class ImageInputs:
    """How images reach a model: the checkpoint's image processor (``root``'s own, or
    :data:`FALLBACK_PROCESSOR`) and the (channels, size, size) the model takes."""

    processor: Any
    channels: int
    size: int
    root: Path

    def pixels(self, images: Sequence[Any]) -> torch.Tensor:
        """(N, C, H, W) float32 ``pixel_values`` of ``images`` (paths or PIL images)."""
        mode = "L" if self.channels == 1 else "RGB"
        pil = [open_image(i, mode) if isinstance(i, (str, os.PathLike)) else i.convert(mode) for i in images]
        out = self.processor(images=pil, return_tensors="pt")["pixel_values"].float()
        if out.shape[1:] != (self.channels, self.size, self.size):
            raise UsageError(f"preprocessed images have shape {tuple(out.shape[1:])}, the model wants "
                             f"{(self.channels, self.size, self.size)}; fix preprocessor_config.json in {self.root}")
        return out


def load_image_processor(model_dir: str | os.PathLike[str], config: Mapping[str, Any]) -> ImageInputs:
    """The image preprocessing of the checkpoint in ``model_dir`` (``config``: its config.json).

    Its ``preprocessor_config.json`` through ``AutoImageProcessor`` when it has one, else
    :data:`FALLBACK_PROCESSOR` sized from ``config``; every command that feeds images uses this.

        >>> load_image_processor("examples/tiny-vit-mnist", cfg).pixels(["3.png"]).shape  # doctest: +SKIP
        torch.Size([1, 1, 28, 28])
    """
    from transformers import AutoImageProcessor

    root = Path(model_dir)
    channels = int(config.get("num_channels", 3))
    size = config.get("image_size", 224)
    size = int(size if isinstance(size, int) else size[0])
    if (root / "preprocessor_config.json").is_file():
        return ImageInputs(AutoImageProcessor.from_pretrained(str(root)), channels, size, root)
    fallback = {**FALLBACK_PROCESSOR, "size": {"height": size, "width": size},
                "image_mean": [0.5] * channels, "image_std": [0.5] * channels}
    with tempfile.TemporaryDirectory() as tmp:  # the same class and backend a saved file would load
        (Path(tmp) / "preprocessor_config.json").write_text(json.dumps(fallback))
        processor = AutoImageProcessor.from_pretrained(tmp)
    return ImageInputs(processor, channels, size, root)


def load_tokenizer(model_dir: str | os.PathLike[str], needed_for: str) -> Any:
    """The tokenizer saved beside the checkpoint in ``model_dir``, through ``AutoTokenizer``.

    A directory without tokenizer files (:data:`TOKENIZER_FILES`) is a :class:`UsageError` naming
    ``needed_for`` and the fix: transformers would otherwise build an empty-vocabulary tokenizer for
    some model types and every text would become unknown tokens. A missing pad token becomes EOS
    (else UNK, else BOS).
    """
    root = Path(model_dir)
    fix = (f"'{root}' has no tokenizer files ({' / '.join(TOKENIZER_FILES[:2])}) and {needed_for} needs the "
           "model's own tokenizer; copy the dense model's tokenizer files next to its config.json")
    if not any((root / name).is_file() for name in TOKENIZER_FILES):
        raise UsageError(fix)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(root))
    except (OSError, ValueError, TypeError):
        raise UsageError(fix) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token or tokenizer.bos_token
    return tokenizer
