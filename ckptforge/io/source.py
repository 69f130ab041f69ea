"""Resolve a source reference and read its tensors lazily, one at a time.

A source is an alias (``vit-base``), a local ``.safetensors`` / ``.bin`` / ``.pt`` file, a local
directory (single file or sharded with ``*.index.json``) or a Hub id ``org/name[@revision]``.

    >>> ckpt = open_checkpoint("examples/tiny-vit-mnist")
    >>> ckpt.config["model_type"], len(ckpt.tensors)
    ('vit', 70)
    >>> ckpt.read("classifier.weight").shape
    torch.Size([10, 64])

Indexing a safetensors checkpoint reads its JSON headers only and does not import torch (``inspect``
and ``--dry-run`` stay fast); torch loads when a tensor is read, a dtype is asked for, or a pickle opened.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptforge.errors import HubError, SourceError, UnsafeCheckpointError
from ckptforge.io.hashing import file_sha256, sha256_file  # noqa: F401  (sha256_file: public here too)

if TYPE_CHECKING:
    import torch

#: Short names for well-known dense checkpoints (``ckptforge inspect --aliases``).
ALIASES: dict[str, str] = {
    "vit-tiny": "WinKawaks/vit-tiny-patch16-224",
    "vit-small": "WinKawaks/vit-small-patch16-224",
    "vit-base": "google/vit-base-patch16-224",
    "vit-base-in21k": "google/vit-base-patch16-224-in21k",
    "bert-base": "google-bert/bert-base-uncased",
    "bert-large": "google-bert/bert-large-uncased",
    "minilm": "sentence-transformers/all-MiniLM-L6-v2",
    "tinyllama": "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "qwen2-0.5b": "Qwen/Qwen2-0.5B",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
}

#: What a Hub download fetches: configs, safetensors weights, tokenizer and preprocessor files.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]

#: Files copied from the source into an output directory (tokenizer / preprocessor).
AUX_FILE_PATTERNS = [
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.txt", "vocab.json", "merges.txt", "added_tokens.json", "preprocessor_config.json",
    "generation_config.json", "image_processor_config.json",
]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
#: safetensors dtype code → torch's name for it (``torch.<name>``) and bytes per element.
SAFETENSORS_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
    "U8": ("uint8", 1), "BOOL": ("bool", 1),
}
_ITEMSIZE = dict(SAFETENSORS_DTYPES.values())


def torch_dtype(name: str) -> torch.dtype:
    """``torch.<name>`` (imports torch)."""
    import torch

    return getattr(torch, name)


def dtype_itemsize(name: str) -> int:
    """Bytes per element of the dtype torch calls ``name``, without importing torch where it is known."""
    return _ITEMSIZE.get(name) or torch_dtype(name).itemsize


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, known without reading its data (nor importing torch)."""

    name: str
    file: Path
    #: torch's name of the dtype (``float32``, ``bfloat16``, …); :attr:`dtype` is the torch dtype.
    dtype_name: str
    shape: tuple[int, ...]
    #: Absolute byte range of the data in a safetensors file (None for pickles).
    span: tuple[int, int] | None = None

    @property
    def dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype_name)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class DenseCheckpoint:
    """A checkpoint's config and a lazy map of its tensors. The state dict is never loaded whole."""

    source: str
    root: Path
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    weight_files: list[Path]
    revision: str | None = None
    _handles: dict[Path, Any] = field(default_factory=dict, repr=False)
    _files: dict[Path, Any] = field(default_factory=dict, repr=False)
    #: :meth:`read` may be called from several threads (shards written in parallel).
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor into memory (a copy, detached from the file).

        safetensors data is read with plain file reads at the offsets the header gives, not
        through a memory map: mapped pages would stay in this process's resident memory for
        the whole run, and memory must stay bounded by one tensor, not the model size.
        """
        import torch

        info = self.tensors[name]
        if info.span is None:
            with self._lock:
                handle = self._handles.get(info.file)
                if handle is None:
                    handle = self._handles[info.file] = _open_pickle(info.file)[0]
            return handle[name].clone()
        start, end = info.span
        buf = torch.empty(end - start, dtype=torch.uint8)
        with self._lock:
            f = self._files.get(info.file)
            if f is None:
                f = self._files[info.file] = open(info.file, "rb")
            f.seek(start)
            complete = f.readinto(buf.numpy()) == end - start
        if not complete:
            raise SourceError(f"'{info.file}' ended while reading tensor '{name}'; the file is truncated")
        return buf.view(info.dtype).reshape(info.shape)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        self._handles.clear()

    def file_hashes(self) -> dict[str, str]:
        """sha256 of config.json and every weight file, keyed by file name."""
        files = [self.root / "config.json", *self.weight_files]
        return {p.name: file_sha256(p) for p in files if p.is_file()}

    def aux_files(self) -> list[Path]:
        """Tokenizer / preprocessor files that travel into the output."""
        return [self.root / n for n in AUX_FILE_PATTERNS if (self.root / n).is_file()]

    def read_paths(self) -> list[Path]:
        """Every local path this checkpoint is read from (outputs must stay clear of them): the
        weight files, config.json, tokenizer / preprocessor files, and the whole directory unless
        the source named a single weight file."""
        paths = [*self.weight_files, self.root / "config.json", *self.aux_files()]
        if not Path(self.source).expanduser().is_file():
            paths.append(self.root)
        return paths


def resolve_source(ref: str) -> tuple[Path, str | None]:
    """Turn a source reference into a local path (file or directory) and the Hub revision, if any.

    Local paths win over aliases and Hub ids. Hub ids download through
    ``huggingface_hub.snapshot_download`` (honours HF_HOME, HF_HUB_OFFLINE, HF_TOKEN).
    """
    ref = str(ref)
    path = Path(ref).expanduser()
    if path.exists():
        return path, None
    target = ALIASES.get(ref, ref)
    if not _HUB_ID.match(target) or ref.startswith((".", "/", "~")):
        raise SourceError(
            f"source '{ref}' not found: no such file or directory, and it is not an alias or a Hub id "
            "(org/name[@revision]); check the path, or run 'ckptforge inspect --aliases'"
        )
    repo_id, _, revision = target.partition("@")
    return download_from_hub(repo_id, revision or None), revision or None


def download_from_hub(repo_id: str, revision: str | None = None) -> Path:
    """Download configs, safetensors weights and tokenizer / preprocessor files of a Hub repo."""
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    try:
        local = huggingface_hub.snapshot_download(
            repo_id, revision=revision, allow_patterns=HUB_ALLOW_PATTERNS
        )
    except hf_errors.LocalEntryNotFoundError as exc:
        raise HubError(
            f"'{repo_id}' is not in the local Hugging Face cache and the Hub cannot be reached "
            "(HF_HUB_OFFLINE or no network); download it once online, or pass a local path"
        ) from exc
    except hf_errors.GatedRepoError as exc:
        raise HubError(
            f"'{repo_id}' is gated; accept its terms on the Hub and set HF_TOKEN"
        ) from exc
    except hf_errors.RevisionNotFoundError as exc:
        raise HubError(f"revision '{revision}' not found in '{repo_id}'; check the @revision") from exc
    except hf_errors.RepositoryNotFoundError as exc:
        raise HubError(
            f"Hub repo '{repo_id}' not found or private; check the id, or set HF_TOKEN for a private repo"
        ) from exc
    except (hf_errors.HfHubHTTPError, OSError) as exc:
        raise HubError(
            f"downloading '{repo_id}' failed ({type(exc).__name__}); check the network or try again"
        ) from exc
    return Path(local)


def open_checkpoint(ref: str | os.PathLike[str]) -> DenseCheckpoint:
    """Resolve ``ref`` and index its tensors without reading their data."""
    path, revision = resolve_source(str(ref))
    root, weight_files = _find_weight_files(path)
    config = _read_config(root, path)
    tensors: dict[str, TensorInfo] = {}
    handles: dict[Path, Any] = {}
    for wf in weight_files:
        handle, infos = _open_weights(wf)
        if isinstance(handle, dict):
            handles[wf] = handle
        for info in infos:
            if info.name in tensors:
                raise SourceError(f"tensor '{info.name}' appears in two weight files; the checkpoint is inconsistent")
            tensors[info.name] = info
    if not tensors:
        raise SourceError(f"'{path}' holds no tensors; pass a checkpoint with weights")
    return DenseCheckpoint(str(ref), root, config, tensors, weight_files, revision, handles)


def _find_weight_files(path: Path) -> tuple[Path, list[Path]]:
    if path.is_file():
        if path.suffix != ".safetensors" and path.suffix not in _PICKLE_SUFFIXES:
            raise SourceError(
                f"'{path}' is not a checkpoint file; pass a .safetensors, .bin or .pt file or a directory"
            )
        return path.parent, [path]
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            files = _index_files(index)
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise SourceError(f"shards listed in '{index.name}' are missing: {', '.join(missing)}; re-download them")
            return path, files
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (path / single).is_file():
            return path, [path / single]
    found = sorted(p for p in path.glob("*.safetensors") if p.is_file()) or sorted(
        p for s in _PICKLE_SUFFIXES for p in path.glob(f"*{s}") if p.is_file()
    )
    if len(found) == 1:
        return path, found
    raise SourceError(
        f"directory '{path}' holds no checkpoint (looked for model.safetensors, a *.index.json "
        "shard index, or pytorch_model.bin); pass a directory that contains one"
    )


def _index_files(index: Path) -> list[Path]:
    """The shard files a ``*.index.json`` names, each a plain file name inside its directory."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise SourceError(f"'{index}' is not a valid shard index (no \"weight_map\"); re-download the checkpoint") from exc
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) and f for f in weight_map.values()):
        raise SourceError(f"'{index}' is not a valid shard index (\"weight_map\" must map tensor names to "
                          "file names); re-download the checkpoint")
    outside = sorted({f for f in weight_map.values() if Path(f).is_absolute() or ".." in Path(f).parts or "\\" in f})
    if outside:
        raise SourceError(f"'{index}' points at '{outside[0]}', outside its directory; a shard index may only "
                          "name files beside it: re-download the checkpoint")
    return sorted({index.parent / f for f in weight_map.values()})


