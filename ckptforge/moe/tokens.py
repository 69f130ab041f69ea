"""Padding in MoE blocks: route real tokens only, put the outputs back at their positions.

Routers that look across tokens (capacity, Batch Prioritized Routing, expert choice, soft slots)
would otherwise let padding take capacity or mix into slots, so a token's output would depend on
how much padding its batch has. Padded rows are still computed, routed outside the accounting
(:func:`padding_output`), so that they take no capacity and change no real token.
"""

from __future__ import annotations

from typing import Any

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


def scatter_tokens(out: torch.Tensor, keep: torch.Tensor | None, padded: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of ``out`` back to their token positions; padded positions get ``padded`` (zeros without it)."""
    if keep is None:
        return out
    full = out.new_zeros(keep.shape[0], out.shape[-1])
    full[keep] = out
    if padded is not None:
        full[~keep] = padded.to(full.dtype)
    return full


def padding_output(router: Any, experts: Any, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor | None:
    """The expert output of the padded rows of ``x`` routed outside the accounting
    (``router.uncounted``: top-k without capacity), so that where routing is exact the MoE equals
    the dense FFN at padded positions too; None for routers without one (their padding gets zeros)."""
    uncounted = getattr(router, "uncounted", None)
    if keep is None or uncounted is None:
        return None
    pad = x[~keep]
    routing = uncounted(pad)
    return experts(pad, routing.expert_index, routing.weights)
