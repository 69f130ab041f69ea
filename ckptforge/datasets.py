"""Training data for ``ckptforge finetune``: the model's task decides what DATA may be.

- image classification: a folder with one subfolder per class, or a Hugging Face dataset (a
  ``save_to_disk`` directory or a Hub id) with an image and a label column;
- causal LM: a ``.txt`` file, a ``.jsonl`` file with a ``text`` field, or a dataset with a text column;
- sequence classification: a ``.jsonl`` file with ``text`` and ``label``, or a dataset with both.

Everything becomes in-memory tensors (the runs are short and the data small), images through the
checkpoint's own image processor and text through its own tokenizer (:mod:`ckptforge.io.inputs`,
the pipeline calibration and ``routes`` use too).

    >>> task = task_for({"architectures": ["ViTMoEForImageClassification"]})
    >>> task.name, task.unit
    ('image-classification', 'images')
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from ckptforge.io.inputs import (
    IMAGE_COLUMNS, IMAGE_SUFFIXES, TEXT_COLUMNS, ImageInputs, is_dataset_dir, is_image_file, load_image_processor,
    load_tokenizer, open_dataset, read_utf8,
)
from ckptforge.errors import UsageError

LABEL_COLUMNS = ("label", "labels", "fine_label")


@dataclass(frozen=True)
class Task:
    """What a model head learns: its name, the input tensor names, and the throughput unit."""

    name: str
    arch_suffix: str
    inputs: tuple[str, ...]
    unit: str
    classifies: bool


#: Registry: a model's ``architectures`` entry ends with ``arch_suffix`` → its task.
TASKS = {
    t.name: t for t in (
        Task("image-classification", "ForImageClassification", ("pixel_values", "labels"), "images", True),
        Task("causal-lm", "ForCausalLM", ("input_ids", "labels"), "tokens", False),
        Task("sequence-classification", "ForSequenceClassification",
             ("input_ids", "attention_mask", "labels"), "sequences", True),
    )
}


@dataclass
class TaskData:
    """Train and eval sets as tensors, the class names (classification) and how text was tokenized."""

    task: Task
    train: TensorDataset
    eval: TensorDataset
    class_names: list[str] = field(default_factory=list)
    tokenizer: str | None = None
    seq_len: int | None = None
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task.name, "train_examples": len(self.train), "eval_examples": len(self.eval),
            "classes": self.class_names or None, "tokenizer": self.tokenizer, "seq_len": self.seq_len,
            "source": self.description,
        }


def task_for(config: dict[str, Any]) -> Task:
    """The task of a model config's head; a head finetune cannot train raises UsageError."""
    archs = config.get("architectures") or []
    for task in TASKS.values():
        if any(a.endswith(task.arch_suffix) for a in archs):
            return task
    heads = ", ".join(t.arch_suffix for t in TASKS.values())
    raise UsageError(
        f"finetune cannot train architectures={archs}; it needs a model with a head ({heads}) — "
        "upcycle a checkpoint that has one"
    )


def load_task_data(
    data: str, config: dict[str, Any], model_dir: Path, *, eval_data: str | None = None,
    seq_len: int = 64, seed: int = 0, eval_fraction: float = 0.1,
) -> TaskData:
    """Read DATA (and ``eval_data``, else a seeded held-out ``eval_fraction``) for the model's task.

        >>> td = load_task_data("digits/", vit_config, Path("out/moe"))      # doctest: +SKIP
        >>> len(td.class_names)                                               # doctest: +SKIP
        10
    """
    task = task_for(config)
    reader = _READERS[task.name]
    if task.name == "image-classification":
        prepare: ImageInputs | _Tokenize = load_image_processor(model_dir, config)
    else:
        prepare = _tokenizer(model_dir)
    train, classes = reader(data, prepare, None, seq_len)
    if classes is not None and len(classes) < 2:
        raise UsageError(f"{data} has only 1 class ({classes[0]!r}); classification needs at least 2 classes")
    if eval_data is not None:
        evals, _ = reader(eval_data, prepare, classes, seq_len)
    else:
        train, evals = _split(train, eval_fraction, seed, data)
    text = isinstance(prepare, _Tokenize)
    return TaskData(task, train, evals, classes or [], prepare.name if text else None, seq_len if text else None, data)