def _read_config(root: Path, given: Path) -> dict[str, Any]:
    cfg = root / "config.json"
    if not cfg.is_file():
        raise SourceError(
            f"no config.json beside '{given}'; ckptforge needs the model config to detect the "
            "architecture: put config.json next to the weights"
        )
    return read_json_object(cfg)


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object (config.json, ckptforge.json); else :class:`SourceError`."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise SourceError(f"'{path}' is not valid JSON ({' '.join(str(exc).split())}); fix or re-download it") from exc
    except OSError as exc:
        raise SourceError(f"'{path}' cannot be read ({exc.strerror or type(exc).__name__}); check the path") from exc
    if not isinstance(data, dict):
        raise SourceError(f"'{path}' holds a JSON {type(data).__name__}, not an object; fix or re-download it")
    return data


def _open_weights(path: Path) -> tuple[Any, list[TensorInfo]]:
    try:
        if path.suffix == ".safetensors":
            return _open_safetensors(path)
        return _open_pickle(path)
    except OSError as exc:  # unreadable (permissions, I/O error) before the format is even looked at
        raise SourceError(f"'{path}' cannot be read ({exc.strerror or type(exc).__name__}); check its permissions") from exc


def _open_safetensors(path: Path) -> tuple[Any, list[TensorInfo]]:
    """Index a safetensors file from its JSON header, checked as the safetensors library checks it
    (known dtypes, each span the size its shape and dtype give, the spans tiling the data)."""
    data_start, header = _check_safetensors_size(path)
    infos = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            code, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise SourceError(f"'{path}' is not a valid safetensors file (bad entry for tensor '{name}'); "
                              "re-download or re-export it") from exc
        if code not in SAFETENSORS_DTYPES:
            raise SourceError(f"tensor '{name}' in '{path.name}' has unsupported dtype {code}")
        dtype_name, itemsize = SAFETENSORS_DTYPES[code]
        if not all(isinstance(n, int) and n >= 0 for n in (*shape, begin, end)) or \
                end - begin != math.prod(shape) * itemsize:
            raise SourceError(f"'{path}' is not a valid safetensors file (tensor '{name}': shape {list(shape)} "
                              f"{code} does not fill bytes {begin}-{end}); re-download or re-export it")
        infos.append(TensorInfo(name, path, dtype_name, shape, (data_start + begin, data_start + end)))
    covered = data_start
    for info in sorted(infos, key=lambda i: i.span):
        if info.span[0] != covered:
            raise SourceError(f"'{path}' is not a valid safetensors file (tensor data overlaps or leaves a gap at "
                              f"'{info.name}'); re-download or re-export it")
        covered = info.span[1]
    return None, sorted(infos, key=lambda i: i.name)  # the order safetensors' safe_open lists them in


