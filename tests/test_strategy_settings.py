"""Issue 12, "a new option is one field": every strategy and router setting is a field of its settings
dataclass, and its flag (upcycle, compare-strategies), help, recipe field, recipe override, refusal
with another strategy/router, value check and JSON schema entry all follow from that field. The cases
below are derived from the dataclasses, so a field added later is covered without a new test."""

from __future__ import annotations

from dataclasses import fields

import pytest
import typer

from ckptforge.cli import app, main
from ckptforge.cli.recipes import FLAG_FIELDS
from ckptforge.cli.schemas import SCHEMAS
from ckptforge.cli.settings_flags import ROUTER_FLAGS, STRATEGY_FLAGS
from ckptforge.config import UpcycleOptions
from ckptforge.recipes import validate_recipe
from ckptforge.strategy_settings import STRATEGY_SETTINGS, flag_of, setting_names
from conftest import build_tiny

#: (settings family, setting name, [owners]) for every setting of every strategy and router.
SETTINGS = [(group, name, [kind for kind, _ in owners])
            for group in (STRATEGY_FLAGS, ROUTER_FLAGS) for name, owners in group.fields().items()]
IDS = [f"{g.target}.{name}" for g, name, _ in SETTINGS]


def _options(command: str) -> dict[str, object]:
    cmd = typer.main.get_command(app).commands[command]
    return {opt: p for p in cmd.params if p.param_type_name == "option" for opt in p.opts}


def _sample(group, name: str):
    """A valid value of a setting: its default, else 1 / 0.5 by type."""
    default = next(f.default for _, f in group.fields()[name])
    return default if default is not None else {int: 1, float: 0.5}[group.type_of(name)]


@pytest.mark.parametrize(("group", "name", "owners"), SETTINGS, ids=IDS)
def test_every_setting_has_its_flag_help_recipe_override_and_schema_entry(group, name, owners):
    flag = group.flag_of(name)
    commands = ["upcycle", "compare-strategies"] if group is STRATEGY_FLAGS else ["upcycle"]
    for command in commands:
        option = _options(command).get(flag)
        assert option is not None, f"{command} has no {flag}"
        assert option.help == group.help(name) and option.default is None
    assert FLAG_FIELDS[flag[2:].replace("-", "_")] == (group.target, name)
    schema = SCHEMAS["upcycle"]["$defs"]["plan"]["properties"][group.target]
    assert schema["properties"][name]["description"] == group.help(name)
    assert schema["additionalProperties"] is False
    for owner in owners:  # every owner's help names it and its default
        assert owner in group.help(name)


def _recipe(**options) -> dict:
    return {"name": "x", "method": "m", "paper": "p", "summary": "s", "family": "vit", "options": options}


@pytest.mark.parametrize(("group", "name", "owners"), SETTINGS, ids=IDS)
def test_a_recipe_takes_each_setting_for_its_owner_and_refuses_it_for_another(group, name, owners):
    value = _sample(group, name)
    others = [k for k in group.registry if k not in owners]
    if group is STRATEGY_FLAGS:
        assert validate_recipe(_recipe(strategy=owners[0], strategy_params={name: value})) == []
        problems = validate_recipe(_recipe(strategy=others[0], strategy_params={name: value}))
        where = " or ".join(f"--strategy {k}" for k in owners)
        assert problems == [f"options: {group.flag_of(name)} does not apply to --strategy {others[0]}; "
                            f"it is a setting of {where}: drop it or use that strategy"]
    else:
        assert validate_recipe(_recipe(router={"type": owners[0], name: value})) == []
        if others:
            problems = validate_recipe(_recipe(router={"type": others[0], name: value}))
            assert len(problems) == 1 and f"does not apply to --router {others[0]}" in problems[0]


def _bad(f) -> object:
    if f.metadata.get("choices"):
        return "bogus"
    return {"positive": 0, "non_negative": -1, "fraction": 1, "share": 1.5}.get(f.metadata.get("check"))


CHECKED = [(kind, f) for kind, cls in STRATEGY_SETTINGS.items() for f in fields(cls) if f.name != "given"
           and _bad(f) is not None]


