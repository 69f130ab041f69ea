"""Recipes: every shipped recipe validates and plans (--dry-run) on a tiny model of its family;
broken recipes report every problem at once; explicit flags override recipe values; the resolved
recipe lands in ckptforge.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ckptforge.cli import main
from ckptforge.config import parse_layers
from ckptforge.config import UpcycleOptions
from ckptforge.recipes import RecipeError, load_recipe, recipe_paths, validate_recipe
from ckptforge.strategies import STRATEGIES
from calib_helpers import add_tokenizer, image_folder, text_file
from ckptforge.families import FAMILIES
from conftest import FAMILY_MODELS, read_json

SHIPPED = recipe_paths()
RECIPE_OPTIONS = set(UpcycleOptions().to_dict()) - {"shard_size", "dtype", "recipe", "calibration", "stats_cache"}


@pytest.fixture
def cli(capsys):
    def run(*args: str):
        code = main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def write_recipe(tmp_path: Path, **options) -> Path:
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({
        "name": "mine", "method": "test", "paper": "none", "summary": "a test recipe", "family": "vit",
        "options": {"num_experts": 4, "top_k": 1, "layers": "all", "strategy": "copy-all", **options},
    }))
    return path


def test_the_issue_recipes_are_shipped():
    names = {p.stem for p in SHIPPED}
    assert {"sparse-upcycling-vit", "sparse-upcycling-vit-expert-choice", "moe-jetpack-vit", "moe-jetpack-vit-sphero",
            "mixtral-llama", "drop-upcycling-llama", "moefication-bert"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_recipe_validates_and_dry_runs_on_its_family(path, tiny, cli):
    recipe = load_recipe(path)
    assert recipe.name == path.stem and "arXiv:" in recipe.paper
    assert path.read_text().lstrip().startswith("#"), "a recipe starts with comments giving its source"
    if missing := recipe.missing_components():
        pytest.skip(f"{recipe.name} needs {', '.join(missing)}, not registered in this installation yet")
    dense = tiny(FAMILY_MODELS[recipe.family])
    calibration = []
    if STRATEGIES[recipe.options["strategy"]].needs_stats:  # the recipe names its data at run time
        data = image_folder(dense.parent / "calib") if recipe.family == "vit" else text_file(dense.parent / "calib.txt")
        if recipe.family != "vit":
            add_tokenizer(dense)
        calibration = ["--calibration", str(data), "--calib-samples", "8"]
    code, out, err = cli("upcycle", str(dense), "--recipe", recipe.name, *calibration, "--dry-run", "--json")
    assert code == 0, err
    payload = json.loads(out)
    plan = payload["plan"]
    for key in ("num_experts", "top_k", "strategy", "strategy_params", "router"):
        if key in recipe.options:
            assert plan[key] == recipe.options[key], key
    assert payload["recipe"]["name"] == recipe.name
    assert set(payload["recipe"]["overrides"]) == {flag[2:].replace("-", "_") for flag in calibration[::2]}


def test_a_broken_recipe_reports_every_problem_with_its_field_path(tmp_path, cli):
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump({
        "name": "broken", "paper": 3, "family": "gpt2", "colour": "red",
        "options": {"num_experts": "eight", "top_k": 2, "strategy": "copy-all", "warp_speed": 9, "router": {"normalize": True}},
    }))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert info.value.problems == [
        "method: missing (a string)",
        "paper: must be a string, not int",
        "summary: missing (a string)",
        "colour: unknown field; allowed: family, method, multisource, name, options, paper, summary",
        "family: 'gpt2' is not a registered family; use one of " + ", ".join(FAMILIES),
        "options.num_experts: must be an integer, not str",
        "options.warp_speed: unknown option; allowed: " + ", ".join(sorted(RECIPE_OPTIONS)),
        "options.router.type: missing (a string such as topk)",
    ]
    assert {"num_experts", "top_k", "layers", "strategy", "strategy_params", "router"} <= RECIPE_OPTIONS
    assert not {"shard_size", "dtype", "recipe", "calibration"} & RECIPE_OPTIONS
    code, _, err = cli("upcycle", "anything", "--recipe", str(path), "--dry-run")
    assert code == 2 and err.startswith(f"error: recipe {path} is invalid: method: missing (a string); paper:")
    assert err.count(";") >= 8  # every problem in the one line


def test_option_values_are_checked_too(tmp_path):
    problems = validate_recipe(yaml.safe_load(write_recipe(tmp_path, top_k=9).read_text()))
    assert problems == ["options: --top-k 9 is larger than --experts 4; use --top-k ≤ 4"]
    path = tmp_path / "bad.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match=r"not valid YAML at line 2"):
        load_recipe(path)
    assert validate_recipe(["a list"]) == ["(top level): must be a mapping of fields, not list"]


def test_explicit_flags_override_the_recipe_even_at_their_default(tmp_path, tiny, cli):
    dense = tiny("vit")
    recipe = write_recipe(tmp_path, strategy_params={"drop_ratio": 0.25})
    code, out, err = cli("upcycle", str(dense), "--recipe", str(recipe), "--top-k", "2", "--drop-ratio", "0.5",
                         "--dry-run", "--json")
    assert code == 0, err
    payload = json.loads(out)
    assert payload["plan"]["top_k"] == 2  # --top-k 2 is the CLI default, but it was given explicitly
    assert payload["plan"]["num_experts"] == 4 and payload["plan"]["moe_layers"] == [0, 1, 2, 3]
    assert payload["plan"]["strategy_params"] == {"drop_ratio": 0.5}
    assert payload["recipe"]["overrides"] == {"top_k": 2, "strategy_params": {"drop_ratio": 0.5}}


def test_the_resolved_recipe_is_stored_in_ckptforge_json(tmp_path, tiny, cli):
    out = tmp_path / "moe"
    code, _, err = cli("upcycle", str(tiny("vit")), "--recipe", str(write_recipe(tmp_path)), "--experts", "2",
                       "--out", str(out), "--quiet")
    assert code == 0, err
    meta = read_json(out / "ckptforge.json")
    assert meta["options"]["num_experts"] == 2 and meta["options"]["top_k"] == 1
    stored = meta["options"]["recipe"]
    assert stored["name"] == "mine" and stored["values"]["num_experts"] == 4 and stored["overrides"] == {"num_experts": 2}
    assert len(stored["sha256"]) == 64


def test_recipe_for_another_family_or_unknown_name_is_refused(tiny, cli):
    dense = str(tiny("vit"))
    code, _, err = cli("upcycle", dense, "--recipe", "mixtral-llama", "--dry-run")
    assert code == 2
    assert err.strip() == ("error: recipe 'mixtral-llama' is for llama checkpoints, but the source is a vit checkpoint; "
                           "pick a vit recipe from 'ckptforge recipes list'")
    code, _, err = cli("upcycle", dense, "--recipe", "no-such-recipe", "--dry-run")
    assert code == 2
    assert err.strip().startswith("error: recipe 'no-such-recipe' not found: not a file and not a shipped recipe; use one of ")


def test_recipes_list_and_show(cli):
    code, out, _ = cli("recipes", "list", "--json")
    assert code == 0
    listed = {r["name"]: r for r in json.loads(out)["recipes"]}
    assert set(listed) == {p.stem for p in SHIPPED}
    assert all(r["method"] and r["paper"] and r["summary"] for r in listed.values())
    code, out, _ = cli("recipes", "show", "mixtral-llama")
    assert code == 0 and out == (Path(listed["mixtral-llama"]["path"])).read_text()
    code, out, _ = cli("recipes", "show", "mixtral-llama", "--json")
    assert json.loads(out)["options"]["layers"] == "all"
    assert cli("recipes", "show", "nope")[0] == 2


def test_last_percent_layers():
    assert parse_layers("last-50%", 12) == [6, 7, 8, 9, 10, 11]
    assert parse_layers("last-50%", 1) == [0]
    with pytest.raises(ValueError, match="last-0% is out of range"):
        parse_layers("last-0%", 4)
