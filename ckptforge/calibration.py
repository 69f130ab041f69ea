"""Activation statistics from calibration data: what the strategies and the centroid router read.

The dense model runs through transformers; forward pre-hooks on each MoE layer's down projection
see the FFN's hidden-unit activations (after the activation, and for gated FFNs after act(gate)·up)
and, when the centroid router needs them, hooks on the up projection see the FFN input. Statistics
are accumulated streaming per batch (:class:`LayerStats`), on CUDA when present.

    >>> stats = LayerStats(4, 2, threshold="zero", needs={"scores", "coactivation"})
    >>> stats.update(torch.tensor([[1.0, 0.0, 2.0, -1.0]]))
    >>> stats.count.tolist(), stats.coactivation[0].tolist()
    ([1.0, 0.0, 1.0, 0.0], [0, 0, 1, 0])
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from ckptforge.calibration_data import CalibrationSet
from ckptforge.calibration_needs import missing_calibration_message, needed_stats  # noqa: F401 (re-exported)
from ckptforge.errors import CalibrationError
from ckptforge.io.source import DenseCheckpoint
from ckptforge.strategy_settings import CoactivationSettings

#: What :class:`LayerStats` can accumulate: per-unit scores, co-activation counts, input centroids,
#: per-channel energy of the FFN input (cross-size recycling picks channels with it; issue 13).
NEEDS = ("scores", "coactivation", "centroids", "channels")


def coactivation_blocks(n: int, device: str | torch.device = "cpu") -> list[int]:
    """Boundaries of the unit blocks whose upper-triangle GEMMs give AᵀA: on CPU 4 blocks when ``n``
    splits into int8-GEMM-sized ones (10 of 16 blocks computed, 0.66–0.70× the full GEMM's time for
    ViT-B's 3072 units on the 2-core VM), else one (one float GEMM on a GPU).

        >>> coactivation_blocks(3072), coactivation_blocks(12), coactivation_blocks(3072, "cuda")
        ([0, 768, 1536, 2304, 3072], [0, 12], [0, 3072])
    """
    k = 4 if n % 32 == 0 and n >= 512 and torch.device(device).type == "cpu" else 1
    return [n * i // k for i in range(k + 1)]


def coactivation_counts(fired: torch.Tensor, lo: int = 0, hi: int | None = None) -> torch.Tensor:
    """Rows ``lo:hi`` of the upper strip of AᵀA, i.e. A[:, lo:hi]ᵀ A[:, lo:], for one batch of binary
    firings A (T × d_ff), exact; the whole AᵀA by default.

    On CPU an int8 GEMM with int32 accumulation (``torch._int_mm``) computes it; it measured ~2.4×
    faster than the float32 GEMM here. Rows of zeros pad T to a multiple of 8 (they add nothing).
    Elsewhere, or where torch lacks it, a float32 GEMM (exact below 2²⁴ tokens per batch).

        >>> coactivation_counts(torch.tensor([[True, True], [True, False]])).tolist()
        [[2.0, 1.0], [1.0, 1.0]]

    The int8 path returns int32 counts, the float path float32; both are exact integers.
    """
    t, n = fired.shape
    hi = n if hi is None else hi
    rows, cols = hi - lo, n - lo
    if fired.device.type == "cpu" and hasattr(torch, "_int_mm") and rows % 8 == 0 and rows > 16 and cols % 8 == 0:
        a = fired.view(torch.int8) if fired.dtype == torch.bool else fired.to(torch.int8)  # bool → int8: no copy
        if t % 8 or t <= 16:
            a = torch.cat([a, a.new_zeros(max(24 - t, -t % 8), n)])
        try:  # Aᵀ as a transposed view: the GEMM reads it in place (~8% less CPU than a transposed copy)
            return torch._int_mm(a[:, lo:hi].T, a[:, lo:], out=scratch((rows, cols), torch.int32, a.device))
        except RuntimeError:
            pass
    f = fired.float()
    return f[:, lo:hi].T @ f[:, lo:]


_scratch = threading.local()


def scratch(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reusable buffer of ``shape`` for this thread (contents undefined; valid until the next call
    with the same dtype and device). Statistics of a 4096-token ViT-B batch made four fresh 50 MB
    temporaries per layer; on CPU each one page-faulted in anew, which took more CPU than the sums."""
    cache = _scratch.__dict__.setdefault("buffers", {})
    numel = 1
    for s in shape:
        numel *= s
    buf = cache.get((dtype, device))
    if buf is None or buf.numel() < numel:
        buf = cache[(dtype, device)] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel].view(shape)


def release_scratch() -> None:
    """Free this thread's :func:`scratch` buffers."""
    _scratch.__dict__.pop("buffers", None)


