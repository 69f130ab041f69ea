"""ckptforge: turn dense checkpoints (ViT, BERT, LLaMA/Mistral/Qwen2) into Mixture-of-Experts checkpoints.

    >>> import ckptforge
    >>> result = ckptforge.upcycle("examples/tiny-vit-mnist", "out/moe",
    ...                            ckptforge.UpcycleOptions(num_experts=4))      # doctest: +SKIP
    >>> ckptforge.verify_model("out/moe").passed                                  # doctest: +SKIP
    True

Importing ckptforge is cheap: the public names below load their modules (and torch) on first use,
and ``vit_moe`` / ``bert_moe`` join transformers' Auto classes as soon as transformers is imported.
"""

from __future__ import annotations

from ckptforge.interrupt import quiet_start_up  # issue 11: keep first, before any heavy import

quiet_start_up()

import importlib  # noqa: E402
from typing import Any  # noqa: E402

from ckptforge.import_hooks import when_imported  # noqa: E402

#: public name → the module that defines it (imported on first access).
_PUBLIC = {
    "Plan": "ckptforge.plan", "build_plan": "ckptforge.plan",
    "UpcycleOptions": "ckptforge.config",
    "UpcycleResult": "ckptforge.execute", "upcycle": "ckptforge.execute",
    "VerifyReport": "ckptforge.verify", "verify_model": "ckptforge.verify",
    "inspect_source": "ckptforge.inspection",
    "open_checkpoint": "ckptforge.io.source",
}
_ALIASES = {"load_source": "open_checkpoint"}

__all__ = sorted([*_PUBLIC, *_ALIASES, "__version__", "modeling"])


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from ckptforge.version import installed_version

        value = globals()[name] = installed_version()
        return value
    if name == "modeling":
        return importlib.import_module("ckptforge.modeling")
    target = _ALIASES.get(name, name)
    if target not in _PUBLIC:
        raise AttributeError(f"module 'ckptforge' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[target]), target)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


def _register_auto_classes(_transformers: Any) -> None:
    importlib.import_module("ckptforge.modeling")  # registers vit_moe / bert_moe with the Auto classes


when_imported("transformers", _register_auto_classes)
