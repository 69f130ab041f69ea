"""Which pass produces calibration statistics: a whole-model forward, or the layer-by-layer runner.

DESIGN §2: activations come from behind one interface, so a model larger than RAM can calibrate.
The whole-model forward (``ckptforge.calibration.collect_stats``) loads the dense model in
float32 and runs each batch through it once; the layer-by-layer runner
(``ckptforge.multisource.runner.collect_stats_layerwise``) holds one decoder layer plus every
batch's hidden states. Both give the same statistics. The whole-model pass is used while the
float32 model fits in half the memory this process may still take; beyond that (and for families
that declare ``layer_runner``: decoder-only LLMs) the layer runner is. The environment variable
``CKPTFORGE_CALIBRATION_RUNNER`` = ``auto`` (default) | ``model`` | ``layers`` forces a choice.

    >>> choose_runner(fits=True, supported=True)
    'model'
    >>> choose_runner(fits=False, supported=True)
    'layers'
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ckptforge.errors import UsageError

#: The environment variable that forces a runner, and its values (the first is the default).
RUNNER_ENV = "CKPTFORGE_CALIBRATION_RUNNER"
RUNNERS = ("auto", "model", "layers")
#: The whole-model pass runs while the float32 model takes at most this share of the available memory.
MODEL_SHARE = 0.5


def choose_runner(*, fits: bool, supported: bool, family: str = "this") -> str:
    """``model`` or ``layers``, from :data:`RUNNER_ENV` or, when it is ``auto``, from whether the
    model ``fits`` in memory and the family ``supported`` the layer runner."""
    setting = os.environ.get(RUNNER_ENV, "auto") or "auto"
    if setting not in RUNNERS:
        raise UsageError(f"{RUNNER_ENV}={setting!r} is not one of {', '.join(RUNNERS)}; unset it or pick one")
    if setting == "layers" and not supported:
        raise UsageError(f"{RUNNER_ENV}=layers: {family} checkpoints cannot be run layer by layer (decoder-only "
                         "LLMs can); unset it")
    if setting != "auto":
        return setting
    return "model" if fits or not supported else "layers"


def collect(ckpt: Any, family: Any, data: Any, layers: list[int], *, threshold: str, needs: set[str]) -> Any:
    """:class:`~ckptforge.calibration.ActivationStats` of ``layers``, from the runner :func:`choose_runner` picks."""
    from ckptforge.calibration import collect_stats

    runner = choose_runner(fits=model_fits(ckpt), supported=getattr(family, "layer_runner", False), family=family.name)
    if runner == "layers":
        from ckptforge.multisource.runner import collect_stats_layerwise

        return collect_stats_layerwise(ckpt, data, layers, threshold=threshold, needs=needs)
    return collect_stats(ckpt, data, layers, threshold=threshold, needs=needs)


def model_fits(ckpt: Any, available: int | None = None) -> bool:
    """Whether the float32 model takes at most :data:`MODEL_SHARE` of ``available`` bytes (default:
    :func:`available_memory`)."""
    fp32_bytes = 4 * sum(t.numel for t in ckpt.tensors.values())
    return fp32_bytes <= MODEL_SHARE * (available_memory() if available is None else available)


def available_memory() -> int:
    """Bytes this process may still take: the kernel's MemAvailable, capped by its memory cgroup's
    limit less the cgroup's usage (page cache that can be dropped not counted; cgroup v1 or v2)."""
    available = _meminfo_available()
    for limit, usage in _cgroup_limits():
        available = min(available, max(0, limit - usage))
    return available


def _meminfo_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 1 << 62  # unknown: assume plenty (the whole-model pass, as before)


def _cgroup_limits() -> list[tuple[int, int]]:
    """(limit, usage less inactive page cache) of this process's memory cgroup, when it sets a limit."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):  # v1
            root = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        elif controllers == "":  # v2
            root = Path("/sys/fs/cgroup") / path.lstrip("/")
            files = ("memory.max", "memory.current", "inactive_file")
        else:
            continue
        try:
            limit_text = (root / files[0]).read_text().strip()
            if limit_text == "max" or int(limit_text) >= 1 << 60:
                continue
            usage = int((root / files[1]).read_text())
            stat = dict(line.split() for line in (root / "memory.stat").read_text().splitlines())
            out.append((int(limit_text), usage - int(stat.get(files[2], 0))))
        except (OSError, ValueError):
            continue
    return out
