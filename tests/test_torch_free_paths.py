"""Issue 15: ``inspect`` of a local safetensors checkpoint indexes it from the JSON headers and
imports no torch; the index equals the safetensors library's own reading, and headers the library
would refuse are refused (exit 3, one line)."""

from __future__ import annotations

import json
import math
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ckptforge.errors import SourceError
from ckptforge.io.source import open_checkpoint
from conftest import REPO, cli_env, run_cli


def _inspect_in_fresh_interpreter(source: Path) -> dict:
    code = textwrap.dedent("""
        import contextlib, io, json, sys
        from ckptforge.cli import main
        with contextlib.redirect_stdout(io.StringIO()) as out:
            code = main(["inspect", sys.argv[1], "--json"])
        print(json.dumps({"code": code, "info": json.loads(out.getvalue()),
                          "heavy": [m for m in ("torch", "transformers") if m in sys.modules]}))
    """)
    done = subprocess.run([sys.executable, "-c", code, str(source)], env=cli_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", ["vit", "llama"])
def test_inspect_of_a_dense_checkpoint_imports_no_torch_and_matches_the_library(tiny, kind):
    dense = tiny(kind)
    if kind == "llama":  # a bf16 tensor beside the fp32 ones: dtype names and sizes per dtype
        from safetensors.torch import load_file, save_file

        state = load_file(dense / "model.safetensors")
        state["model.norm.weight"] = state["model.norm.weight"].to(torch.bfloat16)
        save_file(state, dense / "model.safetensors", metadata={"format": "pt"})
    result = _inspect_in_fresh_interpreter(dense)
    assert result["code"] == 0 and result["heavy"] == []
    with safe_open(str(dense / "model.safetensors"), framework="pt") as f:
        slices = {n: f.get_slice(n) for n in f.keys()}
        dtypes: dict[str, int] = {}
        for s in slices.values():
            name = str(getattr(torch, {"F32": "float32", "BF16": "bfloat16"}[s.get_dtype()])).removeprefix("torch.")
            dtypes[name] = dtypes.get(name, 0) + 1
        total = sum(math.prod(s.get_shape()) for s in slices.values())
    info = result["info"]
    assert (info["dtypes"], info["params_total"], info["tensors"]) == (dtypes, total, len(slices))
    assert info["family"] == kind and info["is_moe"] is False


def test_index_equals_the_safetensors_library(tiny):
    dense = tiny("bert")
    ckpt = open_checkpoint(dense)
    with safe_open(str(dense / "model.safetensors"), framework="pt") as f:
        assert list(ckpt.tensors) == list(f.keys())
        for name, info in ckpt.tensors.items():
            assert (info.dtype, info.shape) == (f.get_tensor(name).dtype, tuple(f.get_slice(name).get_shape()))
            assert torch.equal(ckpt.read(name), f.get_tensor(name))
    ckpt.close()


def _rewrite_header(path: Path, edit) -> None:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def _first(header: dict) -> dict:
    return header[sorted(k for k in header if k != "__metadata__")[0]]


@pytest.mark.parametrize("edit,match", [
    (lambda h: _first(h).update(shape=[3, 5, 7]), "does not fill bytes"),
    (lambda h: _first(h).update(dtype="F8_E4M3"), "unsupported dtype F8_E4M3"),
    (lambda h: _first(h).pop("shape"), "bad entry"),
])
def test_headers_the_library_refuses_are_refused(tiny, tmp_path, edit, match):
    dense = tiny("vit")
    _rewrite_header(dense / "model.safetensors", edit)
    with pytest.raises(SourceError, match=match):
        open_checkpoint(dense)
    done = run_cli("inspect", str(dense))
    assert done.returncode == 3 and match in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_overlapping_tensor_data_is_refused(tiny):
    """Two tensors of one size pointing at the same bytes: sizes add up, the spans do not tile."""
    dense = tiny("vit")

    def overlap(header: dict) -> None:
        names = [k for k in header if k != "__metadata__"]
        by_size: dict[int, list[str]] = {}
        for k in names:
            begin, end = header[k]["data_offsets"]
            by_size.setdefault(end - begin, []).append(k)
        a, b = next(v for v in by_size.values() if len(v) >= 2)[:2]
        header[b]["data_offsets"] = header[a]["data_offsets"]

    _rewrite_header(dense / "model.safetensors", overlap)
    with pytest.raises(SourceError, match="overlaps or leaves a gap|truncated or padded"):
        open_checkpoint(dense)


def test_pickle_checkpoints_still_index_with_torch_dtypes(tiny, tmp_path):
    dense = tiny("vit")
    from safetensors.torch import load_file

    torch.save(load_file(dense / "model.safetensors"), tmp_path / "pytorch_model.bin")
    shutil.copy(dense / "config.json", tmp_path / "config.json")
    ckpt = open_checkpoint(tmp_path)
    info = ckpt.tensors["classifier.weight"]
    assert (info.dtype, info.dtype_name) == (torch.float32, "float32")
