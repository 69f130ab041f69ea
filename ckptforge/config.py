"""The declarative options of an upcycling run, validated up front (all problems together).

    >>> opts = UpcycleOptions(num_experts=4, top_k=2, layers="every-2")
    >>> parse_layers(opts.layers, 4)
    [1, 3]
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ckptforge.moe.settings import ROUTER_SETTINGS as SETTINGS_CLASSES
from ckptforge.moe.settings import router_settings as settings_of
from ckptforge.strategy_settings import strategy_problems

#: ``--dtype`` value → the name of the torch dtype it forces (None: keep the source's).
DTYPES: dict[str, str | None] = {
    "auto": None, "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16",
    "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
}
ROUTER_INITS = ("normal", "zeros", "centroid")
#: Default strategy for soft/sphero routers when calibration data is given (MoE Jetpack's
#: importance sampling); otherwise (and for every other router) the default is copy-all.
SLOT_ROUTER_STRATEGY = "importance"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


@dataclass
class UpcycleOptions:
    """Everything the user chose for one conversion; recorded in ``ckptforge.json``."""

    num_experts: int = 8
    top_k: int = 2
    layers: str = "every-2"
    #: None: copy-all, or SLOT_ROUTER_STRATEGY for soft/sphero routers given calibration data
    strategy: str | None = None
    strategy_params: dict[str, Any] = field(default_factory=dict)
    router: dict[str, Any] = field(default_factory=lambda: {"type": "topk", "normalize": True})
    router_init: str = "normal"
    router_init_std: float = 0.02
    seed: int = 0
    dtype: str = "auto"
    shard_size: int = 5 * 10**9
    # calibration (issue 3): data for strategies that need activation statistics / centroid routers
    calibration: str | None = None
    calib_samples: int = 256
    calib_batch_size: int = 16
    stats_cache: str | None = None
    # --- issue 6 (recipes): the resolved recipe (name, file hash, values, overrides), or None ---
    recipe: dict[str, Any] | None = None
    # --- issue 13: cross-size recycling: experts sliced from this wider dense teacher ---
    teacher: str | None = None

    def __post_init__(self) -> None:
        if self.strategy is None and self.teacher:  # MoE Jetpack's cross-size recipe samples by importance
            self.strategy = "importance"
        if self.strategy is None:
            slot_router = self.router.get("type") in ("soft", "sphero")
            self.strategy = SLOT_ROUTER_STRATEGY if slot_router and self.calibration else "copy-all"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def problems(self) -> list[str]:
        """Problems that need no checkpoint to find."""
        out = []
        if self.num_experts < 2:
            out.append(f"--experts {self.num_experts} makes no mixture; use 2 or more experts")
        if self.top_k < 1:
            out.append(f"--top-k {self.top_k} must be at least 1")
        elif self.num_experts >= 2 and self.top_k > self.num_experts:
            out.append(f"--top-k {self.top_k} is larger than --experts {self.num_experts}; use --top-k ≤ {self.num_experts}")
        if self.router_init not in ROUTER_INITS:
            out.append(f"--router-init {self.router_init!r} is not one of {', '.join(ROUTER_INITS)}")
        if self.dtype not in DTYPES:
            out.append(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.calib_samples < 1 or self.calib_batch_size < 1:
            out.append("--calib-samples and --calib-batch-size must be at least 1")
        if self.shard_size < 1:
            out.append("--shard-size must be positive, e.g. 5GB or 500MB")
        return out + router_problems(self.router) + strategy_problems(self.strategy, self.strategy_params)


# --- routers (issue 4; issue 12: the settings live in ckptforge/moe/settings.py) ------------------
#: Router type → the settings it takes (the CLI flag of each: :func:`ckptforge.moe.settings.flag_of`).
ROUTER_SETTINGS: dict[str, tuple[str, ...]] = {
    kind: tuple(f.name for f in fields(cls) if f.name != "given") for kind, cls in SETTINGS_CLASSES.items()
}


def router_settings(kind: str, **given: Any) -> dict[str, Any]:
    """The ``UpcycleOptions.router`` dict for ``--router kind`` and the router flags that were given (not None).

    Only given values are stored (so ``config.json`` stays as it was); the defaults live in the
    settings class. ``normalize`` is stored for the routers that have it.

        >>> router_settings("topk", capacity_factor=1.05, bpr=True, slots=None)
        {'type': 'topk', 'normalize': True, 'capacity_factor': 1.05, 'bpr': True}
    """
    out: dict[str, Any] = {"type": kind}
    if "normalize" in ROUTER_SETTINGS.get(kind, ()):
        out["normalize"] = True
    out.update({k: v for k, v in given.items() if v is not None})
    return out


def router_problems(router: dict[str, Any], hidden_size: int | None = None) -> list[str]:
    """Problems with a router's settings (``UpcycleOptions.router``); all of them, with the fix.

        >>> router_problems({"type": "mh", "heads": 5}, hidden_size=32)
        ['--heads 5 does not divide hidden size 32; use a divisor of 32']
    """
    try:
        settings = settings_of(router)
    except ValueError as exc:
        return [str(exc)]
    except TypeError as exc:
        return [f"router settings are not understood: {exc}"]
    return settings.problems(hidden_size)


def parse_size(text: str | int) -> int:
    """'5GB' → 5_000_000_000; '512MiB' → 536_870_912; plain integers are bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    unit = (m.group(2) or "").lower().rstrip("b") if m else ""
    if not m or unit not in _UNITS:
        raise ValueError(f"size {text!r} is not understood; write e.g. 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * _UNITS[unit])


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """Resolve ``all`` | ``every-N`` (layers N-1, 2N-1, …) | ``last-N`` | ``last-P%`` | ``i,j,k`` to layer indices.

    Raises ValueError with the fix in the message.
    """
    spec = spec.strip().lower()
    if spec == "all":
        return list(range(num_layers))
    if m := re.fullmatch(r"every-(\d+)", spec):
        step = int(m.group(1))
        if step < 1:
            raise ValueError("--layers every-N needs N ≥ 1")
        return list(range(step - 1, num_layers, step))
    if m := re.fullmatch(r"last-(\d+)%", spec):  # issue 6: recipes say "the last half" as last-50%
        share = int(m.group(1))
        if not 1 <= share <= 100:
            raise ValueError(f"--layers last-{share}% is out of range; use a share between 1% and 100%")
        return list(range(num_layers - max(1, round(num_layers * share / 100)), num_layers))
    if m := re.fullmatch(r"last-(\d+)", spec):
        n = int(m.group(1))
        if not 1 <= n <= num_layers:
            raise ValueError(f"--layers last-{n} is out of range; the model has {num_layers} layers")
        return list(range(num_layers - n, num_layers))
    try:
        layers = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"--layers {spec!r} is not understood; use all, every-N, last-N or i,j,k") from None
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad or not layers:
        raise ValueError(
            f"--layers {spec}: layer index {bad[0] if bad else '(none)'} is out of range; "
            f"the model has layers 0..{num_layers - 1}"
        )
    return layers
