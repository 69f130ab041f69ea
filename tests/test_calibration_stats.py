"""LayerStats after the issue-15 speed-up (reused buffers, counts from AᵀA's diagonal) gives exactly
what the plain formulas give, batch after batch, for every threshold and need."""

from __future__ import annotations

import pytest
import torch

from ckptforge.calibration import LayerStats, release_scratch


def _plain(batches: list[torch.Tensor], inputs: list[torch.Tensor], threshold: str) -> dict[str, torch.Tensor]:
    n, d = batches[0].shape[1], inputs[0].shape[1]
    out = {"l1": torch.zeros(n, dtype=torch.float64), "sq": torch.zeros(n, dtype=torch.float64),
           "count": torch.zeros(n, dtype=torch.float64), "co": torch.zeros(n, n, dtype=torch.float64),
           "input_sums": torch.zeros(n, d, dtype=torch.float64)}
    for a, x in zip(batches, inputs):
        out["l1"] += a.abs().sum(0).double()
        out["sq"] += a.square().sum(0).double()
        flat = a.reshape(-1)
        tau = 0.0 if threshold == "zero" else flat.kthvalue(max(1, round(0.9 * flat.numel()))).values.item()
        fired = (a > tau).double()
        out["count"] += fired.sum(0)
        out["co"] += fired.T @ fired
        out["input_sums"] += (a.abs().T @ x).double()
    out["co"].fill_diagonal_(0)
    return out


@pytest.mark.parametrize("threshold", ["zero", "p90"])
@pytest.mark.parametrize("needs", [{"scores"}, {"scores", "coactivation"}, {"scores", "centroids"}])
def test_statistics_equal_the_plain_formulas(threshold, needs):
    g = torch.Generator().manual_seed(0)
    sizes = [40, 7, 33]  # shrinking and growing batches reuse the same buffers
    batches = [torch.randn(t, 48, generator=g) for t in sizes]
    inputs = [torch.randn(t, 16, generator=g) for t in sizes]
    stats = LayerStats(48, 16, threshold=threshold, needs=needs)
    other = LayerStats(48, 16, threshold=threshold, needs=needs)  # interleaved: shares the buffers
    for a, x in zip(batches, inputs):
        stats.update(a, x)
        other.update(-a, x)
    release_scratch()
    ref = _plain(batches, inputs, threshold)
    assert torch.equal(stats.l1, ref["l1"]) and torch.equal(stats.sq, ref["sq"])
    assert torch.equal(stats.count, ref["count"]) and stats.tokens == sum(sizes)
    if "coactivation" in needs:
        assert torch.equal(stats.coactivation.double(), ref["co"])
    if "centroids" in needs:
        torch.testing.assert_close(stats.input_sums, ref["input_sums"], rtol=1e-6, atol=1e-6)
    assert torch.equal(other.count, _plain([-a for a in batches], inputs, threshold)["count"])
