"""The CI contract: docs/cli.md is generated from the app (stale → fail), every command documents
its --json schema, and the real JSON output of every command matches its documented schema."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub
import jsonschema
import pytest
import typer

import ckptforge
from ckptforge.cli import app, main
from ckptforge.cli.docs import _commands, render_cli_docs
from ckptforge.cli.schemas import ERROR, SCHEMAS
from calib_helpers import image_folder
from conftest import REPO
from test_finetune import make_image_folder
from hub_loopback import LoopbackHub

CLI_MD = REPO / "docs" / "cli.md"


def run_json(capsys, *args: str) -> tuple[int, dict]:
    code = main([*args, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out)  # exactly one JSON object: json.loads rejects anything around it


def test_docs_cli_md_is_up_to_date():
    assert CLI_MD.read_text() == render_cli_docs(typer.main.get_command(app)), (
        "docs/cli.md is stale; regenerate it with 'python -m ckptforge docs --out docs/cli.md'"
    )


def test_docs_check_flags_a_stale_file(tmp_path, capsys):
    stale = tmp_path / "cli.md"
    stale.write_text("old\n")
    assert main(["docs", "--check", str(stale)]) == 1
    assert main(["docs", "--out", str(stale)]) == 0 and main(["docs", "--check", str(stale)]) == 0


def test_every_command_documents_a_json_schema():
    commands = {" ".join(path) for path, _ in _commands(typer.main.get_command(app))}
    assert commands == set(SCHEMAS), f"commands without a schema: {sorted(commands - set(SCHEMAS))}"
    text = CLI_MD.read_text()
    assert all(f"## `ckptforge {name}`" in text for name in commands)
    for code in range(6):
        assert f"| {code} |" in text


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"ckptforge {ckptforge.__version__}"


def _push_args(converted, tmp_path, monkeypatch):
    server = LoopbackHub().start()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", server.url)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    return ["push", str(converted), "me/moe"], server


CASES = {
    "upcycle": lambda d, c, t, m: ([["upcycle", str(d), "--dry-run"],
                                    ["upcycle", str(d), "--out", str(t / "o"), "--verify", "--recipe",
                                     "sparse-upcycling-vit", "--experts", "4"]], None),
    "verify": lambda d, c, t, m: ([["verify", str(c)]], None),
    "inspect": lambda d, c, t, m: ([["inspect", str(c)], ["inspect", "--aliases"]], None),
    "push": lambda d, c, t, m: (lambda args, server: ([args], server))(*_push_args(c, t, m)),
    "recipes list": lambda d, c, t, m: ([["recipes", "list"]], None),
    "compare-strategies": lambda d, c, t, m: ([["compare-strategies", str(d), "--calibration", str(
        image_folder(t / "calib", count=8)), "--experts", "4", "--strategies", "copy-all,random", "--calib-samples", "8"]], None),
    "finetune": lambda d, c, t, m: ([["finetune", str(shutil.copytree(c, t / "tuned")), "--data", str(
        make_image_folder(t / "imgs", per_class=4)), "--steps", "1", "--batch-size", "4", "--device", "cpu"]], None),
    "recipes show": lambda d, c, t, m: ([["recipes", "show", "mixtral-llama"]], None),
    "eval": lambda d, c, t, m: ([["eval", str(c), "--data", str(make_image_folder(t / "ten", classes=10, per_class=1)),
                                 "--capacity-factor", "0.5", "--out", str(t / "sweep.png")]], None),  # issue 13
    "routes": lambda d, c, t, m: ([["routes", str(c), "--input", str(_digit_png(t / "digit.png")),
                                    "--out", str(t / "routes.png")]], None),
}


def _digit_png(path: Path) -> Path:
    from PIL import Image

    Image.new("L", (28, 28), color=128).save(path)
    return path


def test_every_schema_has_a_json_case():
    assert set(CASES) == set(SCHEMAS)


@pytest.mark.parametrize("command", sorted(CASES))
def test_json_output_matches_the_documented_schema(command, dense, converted, tmp_path, monkeypatch, capsys):
    runs, server = CASES[command](dense, converted, tmp_path, monkeypatch)
    try:
        for args in runs:
            code, payload = run_json(capsys, *args)
            assert code == 0, payload
            jsonschema.validate(payload, SCHEMAS[command])
    finally:
        if server is not None:
            server.stop()


def test_error_json_matches_the_documented_schema(capsys, tmp_path):
    code, payload = run_json(capsys, "inspect", str(tmp_path / "missing"))
    assert code == 3 and payload["exit_code"] == 3
    jsonschema.validate(payload, ERROR)
    code, payload = run_json(capsys, "recipes", "show", "no-such-recipe")
    assert code == 2 and payload["error"].startswith("recipe 'no-such-recipe' not found")
    jsonschema.validate(payload, ERROR)