def _check_safetensors_size(path: Path) -> tuple[int, dict[str, Any]]:
    """Reject truncated files up front: header length + largest data offset must equal file size.

    Returns where the data starts and the parsed header."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SourceError(f"'{path}' is not a valid safetensors file (only {size} bytes); re-download it")
        n = int.from_bytes(head, "little")
        if n <= 0 or 8 + n > size:
            raise SourceError(f"'{path}' is not a valid safetensors file (bad header length); re-download it")
        try:
            header = json.loads(f.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            raise SourceError(f"'{path}' is not a valid safetensors file (bad header); re-download it") from exc
    if 8 + n + end != size:
        raise SourceError(
            f"'{path}' is truncated or padded ({size} bytes, header says {8 + n + end}); re-download it"
        )
    return 8 + n, header


def _open_pickle(path: Path) -> tuple[dict[str, torch.Tensor], list[TensorInfo]]:
    import torch

    try:
        with warnings.catch_warnings():  # torch warns about foreign pickles before refusing them
            warnings.simplefilter("ignore")
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc) and "zip" not in str(exc):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"'{path}' is a pickle that carries code or unsupported objects, refused (it was not "
            "executed); convert it to safetensors from a trusted environment"
        ) from exc
    except Exception as exc:
        raise SourceError(f"'{path}' is not a readable PyTorch checkpoint ({type(exc).__name__}); re-download it") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SourceError(f"'{path}' does not hold a flat state dict of tensors; save model.state_dict()")
    infos = [TensorInfo(k, path, str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in state.items()]
    return state, infos
