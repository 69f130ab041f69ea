"""Run a function right after a module is first imported (a post-import hook), or now if it already is.

``import ckptforge`` must stay cheap (the CLI's ``--help`` imports neither torch nor transformers), yet
after it ``AutoModel.from_pretrained`` must know ``vit_moe`` / ``bert_moe``. transformers' Auto
mappings only take classes, and its config classes import torch, so ckptforge registers them the
moment transformers itself is imported — whoever imports it, and in whichever order.

    >>> seen = []
    >>> when_imported("json", lambda module: seen.append(module.__name__))
    >>> seen
    ['json']
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import threading
from types import ModuleType
from typing import Any, Callable

Callback = Callable[[ModuleType], None]

_pending: dict[str, list[Callback]] = {}
_lock = threading.RLock()


def when_imported(name: str, callback: Callback) -> None:
    """Call ``callback(module)`` once module ``name`` has been imported (at once if it already is)."""
    with _lock:
        module = sys.modules.get(name)
        if module is None:
            _pending.setdefault(name, []).append(callback)
            if not any(isinstance(f, _PostImportFinder) for f in sys.meta_path):
                sys.meta_path.insert(0, _PostImportFinder())
            return
    callback(module)


def _run_pending(name: str) -> None:
    with _lock:
        callbacks = _pending.pop(name, [])
    for callback in callbacks:
        callback(sys.modules[name])


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the real loader of a watched module so the callbacks run after it."""

    _searching: set[str] = set()

    def find_spec(self, fullname: str, path: Any, target: ModuleType | None = None) -> Any:
        if fullname not in _pending or fullname in self._searching:
            return None
        self._searching.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._searching.discard(fullname)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _CallbackLoader(spec.loader, fullname)
        return spec


class _CallbackLoader(importlib.abc.Loader):
    """Delegates to the real loader; after ``exec_module`` restores it and runs the callbacks."""

    def __init__(self, loader: importlib.abc.Loader, name: str) -> None:
        self._loader, self._name = loader, name

    def create_module(self, spec: Any) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        if getattr(module, "__loader__", None) is self:
            module.__loader__ = self._loader
        if getattr(module.__spec__, "loader", None) is self:
            module.__spec__.loader = self._loader
        _run_pending(self._name)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._loader, attr)
