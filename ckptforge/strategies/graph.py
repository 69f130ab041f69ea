"""The co-activation graph and its METIS partition (MoEfication), kept sparse and balanced.

    >>> c = torch.tensor([[0, 5, 0, 0], [5, 0, 0, 0], [0, 0, 0, 7], [0, 0, 7, 0]])
    >>> sorted(sorted(p) for p in partition_units(c, 2))
    [[0, 1], [2, 3]]
"""

from __future__ import annotations

import pymetis
import torch

#: Strongest neighbours kept per unit before METIS (the graph then has ≤ 2·n·K edges).
NEIGHBOURS = 32
_MAX_EDGE_WEIGHT = 1000


def sparse_graph(coactivation: torch.Tensor, neighbours: int = NEIGHBOURS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CSR (xadj, adjncy, integer eweights ≥ 1) of the symmetric graph that keeps each unit's
    ``neighbours`` strongest co-activation edges (diagonal ignored, zero-count edges dropped)."""
    n = coactivation.shape[0]
    k = min(neighbours, n - 1)
    if k < 1:
        return torch.zeros(n + 1, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    c = coactivation.float()
    c.fill_diagonal_(-1)  # a copy: never an edge to itself
    values, cols = c.topk(k, dim=1)
    rows = torch.arange(n).repeat_interleave(k)
    values, cols = values.reshape(-1), cols.reshape(-1)
    keep = values > 0
    rows, cols, values = rows[keep], cols[keep], values[keep]
    # symmetric: both directions, duplicates merged by max
    src, dst, w = torch.cat([rows, cols]), torch.cat([cols, rows]), torch.cat([values, values])
    key = src * n + dst
    uniq, inverse = key.unique(return_inverse=True)
    merged = torch.zeros(uniq.numel()).scatter_reduce(0, inverse, w, reduce="amax", include_self=False)
    src, dst = uniq // n, uniq % n
    top = merged.max() if merged.numel() else torch.tensor(1.0)
    weights = (1 + (merged / top * (_MAX_EDGE_WEIGHT - 1)).round()).long()
    xadj = torch.zeros(n + 1, dtype=torch.long)
    xadj[1:] = torch.bincount(src, minlength=n).cumsum(0)
    return xadj, dst, weights


def metis_parts(xadj: torch.Tensor, adjncy: torch.Tensor, eweights: torch.Tensor, nparts: int) -> torch.Tensor:
    """METIS part id per vertex (may be unbalanced or leave parts empty; see :func:`balance`)."""
    n = xadj.numel() - 1
    if nparts == 1 or adjncy.numel() == 0:
        return torch.arange(n) * nparts // n
    adjacency = pymetis.CSRAdjacency(xadj.tolist(), adjncy.tolist())
    _, membership = pymetis.part_graph(nparts, adjacency=adjacency, eweights=eweights.tolist())
    return torch.tensor(membership, dtype=torch.long)


def balance(parts: torch.Tensor, nparts: int, affinity: torch.Tensor) -> torch.Tensor:
    """Make every part exactly n/nparts units (MoEfication's balancing step): each oversized part
    gives away the units least attached to it, each to the open part it is most attached to.
    ``affinity`` (n × nparts) is each unit's edge weight into each part."""
    n = parts.numel()
    size = n // nparts
    parts = parts.clone()
    counts = torch.bincount(parts, minlength=nparts)
    movers = []
    for p in (counts > size).nonzero().flatten().tolist():
        members = (parts == p).nonzero().flatten()
        order = affinity[members, p].argsort(stable=True)
        movers.append(members[order[: counts[p] - size]])
        counts[p] = size
    for unit in (torch.cat(movers).tolist() if movers else []):
        room = counts < size
        scores = torch.where(room, affinity[unit], torch.tensor(float("-inf")))
        target = int(scores.argmax())
        parts[unit] = target
        counts[target] += 1
    return parts


def partition_units(coactivation: torch.Tensor, nparts: int, neighbours: int = NEIGHBOURS) -> list[torch.Tensor]:
    """``nparts`` balanced, disjoint, sorted unit sets covering all units (n must divide evenly)."""
    n = coactivation.shape[0]
    xadj, adjncy, w = sparse_graph(coactivation, neighbours)
    parts = metis_parts(xadj, adjncy, w, nparts)
    src = torch.repeat_interleave(torch.arange(n), xadj[1:] - xadj[:-1])
    affinity = torch.zeros(n, nparts)
    affinity.index_put_((src, parts[adjncy]), w.float(), accumulate=True)
    parts = balance(parts, nparts, affinity)
    return [(parts == p).nonzero().flatten() for p in range(nparts)]
