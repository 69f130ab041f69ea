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


def test_blocked_coactivation_equals_the_full_product_read_midway_and_through_the_cache(tmp_path):
    """Units in 4 blocks (only AᵀA's upper strips are computed): the counts read between batches,
    after more batches, and back from a saved cache equal the plain product."""
    from ckptforge.calibration import ActivationStats, coactivation_blocks, load_stats

    n = 512
    assert len(coactivation_blocks(n)) == 5
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(t, n, generator=g) for t in (40, 7, 33)]
    stats = LayerStats(n, 4, needs={"scores", "coactivation"})
    for i, a in enumerate(batches):
        stats.update(a)
        ref = _plain(batches[: i + 1], [torch.zeros(len(b), 4) for b in batches[: i + 1]], "zero")
        assert torch.equal(stats.coactivation.double(), ref["co"]) and torch.equal(stats.count, ref["count"])
    ActivationStats({1: stats}, {"samples": 3}, "k").save(tmp_path / "s.pt")
    back = load_stats(tmp_path / "s.pt", "k").layer(1)
    assert torch.equal(back.coactivation, stats.coactivation) and torch.equal(back.l1, stats.l1)
    back.update(batches[0])  # a loaded cache keeps accumulating correctly
    ref = _plain(batches + batches[:1], [torch.zeros(len(b), 4) for b in batches + batches[:1]], "zero")
    assert torch.equal(back.coactivation.double(), ref["co"])
