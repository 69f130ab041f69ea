"""ckptforge: turn dense checkpoints (ViT, BERT, LLaMA/Mistral/Qwen2) into Mixture-of-Experts checkpoints.

    >>> import ckptforge
    >>> result = ckptforge.upcycle("examples/tiny-vit-mnist", "out/moe",
    ...                            ckptforge.UpcycleOptions(num_experts=4))      # doctest: +SKIP
    >>> ckptforge.verify_model("out/moe").passed                                  # doctest: +SKIP
    True
"""

from __future__ import annotations

from ckptforge.interrupt import quiet_start_up  # issue 11: keep first, before any heavy import

quiet_start_up()

from importlib.metadata import PackageNotFoundError, version  # noqa: E402

try:
    __version__ = version("ckptforge")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

from ckptforge import modeling  # noqa: E402  (registers vit_moe / bert_moe with the Auto classes)
from ckptforge.config import UpcycleOptions  # noqa: E402
from ckptforge.execute import UpcycleResult, upcycle  # noqa: E402
from ckptforge.inspection import inspect_source  # noqa: E402
from ckptforge.io.source import open_checkpoint  # noqa: E402
from ckptforge.plan import Plan, build_plan  # noqa: E402
from ckptforge.verify import VerifyReport, verify_model  # noqa: E402

load_source = open_checkpoint

__all__ = [
    "Plan", "UpcycleOptions", "UpcycleResult", "VerifyReport", "__version__", "build_plan",
    "inspect_source", "load_source", "modeling", "open_checkpoint", "upcycle", "verify_model",
]
