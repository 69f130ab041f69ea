"""Padding in MoE blocks: route real tokens only, put the outputs back at their positions.

Routers that look across tokens (capacity, Batch Prioritized Routing, expert choice, soft slots)
would otherwise let padding take capacity or mix into slots, so a token's output would depend on
how much padding its batch has.
"""

from __future__ import annotations

import torch


def real_tokens(token_mask: torch.Tensor | None, repeat: int = 1) -> torch.Tensor | None:
    """The flat boolean mask of real tokens (each repeated ``repeat`` times, for sub-tokens), or
    None when there is no mask or no padding."""
    if token_mask is None:
        return None
    keep = token_mask.reshape(-1).bool()
    if bool(keep.all()):
        return None
    return keep.repeat_interleave(repeat) if repeat > 1 else keep


def scatter_tokens(out: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Rows of ``out`` back to their token positions; padded positions get zeros."""
    if keep is None:
        return out
    full = out.new_zeros(keep.shape[0], out.shape[-1])
    full[keep] = out
    return full
