"""Learning-rate schedules of ``finetune --schedule``: a factor on ``--lr`` per step, after a linear
warm-up of ``--warmup-steps``.

- ``constant``: 1 after the warm-up.
- ``cosine``: half a cosine from 1 down to 0 at the last step.
- ``inverse-sqrt``: ``sqrt(w / step)`` after a warm-up of w steps (w ≥ 1) — the schedule of T5 and
  sparse upcycling, which continues the dense run's inverse square root decay.

    >>> f = lr_factor("inverse-sqrt", warmup_steps=4, total_steps=100)
    >>> [round(f(s), 3) for s in (0, 3, 15)]
    [0.25, 1.0, 0.5]
"""

from __future__ import annotations

import math
from typing import Callable

#: name → (step index from 0, warm-up steps w ≥ 1, total steps) → factor after the warm-up.
SCHEDULES: dict[str, Callable[[int, int, int], float]] = {
    "constant": lambda s, w, n: 1.0,
    "cosine": lambda s, w, n: 0.5 * (1.0 + math.cos(math.pi * min(1.0, (s - w + 1) / max(1, n - w)))),
    "inverse-sqrt": lambda s, w, n: math.sqrt(w / (s + 1)),
}


def lr_factor(name: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The factor on the learning rate at optimiser step ``s`` (0-based), for ``LambdaLR``."""
    decay, warmup = SCHEDULES[name], max(1, warmup_steps)

    def factor(s: int) -> float:
        return (s + 1) / warmup if s + 1 < warmup else decay(s, warmup, total_steps)

    return factor
