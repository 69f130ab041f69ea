"""Extract the English prose of ``examples/stdlib-docstrings/``: the docstrings of Python's own
standard library (PSF licence), text that the example causal LM (trained on ``pydoc_data.topics``,
the language reference) has not seen.

The top-level ``*.py`` modules of the running interpreter's stdlib are read in name order with
``ast`` (nothing is imported); every module, class and function docstring of at least
``--min-words`` words is kept (``inspect.cleandoc`` indentation). Every ``--eval-every``-th module
goes to ``eval.txt``, the rest to ``train.txt``; docstrings are separated by a blank line.

    python examples/extract_stdlib_docstrings.py
"""

from __future__ import annotations

import argparse
import ast
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "stdlib-docstrings"
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def docstrings(path: Path, min_words: int) -> list[str]:
    """The docstrings of one module in source order (module first), each of at least ``min_words`` words."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError):
        return []
    found = [ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, _DOC_NODES)]
    return [d for d in found if d and len(d.split()) >= min_words]


def main(argv: Sequence[str] | None = None) -> None:
    """Write ``train.txt`` and ``eval.txt``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--min-words", type=int, default=20)
    parser.add_argument("--eval-every", type=int, default=10)
    args = parser.parse_args(argv)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    train, held = [], []
    for i, path in enumerate(sorted(stdlib.glob("*.py"))):
        (held if i % args.eval_every == args.eval_every - 1 else train).extend(docstrings(path, args.min_words))
    args.out.mkdir(parents=True, exist_ok=True)
    for name, texts in (("train.txt", train), ("eval.txt", held)):
        (args.out / name).write_text("\n\n".join(texts) + "\n", encoding="utf-8")
        print(f"{name}: {len(texts)} docstrings, {sum(len(t) for t in texts):,} characters")
    print(f"from {stdlib} (Python {sys.version.split()[0]})")


if __name__ == "__main__":
    main()