def _split(ds: TensorDataset, fraction: float, seed: int, data: str) -> tuple[TensorDataset, TensorDataset]:
    n = len(ds)
    if n < 2:
        raise UsageError(f"{data} holds {n} example(s); finetune needs at least 2 (one to train, one to evaluate)")
    n_eval = max(1, int(round(n * fraction)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return (TensorDataset(*(t[order[n_eval:]] for t in ds.tensors)),
            TensorDataset(*(t[order[:n_eval]] for t in ds.tensors)))


# --- images -------------------------------------------------------------------------------------


def _read_images(data: str, images: ImageInputs, classes: list[str] | None, _len: int):
    path = Path(data)
    if path.is_dir() and not is_dataset_dir(path):
        pairs, found = _image_folder(path)
        label_names = found
    else:
        rows = open_dataset(data, "--data")
        image_col = _column(rows, IMAGE_COLUMNS, data, "image")
        label_col = _column(rows, LABEL_COLUMNS, data, "label")
        names = _label_names(rows, label_col)
        pairs = [(row[image_col], row[label_col]) for row in rows]
        label_names = names or sorted({str(lab) for _, lab in pairs}, key=_natural)
        pairs = [(img, lab if names else label_names.index(str(lab))) for img, lab in pairs]
    if classes is not None:  # eval set: map its label names onto the training classes
        pairs = [(img, _same_class(label_names[lab], classes, data)) for img, lab in pairs]
    pixels = torch.cat([images.pixels([img for img, _ in pairs[i:i + 256]]) for i in range(0, len(pairs), 256)])
    labels = torch.tensor([lab for _, lab in pairs], dtype=torch.long)
    return TensorDataset(pixels, labels), label_names


def _image_folder(path: Path) -> tuple[list[tuple[Any, int]], list[str]]:
    class_dirs = sorted((d for d in path.iterdir() if d.is_dir()), key=lambda d: _natural(d.name))
    if not class_dirs:
        raise UsageError(f"{path} has no class subfolders; put each class's images in DATA/<label>/")
    pairs = []
    for label, d in enumerate(class_dirs):
        pairs += [(f, label) for f in sorted(d.iterdir()) if is_image_file(f)]
    if not pairs:
        raise UsageError(f"{path} has no images ({', '.join(IMAGE_SUFFIXES)}) in its class subfolders")
    return pairs, [d.name for d in class_dirs]


# --- text ---------------------------------------------------------------------------------------


@dataclass
class _Tokenize:
    name: str
    fn: Any

    def __call__(self, text: str) -> list[int]:
        return self.fn(text)


def _tokenizer(model_dir: Path) -> _Tokenize:
    """The model dir's own tokenizer (special tokens added as the tokenizer defines them)."""
    tok = load_tokenizer(model_dir, "finetune / eval on text")
    return _Tokenize(type(tok).__name__, lambda text: tok(text, add_special_tokens=True)["input_ids"])


def _read_causal(data: str, tokenize: _Tokenize, _classes: Any, seq_len: int):
    path = Path(data)
    if path.suffix == ".txt" and path.is_file():
        texts = [read_utf8(path)]
    elif path.suffix in (".jsonl", ".json") and path.is_file():
        texts = [row["text"] for row in _jsonl(path, ("text",))]
    else:
        rows = open_dataset(data, "--data")
        texts = [row[_column(rows, TEXT_COLUMNS, data, "text")] for row in rows]
    ids = [i for text in texts for i in tokenize(text)]
    n_blocks = len(ids) // (seq_len + 1)
    if n_blocks < 2:
        raise UsageError(
            f"{data} gives {len(ids)} tokens, fewer than 2 blocks of --seq-len {seq_len}+1; "
            "add text or lower --seq-len"
        )
    blocks = torch.tensor(ids[: n_blocks * (seq_len + 1)], dtype=torch.long).view(n_blocks, seq_len + 1)
    return TensorDataset(blocks), None


def _read_text_labels(data: str, tokenize: _Tokenize, classes: list[str] | None, seq_len: int):
    path = Path(data)
    if path.suffix in (".jsonl", ".json") and path.is_file():
        rows, text_col, label_col = _jsonl(path, ("text", "label")), "text", "label"
    else:
        rows = open_dataset(data, "--data")
        text_col = _column(rows, TEXT_COLUMNS, data, "text")
        label_col = _column(rows, LABEL_COLUMNS, data, "label")
    names = _label_names(rows, label_col)
    if names:  # a ClassLabel column already holds indices into its names
        labels = [int(r[label_col]) for r in rows]
    else:
        names = sorted({str(r[label_col]) for r in rows}, key=_natural)
        labels = [names.index(str(r[label_col])) for r in rows]
    if classes is not None:
        labels = [_same_class(names[lab], classes, data) for lab in labels]
    ids = torch.zeros(len(rows), seq_len, dtype=torch.long)
    mask = torch.zeros(len(rows), seq_len, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens = tokenize(str(row[text_col]))[:seq_len]
        ids[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[i, : len(tokens)] = 1
    return TensorDataset(ids, mask, torch.tensor(labels, dtype=torch.long)), names


def _jsonl(path: Path, required: tuple[str, ...]) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UsageError(f"{path} line {n} is not JSON; write one JSON object per line") from None
        missing = [k for k in required if not isinstance(row, dict) or k not in row]
        if missing:
            raise UsageError(f"{path} line {n} has no {missing[0]!r}; every line needs {' and '.join(map(repr, required))}")
        rows.append(row)
    return rows


# --- Hugging Face datasets ----------------------------------------------------------------------


def _column(rows: Any, candidates: tuple[str, ...], data: str, what: str) -> str:
    columns = list(rows.column_names)
    for c in candidates:
        if c in columns:
            return c
    raise UsageError(f"{data} has no {what} column (columns: {', '.join(columns)}); add a {candidates[0]!r} column")


def _label_names(rows: Any, column: str) -> list[str] | None:
    feature = getattr(rows, "features", {}).get(column) if hasattr(rows, "features") else None
    return list(feature.names) if getattr(feature, "names", None) else None


def _same_class(name: str, classes: list[str], data: str) -> int:
    if name not in classes:
        raise UsageError(f"--eval-data {data} has class {name!r} that the training data lacks; use the same classes")
    return classes.index(name)


def _natural(name: str) -> tuple[int, Any]:
    return (0, int(name)) if name.isdigit() else (1, name)


_READERS = {
    "image-classification": _read_images,
    "causal-lm": _read_causal,
    "sequence-classification": _read_text_labels,
}
