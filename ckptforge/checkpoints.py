"""Training checkpoints of ``finetune --checkpoint-every N`` and ``--resume DIR``.

A checkpoint directory holds one ``<run>.pt`` per run (``moe``, ``dense``, ``scratch``): the
trainable weights, optimiser and schedule state, the torch RNG state, the step reached and the
curves so far, plus the run's model fingerprint (class, parameter names and shapes). Resuming
replays the data order up to that step, so a resumed run continues exactly where it stopped.
Each write replaces the file atomically (temporary name, then rename).

    >>> fingerprint(torch.nn.Linear(2, 3))
    'Linear:bias(3,);weight(3,2)'
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ckptforge.errors import SourceError, UsageError


def fingerprint(model: nn.Module) -> str:
    """The model class and every parameter's name and shape, independent of wrapping."""
    model = getattr(model, "module", model)
    shapes = sorted(f"{n}({','.join(map(str, p.shape))}{',' if p.ndim == 1 else ''})"
                    for n, p in model.named_parameters())
    return f"{type(model).__name__}:" + ";".join(shapes)


def save_checkpoint(directory: Path, run: str, model: nn.Module, state: dict[str, Any]) -> Path:
    """Write ``directory/<run>.pt`` (trainable weights + ``state``) atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    weights = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    payload = {"fingerprint": fingerprint(model), "weights": weights, **state}
    path = directory / f"{run}.pt"
    tmp = directory / f".{run}.pt.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(directory: Path, run: str, model: nn.Module) -> dict[str, Any] | None:
    """The state saved for ``run`` (its weights already loaded into ``model``), or None when the
    checkpoint has no such run; a checkpoint of another model raises UsageError."""
    path = directory / f"{run}.pt"
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same problem for the user
        raise SourceError(f"--resume {directory}: {path.name} is unreadable ({type(e).__name__}); "
                          "resume from a directory written by --checkpoint-every") from None
    if payload.get("fingerprint") != fingerprint(model):
        raise UsageError(f"--resume {directory} holds a checkpoint of another model ({run}: "
                         f"{payload.get('fingerprint', '?').split(':')[0]} with other weights); resume "
                         "with the model and options it was written for, or start without --resume")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in payload["weights"].items():
            params[name].copy_(value)
    return payload


def check_resume_dir(directory: Path) -> list[str]:
    """Problems with a ``--resume`` directory that need no model to find."""
    if not directory.is_dir():
        return [f"--resume {directory} is not a directory; pass the checkpoint directory "
                "a run with --checkpoint-every wrote (REPORT/checkpoint)"]
    if not any(directory.glob("*.pt")):
        return [f"--resume {directory} holds no checkpoint (*.pt); pass the directory "
                "a run with --checkpoint-every wrote (REPORT/checkpoint)"]
    return []
