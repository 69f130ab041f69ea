"""Load dense and MoE checkpoints as transformers models, and write remote code into outputs.

    >>> model = load_model("out/tiny-vit-moe")        # doctest: +SKIP
"""

from __future__ import annotations

import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch

from ckptforge.errors import SourceError

if TYPE_CHECKING:
    import transformers

# Writing remote code needs only these paths: a conversion to a stock format (Mixtral, Qwen2-MoE)
# never imports transformers or ckptforge.modeling, which keeps its start-up short.
_MODELING_DIR = Path(__file__).resolve().parent / "modeling"
_MOE_DIR = _MODELING_DIR.parent / "moe"


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
    import transformers

    from ckptforge import modeling

    cls = {c.model_type: c for c in (modeling.ViTMoEConfig, modeling.BertMoEConfig)}.get(config.get("model_type"))
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