class LayerStats:
    """Streaming statistics of one FFN's d_ff hidden units over calibration tokens.

    ``l1`` Σ|a|, ``l2`` √Σa², ``count`` #(a > τ) per unit; ``coactivation`` Σ AᵀA with A = (a > τ),
    diagonal zero (int32 counts on CPU; float32, exact below 2²⁴ tokens, on CUDA); ``input_sums`` Σ|a|·x (d_ff × d) and
    ``input_total`` Σx for the centroid router. τ is 0, or the 90th percentile of each batch (p90).
    """

    def __init__(self, intermediate_size: int, hidden_size: int, threshold: str = "zero",
                 needs: set[str] | frozenset[str] = frozenset({"scores"}), device: str | torch.device = "cpu"):
        self.threshold, self.needs, self.tokens = threshold, set(needs), 0
        n, d = intermediate_size, hidden_size
        self.l1 = torch.zeros(n, dtype=torch.float64, device=device)
        self.sq = torch.zeros(n, dtype=torch.float64, device=device)
        self.count = torch.zeros(n, dtype=torch.float64, device=device)
        # int32 on CPU, where the counts come from an int8 GEMM (no float copy of a d_ff² matrix)
        count_dtype = torch.int32 if torch.device(device).type == "cpu" else torch.float32
        self.coactivation = torch.zeros(n, n, dtype=count_dtype, device=device) if "coactivation" in needs else None
        self.input_sums = torch.zeros(n, d, dtype=torch.float64, device=device) if "centroids" in needs else None
        self.input_total = torch.zeros(d, dtype=torch.float64, device=device) if "centroids" in needs else None
        self.input_sq = torch.zeros(d, dtype=torch.float64, device=device) if "channels" in needs else None  # issue 13

    @property
    def coactivation(self) -> torch.Tensor | None:
        """Σ AᵀA, diagonal zero (``None`` unless collected). :meth:`update` adds to the upper block
        strips only; reading mirrors them below the diagonal once (on a full product, a no-op)."""
        if self._co is not None and not self._co_mirrored:
            bounds = coactivation_blocks(self._co.shape[0])
            for lo, hi in zip(bounds, bounds[1:-1]):
                self._co[hi:, lo:hi] = self._co[lo:hi, hi:].T
            self._co.fill_diagonal_(0)
            self._co_mirrored = True
        return self._co

    @coactivation.setter
    def coactivation(self, value: torch.Tensor | None) -> None:
        self._co, self._co_mirrored = value, True

    def state(self) -> dict[str, Any]:
        """What :meth:`ActivationStats.save` writes (:meth:`from_state` reads it back)."""
        return {**{k: v for k, v in vars(self).items() if not k.startswith("_")}, "coactivation": self.coactivation}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> LayerStats:
        s = cls.__new__(cls)
        s.coactivation = None
        for k, v in state.items():
            setattr(s, k, v)
        return s

    @property
    def l2(self) -> torch.Tensor:
        return self.sq.sqrt()

    def score(self, metric: str) -> torch.Tensor:
        """Per-unit importance score: ``l2`` | ``l1`` | ``count``."""
        return {"l2": self.l2, "l1": self.l1, "count": self.count}[metric].cpu()

    def update(self, acts: torch.Tensor, inputs: torch.Tensor | None = None) -> None:
        """Add a batch of activations (T × d_ff) and, for centroids, the FFN inputs (T × d)."""
        a = acts.float()
        self.tokens += a.shape[0]
        temp = scratch(a.shape, a.dtype, a.device)  # the same values as a.abs() / a.square(), no fresh memory
        self.l1 += torch.abs(a, out=temp).sum(0).double()
        self.sq += torch.mul(a, a, out=temp).sum(0).double()
        tau = 0.0 if self.threshold == "zero" else _percentile(a, 0.9)
        fired = torch.gt(a, tau, out=scratch(a.shape, torch.bool, a.device))
        if self._co is not None:  # AᵀA is symmetric: only its upper block strips are computed
            bounds = coactivation_blocks(self._co.shape[0], self._co.device)
            for lo, hi in zip(bounds, bounds[1:]):
                counts = coactivation_counts(fired, lo, hi)
                self.count[lo:hi] += counts[:, : hi - lo].diagonal().double()  # AᵀA's diagonal: firing counts
                self._co[lo:hi, lo:] += counts.to(self._co.dtype)
            self._co_mirrored = False
        else:
            self.count += fired.view(torch.int8).sum(0, dtype=torch.int64).double()
        if getattr(self, "input_sq", None) is not None and inputs is not None:  # issue 13
            self.input_sq += inputs.float().square().sum(0).double()
        if self.input_sums is not None and inputs is not None:
            x = inputs.float()
            self.input_sums += (torch.abs(a, out=temp).T @ x).double()
            self.input_total += x.sum(0).double()

    def to(self, device: str | torch.device) -> LayerStats:
        for name in ("l1", "sq", "count", "coactivation", "input_sums", "input_total", "input_sq"):
            if getattr(self, name, None) is not None:
                setattr(self, name, getattr(self, name).to(device))
        return self

    def summary(self) -> dict[str, Any]:
        """A few numbers that describe the statistics (recorded in ckptforge.json)."""
        rate = (self.count / max(self.tokens, 1)).cpu()
        l2 = self.l2.cpu()
        top = l2.sort(descending=True).values
        tenth = max(1, top.numel() // 10)
        return {"tokens": self.tokens, "threshold": self.threshold,
                "mean_fire_rate": round(rate.mean().item(), 6), "dead_units": int((rate == 0).sum()),
                "l2_share_top10pct": round((top[:tenth].square().sum() / top.square().sum().clamp(min=1e-30)).item(), 6)}


def _percentile(a: torch.Tensor, q: float) -> float:
    flat = a.reshape(-1)
    k = max(1, min(flat.numel(), int(round(q * flat.numel()))))
    return flat.kthvalue(k).values.item() if flat.device.type == "cpu" else flat.float().sort().values[k - 1].item()


@dataclass
class ActivationStats:
    """Per-MoE-layer :class:`LayerStats` plus where they came from; ``layer(i)`` is what execute reads."""

    layers: dict[int, LayerStats]
    calibration: dict[str, Any] = field(default_factory=dict)
    key: str = ""

    def layer(self, layer: int) -> LayerStats:
        return self.layers[layer]

    def describe(self) -> dict[str, Any]:
        return {**self.calibration, "key": self.key,
                "layers": {str(i): s.summary() for i, s in sorted(self.layers.items())}}

    def save(self, path: str | Path) -> None:
        """Write to ``path`` (torch format, read back by :func:`load_stats`)."""
        state = {i: {k: (sorted(v) if isinstance(v, set) else v) for k, v in s.state().items()}
                 for i, s in self.layers.items()}
        path = Path(path)
        tmp = path.with_name(f".{path.name}.ckptforge-tmp-{os.getpid()}")
        try:  # written beside and renamed: a cache is never left half-written
            torch.save({"key": self.key, "calibration": self.calibration,
                        "layers": {i: {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in d.items()}
                                   for i, d in state.items()}}, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def load_stats(path: str | Path, key: str) -> ActivationStats | None:
    """The statistics cached at ``path`` when their key is ``key``; None when absent or stale."""
    path = Path(path)
    if not path.is_file():
        return None
    foreign = CalibrationError(f"--stats-cache '{path}' is not a ckptforge statistics file; delete it or pass another path")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickles before refusing them
            warnings.simplefilter("ignore")
            data = torch.load(path, weights_only=True)
    except Exception:
        raise foreign from None
    if not isinstance(data, dict) or not isinstance(data.get("layers"), dict) or not isinstance(
            data.get("calibration"), dict) or not all(isinstance(v, dict) for v in data["layers"].values()):
        raise foreign
    if data.get("key") != key:
        return None
    layers = {}
    for i, state in data["layers"].items():
        layers[int(i)] = LayerStats.from_state(state)
    return ActivationStats(layers, data["calibration"], key)


def stats_key(ckpt: DenseCheckpoint, data: CalibrationSet, layers: list[int], threshold: str, needs: set[str]) -> str:
    """Cache key: source file hashes + calibration inputs + what was collected."""
    payload = {"source": ckpt.file_hashes(), "data": data.fingerprint, "samples": data.num_samples,
               "layers": layers, "threshold": threshold, "needs": sorted(needs)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def collect_stats(ckpt: DenseCheckpoint, data: CalibrationSet, layers: list[int], *, threshold: str = "zero",
                  needs: set[str] | None = None, stop: int | None = None,
                  device: str | None = None) -> ActivationStats:
    """Run the dense model over ``data`` (samples ``:stop``) and accumulate statistics of ``layers``.

        >>> stats = collect_stats(ckpt, data, [1, 3], needs={"scores"})      # doctest: +SKIP
        >>> stats.layer(1).l2.shape                                           # doctest: +SKIP
        torch.Size([64])
    """
    from ckptforge.families import detect_family
    from ckptforge.loading import load_model

    needs = set(needs or {"scores"})
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    family = detect_family(ckpt.config)
    dims = family.dims(ckpt.config)
    model = load_model(dense_weights_path(ckpt), ckpt.config).to(device)
    result = {i: LayerStats(dims.intermediate_size, dims.hidden_size, threshold, needs, device) for i in layers}
    runner = _HookedForward(model, family, layers, result, bool(needs & {"centroids", "channels"}))
    with torch.no_grad(), runner.hooked():
        for batch in data.batches(0, stop):
            runner.forward({k: v.to(device) for k, v in batch.items()})
    del model
    release_scratch()
    stats = ActivationStats({i: s.to("cpu") for i, s in result.items()},
                            {**data.describe(), "samples": min(stop or data.num_samples, data.num_samples),
                             "device": str(device)})
    return stats


class _HookedForward:
    """Produces FFN activations by a whole-model forward with hooks (a layer-by-layer runner can
    replace it: it only needs to call ``LayerStats.update`` per batch)."""

    def __init__(self, model: torch.nn.Module, family: Any, layers: list[int], stats: dict[int, LayerStats],
                 want_inputs: bool):
        self.model, self.stats, self.want_inputs = model, stats, want_inputs
        canonical = family.canonical_names(list(model.state_dict()))
        prefix = family.base_prefix(set(canonical)) or ""
        self.modules = {}
        for layer in layers:
            names = family.ffn_names(prefix, layer)
            path = {role: canonical[names[role]].removesuffix(".weight") for role in ("up", "down")}
            self.modules[layer] = {role: model.get_submodule(p) for role, p in path.items()}
        self.mask: torch.Tensor | None = None
        self._inputs: dict[int, torch.Tensor] = {}

    @contextmanager
    def hooked(self) -> Iterator[None]:
        handles = []
        for layer, mods in self.modules.items():
            if self.want_inputs:
                handles.append(mods["up"].register_forward_pre_hook(self._input_hook(layer)))
            handles.append(mods["down"].register_forward_pre_hook(self._act_hook(layer)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        flat = t.reshape(-1, t.shape[-1])
        return flat[self.mask.reshape(-1).bool()] if self.mask is not None else flat

    def _input_hook(self, layer: int):
        def hook(module: torch.nn.Module, args: tuple) -> None:
            self._inputs[layer] = self._rows(args[0])
        return hook

    def _act_hook(self, layer: int):
        def hook(module: torch.nn.Module, args: tuple) -> None:
            self.stats[layer].update(self._rows(args[0]), self._inputs.pop(layer, None))
        return hook

    def forward(self, batch: dict[str, torch.Tensor]) -> None:
        self.mask = batch.get("attention_mask")
        self.model(**batch)


def centroid_router(units: list[torch.Tensor], stats: LayerStats, norm: float) -> torch.Tensor:
    """Router rows (E × d) from calibration: expert e's row points from the mean FFN input to the
    mean input seen when its units are active (weighted by |a|), scaled to length ``norm``.

    Top-k routing then sends a token to the experts whose units it would activate most.
    """
    if stats.input_sums is None:
        raise CalibrationError("--router-init centroid needs calibration statistics with FFN inputs; pass --calibration PATH")
    mean = (stats.input_total / max(stats.tokens, 1)).cpu()
    rows = []
    for idx in units:
        weight = stats.l1.cpu()[idx].sum().clamp(min=1e-30)
        centre = stats.input_sums.cpu()[idx].sum(0) / weight - mean
        rows.append(centre / centre.norm().clamp(min=1e-30) * norm)
    return torch.stack(rows).float()


def statistics_for(ckpt: DenseCheckpoint, options: Any, moe_layers: list[int], modality: str) -> ActivationStats | None:
    """The statistics an upcycling run needs, read from ``options.stats_cache`` when its key
    matches, else collected from ``options.calibration`` (and cached there). None when none needed.

        >>> stats = statistics_for(ckpt, UpcycleOptions(strategy="importance", calibration="imgs/"), [1], "image")  # doctest: +SKIP
    """
    from ckptforge.calibration_data import load_calibration

    needs = needed_stats(options)
    if not needs:
        return None
    if not options.calibration:
        raise CalibrationError(missing_calibration_message(options))
    data = load_calibration(options.calibration, ckpt, modality, samples=options.calib_samples,
                            batch_size=options.calib_batch_size, seed=options.seed)
    threshold = options.strategy_params.get("threshold", CoactivationSettings.threshold)
    key = stats_key(ckpt, data, moe_layers, threshold, needs)
    if options.stats_cache and (cached := load_stats(options.stats_cache, key)) is not None:
        cached.calibration["cache"] = "hit"
        return cached
    from ckptforge.calibration_runner import collect  # the whole model, or layer by layer when it would not fit
    from ckptforge.families import detect_family

    stats = collect(ckpt, detect_family(ckpt.config), data, moe_layers, threshold=threshold, needs=needs)
    stats.key = key
    if options.stats_cache:
        stats.save(options.stats_cache)
        stats.calibration["cache"] = "written"
    return stats


def dense_weights_path(ckpt: DenseCheckpoint) -> Path:
    """What :func:`ckptforge.loading.load_model` loads the dense checkpoint from."""
    if len(ckpt.weight_files) == 1 and ckpt.weight_files[0].name not in ("model.safetensors", "pytorch_model.bin"):
        return ckpt.weight_files[0]
    return ckpt.root
