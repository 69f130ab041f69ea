"""Multi-source MoE (mergekit-moe's job): expert e's FFN from source e, attention / norms /
embeddings / head from the base, routers from prompts computed layer by layer.

    >>> spec = load_moe_config("moe.yml")                             # doctest: +SKIP
    >>> result = upcycle_multisource(spec, "out/moe")                 # doctest: +SKIP
"""

from __future__ import annotations

from .convert import MultiSourceResult, upcycle_multisource
from .gates import DegenerateGatesWarning, Gates, compute_gates
from .plan import MultiSourcePlan, plan_multisource
from .runner import LayerRunner
from .spec import ExpertSpec, MoESpec, load_moe_config, native_spec

__all__ = ["DegenerateGatesWarning", "ExpertSpec", "Gates", "LayerRunner", "MoESpec", "MultiSourcePlan",
           "MultiSourceResult", "compute_gates", "load_moe_config", "native_spec", "plan_multisource",
           "upcycle_multisource"]
