"""Start-up: --help / --version import neither torch nor transformers; ``import ckptforge`` stays cheap
and still registers vit_moe / bert_moe with the Auto classes the moment transformers is imported."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import ckptforge
from ckptforge.import_hooks import when_imported
from conftest import REPO, cli_env


def _python(code: str, *args: str, tmp_path: Path | None = None) -> dict:
    """Run ``code`` in a fresh interpreter on this checkout; it prints one JSON object last."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=cli_env(), cwd=tmp_path or REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_help_and_version_of_every_command_import_neither_torch_nor_transformers():
    result = _python("""
        import contextlib, io, json, sys
        import typer
        from ckptforge.cli import app, main

        def paths(group, prefix):
            for name, cmd in group.commands.items():
                yield [*prefix, name]
                if hasattr(cmd, "commands"):
                    yield from paths(cmd, [*prefix, name])

        runs = [["--help"], ["--version"]] + [[*p, "--help"] for p in paths(typer.main.get_command(app), [])]
        codes = {}
        for argv in runs:
            with contextlib.redirect_stdout(io.StringIO()) as out:
                codes[" ".join(argv)] = (main(argv), len(out.getvalue()))
        # issue 15: neither pydantic (typer coerces an absent --help through it) nor typer's rich help panels
        heavy = ("torch", "transformers", "pydantic", "typer.rich_utils", "rich")
        print(json.dumps({"codes": codes, "heavy": [m for m in heavy if m in sys.modules]}))
    """)
    assert result["heavy"] == [], f"--help imported {result['heavy']}"
    assert "upcycle --help" in result["codes"] and "recipes list --help" in result["codes"]
    for argv, (code, printed) in result["codes"].items():
        assert code == 0 and printed > 0, argv


def test_import_ckptforge_is_light_and_auto_classes_load_its_outputs(tiny, tmp_path):
    vit_out, bert_out = tmp_path / "vit-moe", tmp_path / "bert-moe"
    ckptforge.upcycle(tiny("vit"), vit_out, ckptforge.UpcycleOptions(num_experts=4))
    ckptforge.upcycle(tiny("bert"), bert_out, ckptforge.UpcycleOptions(num_experts=4))
    result = _python("""
        import json, sys
        import ckptforge
        heavy = [m for m in ("torch", "transformers") if m in sys.modules]
        from transformers import AutoConfig, AutoModel, AutoModelForImageClassification
        vit = AutoModelForImageClassification.from_pretrained(sys.argv[1])
        bert = AutoModel.from_pretrained(sys.argv[2])
        print(json.dumps({"heavy": heavy, "vit": type(vit).__name__, "bert": type(bert).__name__,
                          "config": type(AutoConfig.from_pretrained(sys.argv[2])).__name__,
                          "upcycle": ckptforge.upcycle.__module__, "load_source": ckptforge.load_source.__name__}))
    """, str(vit_out), str(bert_out), tmp_path=tmp_path)
    assert result["heavy"] == []
    assert (result["vit"], result["bert"], result["config"]) == ("ViTMoEForImageClassification", "BertMoEModel",
                                                                 "BertMoEConfig")
    assert (result["upcycle"], result["load_source"]) == ("ckptforge.execute", "open_checkpoint")


def test_public_names_resolve_and_unknown_names_raise():
    assert set(ckptforge.__all__) <= set(dir(ckptforge))
    for name in ckptforge.__all__:
        assert getattr(ckptforge, name) is not None
    try:
        ckptforge.no_such_thing  # noqa: B018
    except AttributeError as exc:
        assert "no_such_thing" in str(exc)
    else:
        raise AssertionError("unknown attribute did not raise")


def test_when_imported_runs_after_the_first_import_or_at_once(tmp_path, monkeypatch):
    (tmp_path / "ckptforge_hook_probe.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen: list[int] = []
    when_imported("ckptforge_hook_probe", lambda module: seen.append(module.VALUE))
    assert seen == []
    import ckptforge_hook_probe  # noqa: F401

    assert seen == [42]
    assert type(ckptforge_hook_probe.__loader__).__name__ == "SourceFileLoader"  # the real loader is put back
    when_imported("ckptforge_hook_probe", lambda module: seen.append(-module.VALUE))
    assert seen == [42, -42]
    del sys.modules["ckptforge_hook_probe"]


@pytest.mark.parametrize("first", ["ckptforge.moe", "ckptforge.inspection", "ckptforge.loading", "ckptforge.modeling"])
def test_auto_registration_works_whichever_module_imports_transformers_first(first):
    result = _python(f"""
        import json
        import {first}
        from transformers import CONFIG_MAPPING
        print(json.dumps({{"registered": sorted(t for t in ("vit_moe", "bert_moe") if t in CONFIG_MAPPING)}}))
    """)
    assert result["registered"] == ["bert_moe", "vit_moe"]


def test_a_mixtral_conversion_never_imports_transformers(tiny, tmp_path):
    """Stock output formats need no model code: the CLI's start-up is torch alone (issue 15)."""
    dense = tiny("llama")
    result = _python("""
        import json, sys
        from ckptforge.cli import main
        code = main(["upcycle", sys.argv[1], "--experts", "4", "--layers", "all", "--out", sys.argv[2], "-q"])
        print(json.dumps({"code": code, "loaded": [m for m in ("transformers", "ckptforge.modeling", "huggingface_hub.hf_api")
                                                  if m in sys.modules]}))
    """, str(dense), str(tmp_path / "moe"))
    assert result["code"] == 0 and (tmp_path / "moe" / "model.safetensors").is_file()
    assert result["loaded"] == ["huggingface_hub.hf_api"]  # the model card; transformers never loads


@pytest.mark.parametrize("argv", [[], ["recipes"]])
def test_a_group_without_a_command_prints_its_help_and_exits_2(argv):
    """Plain help (issue 15): the group's help on stderr, exit 2, not an ``error:`` line wrapping it."""
    from conftest import run_cli

    done = run_cli(*argv)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith(f"Usage: ckptforge {' '.join(argv)}".rstrip() + " [OPTIONS] COMMAND")
    assert "error:" not in done.stderr and "Commands:" in done.stderr
