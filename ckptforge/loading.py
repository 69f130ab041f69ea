"""Load dense and MoE checkpoints as transformers models, and write remote code into outputs.

    >>> model = load_model("out/tiny-vit-moe")        # doctest: +SKIP
"""

from __future__ import annotations

import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import transformers

from ckptforge import modeling
from ckptforge.errors import SourceError

_MODELING_DIR = Path(modeling.__file__).parent
_MOE_DIR = _MODELING_DIR.parent / "moe"
_OUR_CLASSES = {name: getattr(modeling, name) for name in modeling.__all__ if name[0].isupper()}
_OUR_CONFIGS = {cls.model_type: cls for cls in (modeling.ViTMoEConfig, modeling.BertMoEConfig)}


def model_class(config: dict[str, Any]) -> type:
    """The class named in ``config['architectures']`` (ckptforge's own, or a transformers class)."""
    archs = config.get("architectures") or []
    for arch in archs:
        if arch in _OUR_CLASSES:
            return _OUR_CLASSES[arch]
        if hasattr(transformers, arch):
            return getattr(transformers, arch)
    raise SourceError(
        f"no model class for architectures={archs} (model_type {config.get('model_type')!r}); "
        "the config needs an 'architectures' entry transformers knows"
    )


def config_object(config: dict[str, Any]) -> transformers.PretrainedConfig:
    cls = _OUR_CONFIGS.get(config.get("model_type"))
    if cls is None:
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


def write_remote_code(module: str, out_dir: Path) -> list[str]:
    """Copy ``modeling/<module>.py`` as ``modeling_<module>.py`` into ``out_dir`` with every file it
    imports from ckptforge (``common.py``, the ``moe`` layers), imports rewritten to be flat."""
    written: list[str] = []
    pending = [(_MODELING_DIR / f"{module}.py", f"modeling_{module}.py")]
    while pending:
        src, dest = pending.pop()
        if dest in written:
            continue
        text = src.read_text()
        for dots, sub, name in re.findall(r"^from (\.+)(moe\.)?(\w+) import", text, flags=re.M):
            base = _MOE_DIR if sub or src.parent == _MOE_DIR else _MODELING_DIR
            pending.append((base / f"{name}.py", f"{name}.py"))
        text = re.sub(r"^from \.\.moe\.(\w+) import", r"from .\1 import", text, flags=re.M)
        (out_dir / dest).write_text(text)
        written.append(dest)
    return sorted(written)


def copy_files(files: list[Path], out_dir: Path) -> list[str]:
    for f in files:
        shutil.copyfile(f, out_dir / f.name)
    return [f.name for f in files]
