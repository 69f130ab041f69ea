"""Hostile and careless inputs (issue 11): each is refused with one line and its documented exit
code, writes nothing at or beside ``--out``, and leaves every input's bytes as they were.

The CLI table runs each case in a subprocess (``run_cli``) against one shared world of tiny
models and data built once per module; the whole world is hashed before and after every case, so
a case that writes anything anywhere in it, or changes a source byte, fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, build_tiny, cli_env, run_cli

W = dict[str, Path]


def _png(path: Path, seed: int) -> None:
    Image.fromarray((np.random.RandomState(seed).rand(28, 28) * 255).astype("uint8")).save(path)


def _variant(world: W, name: str, edit: Callable[[Path], object]) -> None:
    """A copy of the dense ViT with one file made hostile."""
    d = world["root"] / name
    shutil.copytree(world["vit"], d)
    edit(d)
    world[name] = d


def _header(d: Path, header: object) -> None:
    body = json.dumps(header).encode()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(body)) + body)


def _config(d: Path, **changes: object) -> None:
    config = json.loads((d / "config.json").read_text())
    config.update(changes)
    (d / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> W:
    import ckptforge

    root = tmp_path_factory.mktemp("hostile")
    w: W = {"root": root, "vit": build_tiny("vit", root / "vit"), "bert": build_tiny("bert", root / "bert"),
            "llama": build_tiny("llama", root / "llama")}
    shutil.copytree(w["llama"], root / "llama-marked")  # a source that also holds a ckptforge.json (e.g. an
    (root / "llama-marked" / "ckptforge.json").write_text("{}")  # output folder reused): --force must not take it
    w["llama_marked"] = root / "llama-marked"
    (root / "calib.txt").write_text("one line of calibration text\n" * 8)
    w["calib_txt"] = root / "calib.txt"
    w["moe"] = root / "moe"
    ckptforge.upcycle(w["vit"], w["moe"], ckptforge.UpcycleOptions(num_experts=4))
    imgs = w["imgs"] = root / "imgs"
    imgs.mkdir()
    for i in range(4):
        _png(imgs / f"{i}.png", i)
    classes = w["classes"] = root / "classes"
    for i in range(4):
        (classes / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        _png(classes / "ab"[i % 2] / f"{i}.png", i)
    corrupt = w["corrupt_imgs"] = root / "corrupt-imgs"
    shutil.copytree(imgs, corrupt)
    (corrupt / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 8)
    bomb = w["bomb_imgs"] = root / "bomb-imgs"
    shutil.copytree(imgs, bomb)
    Image.new("L", (20000, 20000)).save(bomb / "bomb.png")  # 400 M pixels in a few hundred KB
    bad_classes = w["bad_classes"] = root / "bad-classes"
    shutil.copytree(classes, bad_classes)
    (bad_classes / "a" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\nxx")
    (root / "latin1.txt").write_bytes("café au lait\n".encode("latin-1") * 8)
    w["latin1"] = root / "latin1.txt"
    (root / "a-file").write_text("not a directory")
    w["a_file"] = root / "a-file"
    (root / "user-files").mkdir()
    (root / "user-files" / "thesis.tex").write_text("precious")
    w["user_files"] = root / "user-files"
    (root / "foreign.pt").write_bytes(b"\x80\x04\x95\x0b\x00\x00\x00\x00\x00\x00\x00]\x94(K\x01K\x02e.")
    w["foreign"] = root / "foreign.pt"
    os.symlink(w["vit"], root / "link-to-vit")
    w["link"] = root / "link-to-vit"

    _variant(w, "hdr_list", lambda d: _header(d, [1, 2]))
    _variant(w, "dir_named_weights", lambda d: ((d / "model.safetensors").unlink(), (d / "model.safetensors").mkdir()))
    _variant(w, "index_list", lambda d: (d / "model.safetensors.index.json").write_text("[1]"))
    _variant(w, "index_int", lambda d: (d / "model.safetensors.index.json").write_text('{"weight_map": {"a": 3}}'))
    _variant(w, "index_outside", lambda d: (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "../vit/model.safetensors"}})))
    _variant(w, "index_absolute", lambda d: (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": str(w["vit"] / "model.safetensors")}})))
    _variant(w, "config_list", lambda d: (d / "config.json").write_text("[1]"))
    _variant(w, "config_no_layers", lambda d: _config(d, num_hidden_layers=None))
    _variant(w, "config_words", lambda d: _config(d, hidden_size="thirty-two"))
    _variant(w, "config_d_ff", lambda d: _config(d, intermediate_size=128))
    _variant(w, "config_1e9_layers", lambda d: _config(d, num_hidden_layers=1e9))
    _variant(w, "config_8_layers", lambda d: _config(d, num_hidden_layers=8))

    def moe_copy(name: str, edit: Callable[[Path], object]) -> None:
        d = root / name
        shutil.copytree(w["moe"], d)
        edit(d)
        w[name] = d

    weights = "model.safetensors"
    moe_copy("moe_truncated", lambda d: (d / weights).write_bytes((d / weights).read_bytes()[:-64]))
    moe_copy("moe_config_not_json", lambda d: (d / "config.json").write_text("{nope"))
    moe_copy("moe_edited", lambda d: _flip_last_bytes(d / weights))
    moe_copy("moe_files_null", lambda d: (d / "ckptforge.json").write_text(
        json.dumps({**json.loads((d / "ckptforge.json").read_text()), "files": None})))
    return w


def _flip_last_bytes(path: Path) -> None:
    """Edit the last weight (a tensor verify's seeded inputs hardly see) without changing its size."""
    data = bytearray(path.read_bytes())
    data[-8] ^= 0x40
    path.write_bytes(bytes(data))


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` (hidden ones included) → sha256 of its bytes, or its kind."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                out[key] = "link:" + os.readlink(path)
            elif path.is_dir():
                out[key] = "dir"
            else:
                out[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@dataclass
class Case:
    id: str
    args: Callable[[W], list]
    code: int
    says: str
    #: Run as ``python -m ckptforge`` in a subprocess (one case per class at least); the rest run
    #: ``ckptforge.cli.main`` in this process, which an uncaught exception would fail just the same.
    subprocess: bool = False


OUT = "out-never-written"
IMPORTANCE = ["--strategy", "importance", "--calibration"]

CASES = [
    # 1. data loss: an output that is, contains or lies inside an input; --force over user files
    Case("out-is-source-force", lambda w: ["upcycle", w["vit"], "--out", w["vit"], "--force"], 2, "this run reads", subprocess=True),
    Case("out-is-source-dot", lambda w: ["upcycle", w["vit"], "--out", f"{w['vit']}/.", "--force"], 2, "this run reads"),
    Case("out-contains-source", lambda w: ["upcycle", w["vit"], "--out", w["root"], "--force"], 2, "contains"),
    Case("out-is-source-file", lambda w: ["upcycle", w["vit"], "--out", w["vit"] / "model.safetensors", "--force"], 2,
         "this run reads"),
    Case("out-symlink-to-source", lambda w: ["upcycle", w["vit"], "--out", w["link"], "--force"], 2, "this run reads"),
    Case("out-inside-calibration", lambda w: ["upcycle", w["vit"], "--out", w["imgs"] / "moe", *IMPORTANCE, w["imgs"]],
         2, "lies inside"),
    # the multi-source paths (issue 14) follow the same rule: mergekit-style experts and a carved shared expert
    Case("multisource-out-is-expert-source-force", lambda w: [
        "upcycle", w["llama"], "--expert-source", w["llama_marked"], "--expert-source", w["llama"],
        "--out", w["llama_marked"], "--force"], 2, "this run reads", subprocess=True),
    Case("multisource-out-inside-base", lambda w: [
        "upcycle", w["llama"], "--expert-source", w["llama"], "--expert-source", w["llama"], "--out", w["llama"] / "moe"],
         2, "lies inside"),
    Case("carved-out-is-source-force", lambda w: [
        "upcycle", w["llama_marked"], "--shared-expert", "carved", "--calibration", w["calib_txt"], "--experts", "4",
        "--top-k", "2", "--out", w["llama_marked"], "--force"], 2, "this run reads"),
    Case("force-over-user-files", lambda w: ["upcycle", w["vit"], "--out", w["user_files"], "--force"], 2,
         "not a ckptforge output"),
    Case("stats-cache-is-source", lambda w: ["upcycle", w["vit"], "--out", w["root"] / OUT, *IMPORTANCE, w["imgs"],
                                             "--stats-cache", w["vit"] / "model.safetensors"], 2, "this run reads", subprocess=True),
    Case("finetune-save-over-model", lambda w: ["finetune", w["moe"], "--data", w["classes"], "--steps", "1",
                                                "--save", w["moe"], "--force"], 2, "this run reads"),
    Case("routes-out-into-model", lambda w: ["routes", w["moe"], "--input", w["imgs"] / "0.png",
                                             "--out", w["moe"] / "map.png"], 2, "lies inside"),
    Case("eval-out-over-data-image", lambda w: ["eval", w["moe"], "--data", w["classes"],
                                                "--out", w["classes"] / "a" / "0.png"], 2, "lies inside"),
    Case("eval-out-over-weights", lambda w: ["eval", w["moe"], "--data", w["classes"],
                                             "--out", w["moe"] / "model.safetensors"], 2, "not a figure file", subprocess=True),
    Case("routes-out-not-a-figure", lambda w: ["routes", w["moe"], "--input", w["imgs"] / "0.png",
                                               "--out", w["root"] / "map.txt"], 2, "not a figure file"),
    # 2. tracebacks → one-line typed errors
    Case("header-not-object", lambda w: ["upcycle", w["hdr_list"], "--out", w["root"] / OUT], 3, "bad header", subprocess=True),
    Case("dir-named-weights", lambda w: ["upcycle", w["dir_named_weights"], "--out", w["root"] / OUT], 3, "holds no checkpoint"),
    Case("index-is-list", lambda w: ["upcycle", w["index_list"], "--out", w["root"] / OUT], 3, "not a valid shard index"),
    Case("index-holds-int", lambda w: ["upcycle", w["index_int"], "--out", w["root"] / OUT], 3, "not a valid shard index"),
    Case("config-is-list", lambda w: ["upcycle", w["config_list"], "--out", w["root"] / OUT], 3, "not an object"),
    Case("config-no-layers", lambda w: ["upcycle", w["config_no_layers"], "--out", w["root"] / OUT], 2,
         "config.json has no num_hidden_layers"),
    Case("config-size-in-words", lambda w: ["upcycle", w["config_words"], "--out", w["root"] / OUT], 2,
         "hidden_size 'thirty-two' is not an integer"),
    Case("config-d-ff-disagrees", lambda w: ["upcycle", w["config_d_ff"], "--out", w["root"] / OUT], 2,
         "the weights disagree with config.json"),
    Case("config-1e9-layers", lambda w: ["upcycle", w["config_1e9_layers"], "--dry-run"], 2, "num_hidden_layers 1000000000.0"),
    Case("experts-1e9-dry-run", lambda w: ["upcycle", w["vit"], "--experts", "1000000000", "--dry-run"], 2,
         "more than 65536 experts"),
    Case("out-empty", lambda w: ["upcycle", w["vit"], "--out", ""], 2, "is the current directory"),
    Case("out-parent-is-file", lambda w: ["upcycle", w["vit"], "--out", w["a_file"] / "moe"], 2, "is a file"),
    Case("calibration-bomb", lambda w: ["upcycle", w["vit"], "--out", w["root"] / OUT, *IMPORTANCE, w["bomb_imgs"]], 2,
         "decompression bomb", subprocess=True),
    Case("calibration-not-utf8", lambda w: ["upcycle", w["bert"], "--out", w["root"] / OUT, *IMPORTANCE, w["latin1"]], 2,
         "is not UTF-8"),
    Case("stats-cache-missing-dir", lambda w: ["upcycle", w["vit"], "--out", w["root"] / OUT, *IMPORTANCE, w["imgs"],
                                               "--stats-cache", w["root"] / "no-such-dir" / "s.pt"], 2, "does not exist"),
    Case("stats-cache-foreign-pickle", lambda w: ["upcycle", w["vit"], "--out", w["root"] / OUT, *IMPORTANCE, w["imgs"],
                                                  "--stats-cache", w["foreign"]], 2, "not a ckptforge statistics file"),
    Case("finetune-corrupt-image", lambda w: ["finetune", w["moe"], "--data", w["bad_classes"], "--steps", "1"], 2,
         "cannot be decoded"),
    Case("routes-corrupt-png", lambda w: ["routes", w["moe"], "--input", w["corrupt_imgs"] / "x.png"], 2, "cannot be decoded"),
    Case("verify-truncated-shard", lambda w: ["verify", w["moe_truncated"]], 3, "truncated", subprocess=True),
    Case("verify-config-not-json", lambda w: ["verify", w["moe_config_not_json"]], 3, "not valid JSON"),
    Case("push-files-null", lambda w: ["push", w["moe_files_null"], "me/moe"], 2, "not a valid ckptforge.json"),
    # 3. silently wrong → refused
    Case("verify-edited-weights", lambda w: ["verify", w["moe_edited"]], 1, "changed since conversion", subprocess=True),
    Case("config-claims-more-layers", lambda w: ["upcycle", w["config_8_layers"], "--layers", "1", "--out", w["root"] / OUT],
         2, "says num_hidden_layers 8"),
    Case("index-points-outside", lambda w: ["upcycle", w["index_outside"], "--out", w["root"] / OUT], 3, "outside its directory", subprocess=True),
    Case("index-absolute-path", lambda w: ["upcycle", w["index_absolute"], "--out", w["root"] / OUT], 3, "outside its directory"),
    Case("finetune-lr-inf", lambda w: ["finetune", w["moe"], "--data", w["classes"], "--lr", "inf"], 2, "finite"),
    Case("finetune-loss-nan", lambda w: ["finetune", w["moe"], "--data", w["classes"], "--steps", "4", "--lr", "1e30"], 1,
         "loss became"),
    Case("push-repo-id-spaces", lambda w: ["push", w["moe"], "my org/my model"], 2, "is not a Hub repo id", subprocess=True),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id + ("-subprocess" if c.subprocess else "") for c in CASES])
def test_hostile_input_is_refused_cleanly(world, case, capfd):
    before = snapshot(world["root"])
    args = list(map(str, case.args(world)))
    if case.subprocess:
        proc = run_cli(*args)
        code, stderr = proc.returncode, proc.stderr
    else:
        from ckptforge.cli import main

        code = main(args)
        stderr = capfd.readouterr().err
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr, stderr
    assert code == case.code, stderr
    assert 1 <= len(lines) <= 2 and lines[-1].startswith("error: ") and case.says in lines[-1], stderr
    assert snapshot(world["root"]) == before  # nothing written anywhere, no input byte changed


def test_force_replaces_only_previous_outputs_and_leaves_no_siblings(world, tmp_path):
    from ckptforge.errors import OutputExistsError, UsageError
    from ckptforge.io.paths import check_output

    check_output("--out", world["moe"], force=True)  # a previous output: replaceable
    with pytest.raises(OutputExistsError):
        check_output("--out", world["moe"], force=False)
    with pytest.raises(UsageError, match="is a file"):
        check_output("--out", world["a_file"], force=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    check_output("--out", empty, force=True)
    with pytest.raises(UsageError, match="--out is empty"):
        check_output("--out", "", force=True)
    assert not list(world["root"].glob(".*ckptforge-*"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_out_under_read_only_directory(world, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    proc = run_cli("upcycle", str(world["vit"]), "--out", str(ro / "moe"))
    assert proc.returncode == 2 and "not writable" in proc.stderr and "Traceback" not in proc.stderr
    assert not any(ro.iterdir())


def _bytes_read() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io to count bytes read")
def test_large_calibration_text_is_streamed(tmp_path):
    from ckptforge.calibration_data import read_text_samples

    big = tmp_path / "big.txt"
    line = ("the quick brown fox jumps over the lazy dog " * 4).strip() + "\n"
    with open(big, "w") as f:
        for _ in range(64):
            f.write(line * 4096)  # 64 × 4096 lines ≈ 46 MB
    size = big.stat().st_size
    before = _bytes_read()
    samples = read_text_samples(big, 256)
    read = _bytes_read() - before
    assert len(samples) == 256 and samples[0] == line.strip()
    assert read < size / 20, f"read {read} of {size} bytes for 256 samples"


def _interrupt_after(delay: float, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([sys.executable, "-m", "ckptforge", *args], env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("delay", [0.5, 2.0])
def test_ctrl_c_during_start_up_is_one_line(delay):
    """While the package, torch and transformers import (the first ~0.1 s belong to the interpreter
    itself): ``eval`` of the ViT example imports all three and loads the model, several seconds on
    this machine, longer than either delay, so the signal always lands while the command is still
    starting. (A ``--dry-run`` no longer imports torch: it finishes before the signal.)"""
    proc = _interrupt_after(delay, "eval", str(REPO / "examples" / "tiny-vit-mnist"),
                            "--data", str(REPO / "examples" / "mnist-samples"))
    # 130, or (rarely, when the signal lands while the interpreter itself unwinds) death by SIGINT, which a
    # shell reports as the same 130 (128 + SIGINT); either way exactly one line and no traceback
    assert proc.returncode in (130, -signal.SIGINT), proc.returncode
    assert proc.stderr.strip().splitlines() == ["error: interrupted"], proc.stderr


def test_ctrl_c_while_training_is_one_line_and_writes_nothing(world, tmp_path):
    before = snapshot(world["root"])
    proc = _interrupt_after(25.0, "finetune", str(world["moe"]), "--data", str(world["classes"]), "--steps", "1000000",
                            "--report", str(tmp_path / "report"))
    assert proc.returncode == 130 and proc.stderr.strip().splitlines()[-1] == "error: interrupted", proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) <= 2
    assert snapshot(world["root"]) == before and not (tmp_path / "report").exists()
