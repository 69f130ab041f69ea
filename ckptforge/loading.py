"""Load dense and MoE checkpoints as transformers models (remote code is written by :mod:`ckptforge.remote_code`).

    >>> model = load_model("out/tiny-vit-moe")        # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch

from ckptforge.errors import SourceError

if TYPE_CHECKING:
    import transformers

def _our_classes() -> dict[str, type]:
    from ckptforge import modeling

    return {name: getattr(modeling, name) for name in modeling.__all__ if name[0].isupper()}


def model_class(config: dict[str, Any]) -> type:
    """The class named in ``config['architectures']`` (ckptforge's own, or a transformers class)."""
    import transformers

    our_classes = _our_classes()
    archs = config.get("architectures") or []
    for arch in archs:
        if arch in our_classes:
            return our_classes[arch]
        if hasattr(transformers, arch):
            return getattr(transformers, arch)
    raise SourceError(
        f"no model class for architectures={archs} (model_type {config.get('model_type')!r}); "
        "the config needs an 'architectures' entry transformers knows"
    )


def config_object(config: dict[str, Any]) -> transformers.PretrainedConfig:
    """The config object of ``config``: its output format's ckptforge config class, else transformers' own."""
    import transformers

    from ckptforge.families import format_of

    fmt = format_of(config)
    if fmt is not None and fmt.config_class:
        cls = getattr(importlib.import_module("ckptforge.modeling"), fmt.config_class)
    else:
        cls = transformers.AutoConfig.for_model(config["model_type"]).__class__
    return cls.from_dict({k: v for k, v in config.items() if k != "model_type"})


def state_names(config: dict[str, Any]) -> set[str]:
    """Tensor names the model class of ``config`` saves (built on the meta device, no memory)."""
    cls = model_class(config)
    with torch.device("meta"):
        model = cls(config_object(config))
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    return {k for k in model.state_dict() if k not in tied}


@contextmanager
def _as_directory(path: Path) -> Iterator[Path]:
    """A directory view of a checkpoint: itself, or a temp dir linking a lone weight file + config."""
    if path.is_dir():
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="ckptforge-") as tmp:
        name = "model.safetensors" if path.suffix == ".safetensors" else "pytorch_model.bin"
        (Path(tmp) / name).symlink_to(path.resolve())
        (Path(tmp) / "config.json").symlink_to((path.parent / "config.json").resolve())
        yield Path(tmp)


def load_model(path: str | Path, config: dict[str, Any] | None = None, dtype: torch.dtype = torch.float32):
    """Load a dense or MoE checkpoint (directory or lone weight file) with its own model class, in eval mode."""
    import json

    path = Path(path)
    with _as_directory(path) as directory:
        config = config or json.loads((directory / "config.json").read_text())
        cls = model_class(config)
        model = cls.from_pretrained(str(directory), dtype=dtype)
    return model.eval()


def copy_files(files: list[Path], out_dir: Path) -> list[str]:
    for f in files:
        shutil.copyfile(f, out_dir / f.name)
    return [f.name for f in files]
