"""Issue 12, defect "compare-strategies cannot take the strategy options": it takes upcycle's
strategy options from the same definitions (same flags, same help) and does not re-declare --layers."""

from __future__ import annotations

import json

import pytest
import typer

from ckptforge.cli import app, main
from ckptforge.cli.settings_flags import STRATEGY_FLAGS
from conftest import REPO

EXAMPLE = str(REPO / "examples" / "tiny-vit-mnist")
SAMPLES = str(REPO / "examples" / "mnist-samples")
SHARED = tuple(dict.fromkeys(("--experts", "--top-k", "--layers", "--expert-width", "--expert-ratio", "--metric", "--coactivation-mode",
          "--parts", "--threshold", "--output-scale", "--importance-score", "--calib-samples", "--calib-batch-size",
          "--seed", *(STRATEGY_FLAGS.flag_of(name) for name in STRATEGY_FLAGS.fields()))))  # issue 12: every strategy flag


def _options(command: str) -> dict[str, tuple]:
    cmd = typer.main.get_command(app).commands[command]
    return {opt: (p.help, p.default, p.is_flag) for p in cmd.params if p.param_type_name == "option" for opt in p.opts}


@pytest.mark.parametrize("flag", SHARED)
def test_compare_strategies_declares_the_option_exactly_as_upcycle_does(flag):
    upcycle, compare = _options("upcycle"), _options("compare-strategies")
    assert flag in compare
    assert compare[flag] == upcycle[flag]


def test_compare_strategies_applies_the_strategy_options(capsys):
    code = main(["compare-strategies", EXAMPLE, "--calibration", SAMPLES, "--experts", "4", "--strategies",
                 "random,importance", "--expert-width", "32", "--metric", "l1", "--calib-samples", "16", "--json"])
    assert code == 0, capsys.readouterr().err
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [(r["strategy"], r["params"], r["expert_width"]) for r in rows] == [
        ("random", {}, 32), ("importance", {}, 32), ("importance", {"score": "weight-norm"}, 32)]
