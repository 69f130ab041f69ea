"""A recipe can carry a multi-source MoE (issue 14): its ``multisource`` field holds mergekit-moe's
schema, SOURCE / --expert-source fill in the models it leaves out, and typed flags beat the recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ckptforge.cli import main
from ckptforge.recipes import load_recipe

from multisource_helpers import family_setup, write_config

PROMPTS = [["the cat sat on a mat"], ["dogs ran far and fast"], ["big red sun"]]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, list[Path]]:
    return family_setup(tmp_path_factory.mktemp("ms"))


@pytest.fixture
def cli(capsys):
    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def write_recipe(path: Path, multisource: dict, family: str = "llama", **options) -> Path:
    path.write_text(yaml.safe_dump({
        "name": "prompt-experts", "method": "multi-source MoE", "paper": "mergekit-moe", "family": family,
        "summary": "three experts routed by their prompts", "options": options, "multisource": multisource}))
    return path


def _roles(gate_mode: str = "hidden") -> dict:
    """Expert roles without models: the command line names the base and the fine-tunes."""
    return {"gate_mode": gate_mode, "experts_per_token": 2, "architecture": "mixtral",
            "experts": [{"positive_prompts": p} for p in PROMPTS]}


def test_a_recipe_with_named_models_writes_what_the_same_mergekit_config_writes(models, tmp_path, cli):
    base, sources = models
    config = write_config(tmp_path / "moe.yml", base, sources, gate_mode="hidden", prompts=PROMPTS)
    recipe = write_recipe(tmp_path / "r.yaml", yaml.safe_load(config.read_text()), seed=0)
    assert cli("upcycle", "--config", str(config), "--out", str(tmp_path / "a"), "--quiet")[0] == 0
    code, _, err = cli("upcycle", "--recipe", str(recipe), "--out", str(tmp_path / "b"), "--quiet")
    assert code == 0, err
    weights = sorted(p.name for p in (tmp_path / "a").glob("*.safetensors"))
    assert weights and weights == sorted(p.name for p in (tmp_path / "b").glob("*.safetensors"))
    for name in weights:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    stored = json.loads((tmp_path / "b" / "ckptforge.json").read_text())
    assert stored["options"]["recipe"]["name"] == "prompt-experts"
    assert stored["options"]["recipe"]["sha256"] == load_recipe(recipe).sha256
    assert stored["multisource"]["gate_mode"] == "hidden"


def test_command_line_models_fill_the_recipe_and_typed_flags_beat_it(models, tmp_path, cli):
    base, sources = models
    recipe = write_recipe(tmp_path / "r.yaml", _roles(), layers="all", seed=3)
    args = ["upcycle", str(base), "--recipe", str(recipe), *[a for s in sources for a in ("--expert-source", str(s))],
            "--dry-run", "--json"]
    code, out, err = cli(*args)
    assert code == 0, err
    plan = json.loads(out)["plan"]
    assert plan["multisource"]["base_model"] == str(base)
    assert [e["source_model"] for e in plan["multisource"]["experts"]] == [str(s) for s in sources]
    assert [e["positive_prompts"] for e in plan["multisource"]["experts"]] == PROMPTS
    assert plan["multisource"]["gate_mode"] == "hidden" and plan["seed"] == 3 and plan["top_k"] == 2
    code, out, err = cli(*args, "--gate-mode", "random", "--top-k", "1", "--seed", "5", "--architecture", "qwen2_moe",
                         "--layers", "0,2")
    assert code == 0, err
    payload = json.loads(out)["plan"]
    assert payload["multisource"]["gate_mode"] == "random" and payload["top_k"] == 1 and payload["seed"] == 5
    assert payload["output_format"] == "qwen2_moe" and payload["moe_layers"] == [0, 2]
    assert payload["recipe"]["overrides"] == {
        "source": str(base), "expert_source": [str(s) for s in sources], "top_k": 1, "gate_mode": "random",
        "architecture": "qwen2_moe", "layers": "0,2", "seed": 5}


def test_the_recipe_is_recorded_and_checked_against_the_base_family(models, tmp_path, cli):
    base, sources = models
    recipe = write_recipe(tmp_path / "r.yaml", _roles("random"), family="qwen3")
    out = tmp_path / "moe"
    code, _, err = cli("upcycle", str(base), "--recipe", str(recipe),
                       *[a for s in sources for a in ("--expert-source", str(s))], "--out", str(out))
    assert code == 2 and not out.exists()
    assert err.startswith("error: recipe 'prompt-experts' is for qwen3 checkpoints, but the base is a llama checkpoint")


def test_a_broken_multisource_recipe_reports_every_problem_and_writes_nothing(models, tmp_path, cli):
    base, sources = models
    bad = {"gate_mode": "telepathy", "experts_per_token": 5, "experts": [{"source_model": "a", "colour": "red"}, {}],
           "base_model": str(base)}
    recipe = write_recipe(tmp_path / "r.yaml", bad, strategy="random", top_k=2)
    out = tmp_path / "moe"
    code, _, err = cli("upcycle", "--recipe", str(recipe), "--out", str(out))
    assert code == 2 and not out.exists()
    message = err.strip()
    assert message.startswith(f"error: recipe {recipe} is invalid: options.strategy: does not apply to a "
                              "multi-source recipe; allowed: layers, seed")
    assert "options.top_k: does not apply" in message
    assert "multisource: multisource has keys ckptforge does not support: experts[0].colour" in message
    assert len(message.splitlines()) == 1
    recipe = write_recipe(tmp_path / "r2.yaml", {**bad, "experts": [{}, {}]}, layers=3)
    code, _, err = cli("upcycle", "--recipe", str(recipe), "--out", str(out))
    assert code == 2 and not out.exists()
    assert "options.layers: must be a string, not int" in err
    assert "multisource: gate_mode 'telepathy' is not one of hidden" in err
    assert "multisource: experts_per_token 5 is larger than the 2 experts" in err


def test_command_line_models_that_do_not_fit_the_recipe_are_refused(models, tmp_path, cli):
    base, sources = models
    recipe = write_recipe(tmp_path / "r.yaml", _roles())
    out = tmp_path / "moe"
    code, _, err = cli("upcycle", str(base), "--recipe", str(recipe), "--expert-source", str(sources[0]),
                       "--out", str(out))
    assert code == 2 and not out.exists()
    assert err.strip() == ("error: recipe 'prompt-experts' lists 3 experts but 1 --expert-source were given; pass one "
                           "--expert-source per expert, in the recipe's order")
    code, _, err = cli("upcycle", str(base), "--recipe", str(recipe), "--out", str(out))
    assert code == 2 and not out.exists()
    assert err.strip() == ("error: recipe 'prompt-experts' leaves the experts' source models to the command line; "
                           "pass --expert-source once per expert (3)")
    code, _, err = cli("upcycle", str(base), "--recipe", "mixtral-llama", "--expert-source", str(sources[0]),
                       "--expert-source", str(sources[1]), "--out", str(out))
    assert code == 2 and not out.exists()
    assert "recipe 'mixtral-llama' describes a single-source conversion" in err
