"""Issue 15: ``upcycle --dry-run`` plans without importing torch or transformers, and its plan is the
one the library builds when it learns a ckptforge format's tensor names from the modeling class."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import subprocess
import sys
import textwrap

import pytest

from ckptforge.cli import main
from ckptforge.families import FAMILIES, OUTPUT_FORMATS
from conftest import REPO, cli_env

_FRESH = textwrap.dedent("""
    import contextlib, io, json, sys
    from ckptforge.cli import main
    with contextlib.redirect_stdout(io.StringIO()) as out:
        code = main(sys.argv[1:])
    print(json.dumps({"code": code, "out": out.getvalue(),
                      "heavy": [m for m in ("torch", "transformers") if m in sys.modules]}))
""")
CASES = [
    ("examples/tiny-llama-pydoc", []),
    ("examples/tiny-vit-mnist", []),
    ("examples/tiny-vit-mnist", ["--router", "sphero", "--strategy", "granular", "--dtype", "bf16"]),
    ("examples/tiny-vit-mnist", ["--router", "mh", "--heads", "2", "--strategy", "importance"]),
    ("bert-mlm", ["--router", "soft", "--layers", "all"]),
    ("bert", ["--router", "expert-choice"]),
    ("vit-base-model", ["--strategy", "random", "--experts", "4", "--top-k", "1"]),
]


def _source(tiny, name: str) -> str:
    return name if name.startswith("examples/") else str(tiny(name))


@pytest.mark.parametrize(("source", "flags"), CASES, ids=[f"{s.rsplit('/', 1)[-1]}{''.join(f)}" for s, f in CASES])
def test_dry_run_imports_no_torch_and_plans_as_the_modeling_class_declares(tiny, monkeypatch, source, flags):
    args = ["upcycle", _source(tiny, source), "--dry-run", "--json", *flags]
    done = subprocess.run([sys.executable, "-c", _FRESH, *args], env=cli_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    fresh = json.loads(done.stdout.strip().splitlines()[-1])
    assert fresh["code"] == 0 and fresh["heavy"] == []
    for name, fmt in OUTPUT_FORMATS.items():  # the names from the class built on the meta device instead
        monkeypatch.setitem(OUTPUT_FORMATS, name, dataclasses.replace(fmt, state_names=None))
    for family in FAMILIES.values():
        if getattr(family, "format", None) is not None:
            monkeypatch.setattr(family, "format", dataclasses.replace(family.format, state_names=None))
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert main(args) == 0
    assert json.loads(fresh["out"]) == json.loads(out.getvalue())


def test_a_refused_dry_run_imports_no_torch_either():
    args = ["upcycle", "examples/tiny-vit-mnist", "--dry-run", "--json", "--strategy", "coactivation"]
    done = subprocess.run([sys.executable, "-c", _FRESH, *args],
                          env=cli_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    fresh = json.loads(done.stdout.strip().splitlines()[-1])
    assert fresh["code"] == 2 and fresh["heavy"] == []
    assert "needs activation statistics" in done.stderr


def test_inspect_of_an_moe_checkpoint_imports_no_torch(converted):
    """Its active parameters come from the torch-free router layouts (``ckptforge.moe.layout``)."""
    done = subprocess.run([sys.executable, "-c", _FRESH, "inspect", str(converted), "--json"], env=cli_env(),
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    fresh = json.loads(done.stdout.strip().splitlines()[-1])
    assert fresh["code"] == 0 and fresh["heavy"] == []
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert main(["inspect", str(converted), "--json"]) == 0
    info = json.loads(fresh["out"])
    assert info == json.loads(out.getvalue()) and info["is_moe"] is True
    assert 0 < info["params_active"] < info["params_total"]
