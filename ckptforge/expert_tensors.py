"""The tensor maths of a conversion: each expert tensor cut from a dense FFN, the fresh tensors an MoE
block starts with, and the seeded random streams they draw from. Pure functions of tensors.

    >>> initial_tensor("identity", (2, 2), torch.Generator()).tolist()
    [[1.0, 0.0], [0.0, 1.0]]
"""

from __future__ import annotations

import hashlib
from typing import Callable

import torch

from ckptforge.strategies import DenseFFN, LayerSelection


def generator_for(seed: int, *keys: object) -> torch.Generator:
    """A torch.Generator seeded from ``seed`` and ``keys``: the same keys give the same stream."""
    digest = hashlib.sha256(repr((seed, *keys)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def expert_tensor(ffn: DenseFFN, sel: LayerSelection, expert: int, role: str, g: torch.Generator,
                  down_scale: float = 1.0) -> torch.Tensor:
    """Expert ``expert``'s tensor of ``role``: rows (gate/up/up_bias) or columns (down) of its units,
    re-drawn units replaced from N(mean, std) of the dense matrix, Gaussian noise added; ``down`` and
    ``down_bias`` multiplied by ``down_scale`` (an output scale folded into the weights)."""
    t = _expert_tensor(ffn, sel, expert, role, g)
    if down_scale != 1.0 and role.startswith("down"):
        t = (t.float() * down_scale).to(t.dtype)
    return t


def _expert_tensor(ffn: DenseFFN, sel: LayerSelection, expert: int, role: str, g: torch.Generator) -> torch.Tensor:
    from ckptforge.cross_size import slice_channels

    init = sel.experts[expert]
    w = slice_channels(ffn.weights[role], role, init.channels)  # issue 13: a teacher's channels
    if role == "down_bias":
        return w * sel.down_bias_scale if sel.down_bias_scale != 1.0 else w
    full = init.units.numel() == w.shape[-1 if role == "down" else 0] and bool(
        (init.units == torch.arange(init.units.numel())).all()
    )
    if full:
        t = w
    else:
        t = w[:, init.units] if role == "down" else w[init.units]
    if init.redraw is not None and init.redraw.numel():
        t = t.clone()
        ref = w.float()
        shape = (t.shape[0], init.redraw.numel()) if role == "down" else (init.redraw.numel(), *t.shape[1:])
        fresh = (torch.randn(shape, generator=g) * ref.std() + ref.mean()).to(t.dtype)
        if role == "down":
            t[:, init.redraw] = fresh
        else:
            t[init.redraw] = fresh
    if sel.noise_std > 0 and not role.endswith("bias"):
        t = (t.float() + torch.randn(t.shape, generator=g) * sel.noise_std).to(t.dtype)
    return t


def _orthogonal(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(max(shape), min(shape), generator=g))
    q = q * torch.sign(torch.diagonal(r))
    return q if shape[0] >= shape[1] else q.T


#: Init name (``MoETensorLayout.extras``) → the fresh tensor of that shape, from the seeded stream.
INITS: dict[str, Callable[[tuple[int, ...], torch.Generator], torch.Tensor]] = {
    "zeros": lambda shape, g: torch.zeros(shape),
    "ones": lambda shape, g: torch.ones(shape),
    "identity": lambda shape, g: torch.eye(*shape),
    "normal": lambda shape, g: torch.randn(shape, generator=g) * 0.02,
    "orthogonal": _orthogonal,
}


def initial_tensor(init: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """A fresh tensor for an MoE block's own parameter: one of :data:`INITS`, or a number (a constant).

        >>> initial_tensor("zeros", (2,), torch.Generator()).tolist()
        [0.0, 0.0]
    """
    make = INITS.get(init)
    return make(shape, g) if make is not None else torch.full(shape, float(init))


def channel_block(t: torch.Tensor, role: str, block: int, width: int) -> torch.Tensor:
    """Keep channels ``block·width … (block+1)·width`` of the model dimension of an expert tensor."""
    part = slice(block * width, (block + 1) * width)
    if role in ("up", "gate"):
        return t[:, part]
    if role == "down":
        return t[part]
    return t[part] if role == "down_bias" else t