@pytest.mark.parametrize(("kind", "f"), CHECKED, ids=[f"{k}.{f.name}" for k, f in CHECKED])
def test_each_checked_strategy_setting_refuses_a_bad_value_in_the_library_and_in_a_recipe(kind, f):
    problems = UpcycleOptions(strategy=kind, strategy_params={f.name: _bad(f)}).problems()
    assert len(problems) == 1 and problems[0].startswith(flag_of(f.name) + " ")
    assert validate_recipe(_recipe(strategy=kind, strategy_params={f.name: _bad(f)})) == [f"options: {problems[0]}"]


def test_the_settings_registry_matches_the_strategy_registry():
    from ckptforge.strategies import STRATEGIES, register_strategy
    from ckptforge.strategies.random import Random

    assert list(STRATEGIES) == list(STRATEGY_SETTINGS)
    assert all(s.settings is STRATEGY_SETTINGS[n] and s.params == setting_names(s.settings) for n, s in STRATEGIES.items())

    class Unregistered(Random):
        name = "unregistered"

    with pytest.raises(ValueError, match="add its settings class RandomSettings"):
        register_strategy(Unregistered())
    assert "unregistered" not in STRATEGIES


@pytest.mark.parametrize("kind", list(STRATEGY_SETTINGS))
def test_a_strategy_run_with_every_default_written_out_is_the_run_with_none(kind):
    """No strategy keeps a default of its own: spelling out the settings' defaults changes nothing."""
    import torch

    from ckptforge.strategies import STRATEGIES, DenseFFN
    from test_strategies import _random_stats

    strategy, g = STRATEGIES[kind], torch.Generator()
    defaults = {f.name: f.default for f in fields(strategy.settings) if f.name != "given" and f.default is not None}
    ffn = DenseFFN({"up": torch.randn(64, 16, generator=g.manual_seed(1)), "down": torch.randn(16, 64)})
    stats = _random_stats(64, 16)

    def run(params):
        sel = strategy.select(ffn, 4, params, stats, torch.Generator().manual_seed(0))
        return ([e.units.tolist() for e in sel.experts], [None if e.redraw is None else e.redraw.tolist()
                                                          for e in sel.experts],
                sel.down_bias_scale, sel.noise_std, sel.summary, strategy.output_scale(params, 4, 2, 64),
                strategy.expert_width(params, 64, 4), strategy.exact(params), strategy.stats_needed(params),
                strategy.validate(params, 64, 4, 2))

    assert defaults and run({}) == run(defaults)


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    return str(build_tiny("vit", tmp_path_factory.mktemp("dense") / "vit"))


STRATEGY_CASES = [(name, owners) for g, name, owners in SETTINGS if g is STRATEGY_FLAGS]


@pytest.mark.parametrize(("name", "owners"), STRATEGY_CASES, ids=[n for n, _ in STRATEGY_CASES])
def test_upcycle_refuses_a_strategy_flag_for_another_strategy_naming_its_owner(vit, capsys, name, owners):
    other = next(k for k in STRATEGY_SETTINGS if k not in owners)
    flag, value = flag_of(name), _sample(STRATEGY_FLAGS, name)
    code = main(["upcycle", vit, "--strategy", other, flag, str(value), "--dry-run", "--json"])
    err = capsys.readouterr().err
    where = " or ".join(f"--strategy {k}" for k in owners)
    assert code == 2
    assert err.strip().splitlines()[-1] == (f"error: {flag} does not apply to --strategy {other}; it is a setting "
                                            f"of {where}: drop it or use that strategy")



def test_compare_strategies_refuses_an_option_none_of_its_strategies_takes(capsys):
    from conftest import REPO

    code = main(["compare-strategies", str(REPO / "examples" / "tiny-vit-mnist"), "--calibration",
                 str(REPO / "examples" / "mnist-samples"), "--strategies", "random,uniform", "--metric", "l1", "--json"])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --metric applies to none of the compared strategies (random, uniform); it is a setting of "
        "--strategy importance: add that strategy to --strategies or drop it")
