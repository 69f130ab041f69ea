"""Remote code as Hugging Face ships it: one ``configuration_<type>.py`` and one self-contained
``modeling_<type>.py`` beside the weights, generated from ckptforge's own sources.

Each file is bundled from one entry module: the configuration file from
``modeling/configuration_<type>.py`` (with ``moe_config.py``, the MoE fields both configs share),
the modeling file from ``modeling/<type>.py`` (with ``common.py`` and the ``moe`` layers). Every
ckptforge module an entry imports is inlined before it in dependency order: their relative imports
are dropped (the names then live in one module), their absolute imports are gathered at the top,
and the modeling file's import of the configuration module stays relative, as in transformers' own
remote-code repos. Standard library only; nothing here imports torch.

    >>> sorted(write_remote_code("vit_moe", Path("out/moe")))        # doctest: +SKIP
    ['configuration_vit_moe.py', 'modeling_vit_moe.py']
"""

from __future__ import annotations

import ast
from pathlib import Path

_MODELING_DIR = Path(__file__).resolve().parent / "modeling"
#: Modules shipped as their own file, imported relatively by the modeling file.
_SHIPPED_PREFIX = "configuration_"


class RemoteCodeError(RuntimeError):
    """ckptforge's own sources cannot be bundled (a packaging bug, not a user error)."""


def write_remote_code(module: str, out_dir: Path) -> list[str]:
    """Write ``configuration_<module>.py`` and ``modeling_<module>.py`` into ``out_dir``; their names."""
    config_name, modeling_name = f"{_SHIPPED_PREFIX}{module}.py", f"modeling_{module}.py"
    (out_dir / config_name).write_text(bundle(_MODELING_DIR / config_name))
    (out_dir / modeling_name).write_text(bundle(_MODELING_DIR / f"{module}.py"))
    return [config_name, modeling_name]


def bundle(entry: Path) -> str:
    """The text of one module holding ``entry`` and every package module it imports (relative
    imports, transitively), dependencies first. Two modules defining the same top-level name, an
    aliased or a nested relative import raise :class:`RemoteCodeError`. A ``configuration_*`` module
    beside ``entry`` is not inlined: its import stays relative (it ships as its own file)."""
    order = _dependency_order(entry.resolve())
    imports: list[ast.Import | ast.ImportFrom] = []
    bodies: list[str] = []
    owner: dict[str, Path] = {}
    for path in order:
        tree = ast.parse(path.read_text(), str(path))
        _check_names(path, tree, owner)
        head, body = _split(path, tree, entry.resolve())
        imports += head
        bodies.append(body)
    source = entry.read_text()
    first = ast.parse(source).body[:1]
    docstring = first and ast.get_docstring(ast.Module(body=first, type_ignores=[])) is not None
    top = [ast.get_source_segment(source, first[0]) + "\n"] if docstring else []  # as written, escapes kept
    return "\n".join([*top, *_merged_imports(imports), "", *bodies]).rstrip() + "\n"


def _merged_imports(nodes: list[ast.Import | ast.ImportFrom]) -> list[str]:
    """One statement per imported module, in first-seen order; ``__future__`` first, relative last."""
    plain: list[str] = []
    names: dict[tuple[int, str], list[str]] = {}
    for node in nodes:
        for alias in node.names:
            text = alias.name + (f" as {alias.asname}" if alias.asname else "")
            if isinstance(node, ast.Import):
                plain += [text] if text not in plain else []
            else:
                listed = names.setdefault((node.level, node.module or ""), [])
                listed += [text] if text not in listed else []
    order = sorted(names, key=lambda key: (key[1] != "__future__", key[0] > 0))
    froms = [f"from {'.' * level}{module} import {', '.join(names[(level, module)])}" for level, module in order]
    future = [line for line in froms if line.startswith("from __future__")]
    return [*future, *([""] if future else []), *(f"import {n}" for n in plain), *froms[len(future):]]


def _relative_target(path: Path, node: ast.ImportFrom) -> Path:
    base = path.parent
    for _ in range(node.level - 1):
        base = base.parent
    return base.joinpath(*(node.module or "").split(".")).with_suffix(".py")


def _shipped(target: Path, entry_dir: Path) -> bool:
    """A ``configuration_*`` module beside the entry: shipped as its own file, not inlined."""
    return target.resolve().parent == entry_dir and target.stem.startswith(_SHIPPED_PREFIX)


def _dependency_order(entry: Path) -> list[Path]:
    """``entry`` and the package modules it imports, each after the modules it imports."""
    order: list[Path] = []
    visiting: set[Path] = set()

    def visit(path: Path) -> None:
        if path in order:
            return
        if path in visiting:
            raise RemoteCodeError(f"import cycle through {path.name}")
        visiting.add(path)
        for node in ast.parse(path.read_text(), str(path)).body:
            if not (isinstance(node, ast.ImportFrom) and node.level):
                continue
            target = _relative_target(path, node)
            if not _shipped(target, entry.parent):
                visit(target.resolve())
        visiting.discard(path)
        order.append(path)

    visit(entry)
    return order


def _split(path: Path, tree: ast.Module, entry: Path) -> tuple[list[ast.Import | ast.ImportFrom], str]:
    """(the imports the bundle keeps, the module's text without its imports and docstring)."""
    lines = path.read_text().splitlines()
    drop: set[int] = set()
    head: list[ast.Import | ast.ImportFrom] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level and node not in tree.body:
            raise RemoteCodeError(f"{path.name}:{node.lineno}: a relative import inside a function cannot be bundled")
    for i, node in enumerate(tree.body):
        span = range(node.lineno - 1, node.end_lineno)
        if i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            drop.update(span)  # the docstring (the entry's heads the bundle)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            drop.update(span)
            if isinstance(node, ast.ImportFrom) and node.level:
                if any(alias.asname for alias in node.names):
                    raise RemoteCodeError(f"{path.name}:{node.lineno}: an aliased relative import cannot be bundled")
                if not _shipped(_relative_target(path, node), entry.parent):
                    continue
            head.append(node)
    body = "\n".join(line for n, line in enumerate(lines) if n not in drop).strip("\n")
    banner = "" if path == entry else f"# ---- {path.relative_to(entry.parents[2]).as_posix()} ----\n\n"
    return head, f"{banner}{body}\n\n"


def _check_names(path: Path, tree: ast.Module, owner: dict[str, Path]) -> None:
    """Record the top-level names ``path`` defines; one already defined by another module raises."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [t.id for t in targets if isinstance(t, ast.Name)]
        else:
            continue
        for name in names:
            if name in owner and owner[name] != path and name != "__all__":
                raise RemoteCodeError(f"{name!r} is defined in both {owner[name].name} and {path.name}; "
                                      "rename one so that the modeling file can be bundled")
            owner[name] = path
