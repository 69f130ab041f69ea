"""Issue 12, defect "--recipe silently drops explicit flags": every flag the user types beats the
recipe, for every option field, router setting and strategy parameter; a router flag that does not
apply to the chosen router is refused (exit 2), naming the router it belongs to."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest

from ckptforge.cli import main
from ckptforge.config import UpcycleOptions
from conftest import REPO, build_tiny

SAMPLES = str(REPO / "examples" / "mnist-samples")
VMOE, MH, SPHERO, EC = "v-moe-vit", "mh-moe-vit", "moe-jetpack-vit-sphero", "sparse-upcycling-vit-expert-choice"

#: (recipe, flags typed, where the value lands ("field" or "field.key"), the value)
CASES = [
    (VMOE, ["--experts", "4"], "num_experts", 4),
    (SPHERO, ["--core-experts", "4", "--calibration", SAMPLES], "num_experts", 4),
    (VMOE, ["--top-k", "1"], "top_k", 1),
    (VMOE, ["--layers", "all"], "layers", "all"),
    (VMOE, ["--strategy", "random"], "strategy", "random"),
    (VMOE, ["--strategy", "random", "--expert-width", "16"], "strategy_params.expert_width", 16),
    (SPHERO, ["--expert-ratio", "0.5", "--calibration", SAMPLES], "strategy_params.expert_ratio", 0.5),
    (SPHERO, ["--metric", "l1", "--calibration", SAMPLES], "strategy_params.metric", "l1"),
    (VMOE, ["--strategy", "importance", "--importance-score", "down-norm"], "strategy_params.score", "down-norm"),
    (VMOE, ["--strategy", "random", "--coactivation-mode", "partition"], "strategy_params.mode", "partition"),
    (VMOE, ["--strategy", "coactivation", "--parts", "8", "--coactivation-mode", "sample", "--calibration", SAMPLES],
     "strategy_params.parts", 8),
    (VMOE, ["--strategy", "coactivation", "--threshold", "p90", "--calibration", SAMPLES],
     "strategy_params.threshold", "p90"),
    (VMOE, ["--strategy", "random", "--output-scale", "k"], "strategy_params.output_scale", "k"),
    (VMOE, ["--noise-std", "0.01"], "strategy_params.noise_std", 0.01),
    (VMOE, ["--drop-ratio", "0.5"], "strategy_params.drop_ratio", 0.5),
    (SPHERO, ["--router", "soft", "--calibration", SAMPLES], "router.type", "soft"),
    (VMOE, ["--router-init", "zeros"], "router_init", "zeros"),
    (VMOE, ["--router-init-std", "0.5"], "router_init_std", 0.5),
    (VMOE, ["--seed", "7"], "seed", 7),
    (VMOE, ["--dtype", "bfloat16"], "dtype", "bfloat16"),
    (VMOE, ["--shard-size", "1MB"], "shard_size", 1_000_000),
    (SPHERO, ["--calibration", SAMPLES], "calibration", SAMPLES),
    (VMOE, ["--calib-samples", "8"], "calib_samples", 8),
    (VMOE, ["--calib-batch-size", "4"], "calib_batch_size", 4),
    (VMOE, ["--stats-cache", "stats.pt"], "stats_cache", "stats.pt"),
    (VMOE, ["--teacher", "{teacher}", "--strategy", "importance", "--calibration", SAMPLES], "teacher", "{teacher}"),
    # router settings, one per (router, setting)
    (VMOE, ["--no-normalize"], "router.normalize", False),
    (VMOE, ["--router-noise", "0.5"], "router.noise_std", 0.5),
    (VMOE, ["--capacity-factor", "3.0"], "router.capacity_factor", 3.0),
    (VMOE, ["--no-bpr"], "router.bpr", False),
    (VMOE, ["--aux-loss-weight", "0.1"], "router.aux_loss_weight", 0.1),
    (EC, ["--capacity-factor", "3.0"], "router.capacity_factor", 3.0),
    (MH, ["--heads", "8"], "router.heads", 8),
    (MH, ["--capacity-factor", "3.0"], "router.capacity_factor", 3.0),
    (SPHERO, ["--slots", "2", "--calibration", SAMPLES], "router.slots", 2),
    (SPHERO, ["--temperature", "0.25", "--calibration", SAMPLES], "router.temperature", 0.25),
    (SPHERO, ["--combine", "entmax15", "--calibration", SAMPLES], "router.combine", "entmax15"),
    (SPHERO, ["--expert-dropout", "0.1", "--calibration", SAMPLES], "router.expert_dropout", 0.1),
    (SPHERO, ["--drop-path", "0.2", "--calibration", SAMPLES], "router.drop_path", 0.2),
    (SPHERO, ["--universal-experts", "4", "--calibration", SAMPLES], "router.universal_experts", 4),
    (SPHERO, ["--universal-ratio", "0.5", "--calibration", SAMPLES], "router.universal_ratio", 0.5),
]


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    return str(build_tiny("vit", tmp_path_factory.mktemp("dense") / "vit"))


def _dry_run(capsys, *args: str) -> tuple[int, dict | None, str]:
    code = main(["upcycle", *args, "--dry-run", "--json"])
    out = capsys.readouterr()
    return code, json.loads(out.out) if code == 0 else None, out.err


def _at(options: dict, where: str):
    field_name, _, key = where.partition(".")
    return options[field_name][key] if key else options[field_name]


def test_the_cases_cover_every_option_field_router_setting_and_strategy_parameter():
    from ckptforge.moe.settings import ROUTER_SETTINGS
    from ckptforge.strategy_settings import STRATEGY_SETTINGS, setting_names

    covered = {where for _, _, where, _ in CASES}
    fields_covered = {w.split(".")[0] for w in covered}
    assert fields_covered >= set(UpcycleOptions().to_dict()) - {"recipe"}
    for kind, cls in ROUTER_SETTINGS.items():
        assert {f"router.{f.name}" for f in fields(cls) if f.name != "given"} <= covered, kind
    for kind, cls in STRATEGY_SETTINGS.items():  # issue 12: derived, so a new strategy setting needs its case here
        assert {f"strategy_params.{name}" for name in setting_names(cls)} <= covered, kind


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A 2× wider ViT of the same shape otherwise (issue 13's cross-size recycling)."""
    return str(build_tiny("vit", tmp_path_factory.mktemp("dense") / "teacher", hidden_size=64, intermediate_size=128))


@pytest.mark.parametrize(("recipe", "args", "where", "value"), CASES, ids=[" ".join(c[1][:2]) + f"@{c[0]}" for c in CASES])
def test_a_typed_flag_beats_the_recipe(vit, teacher, capsys, tmp_path, monkeypatch, recipe, args, where, value):
    monkeypatch.chdir(tmp_path)
    args = [a.replace("{teacher}", teacher) for a in args]
    value = value.replace("{teacher}", teacher) if isinstance(value, str) else value
    code, payload, err = _dry_run(capsys, vit, "--recipe", recipe, *args)
    assert code == 0, err
    options = payload["options"]
    assert _at(options, where) == value
    assert _at(payload["recipe"]["overrides"], where) == value


def test_the_issue_example_records_the_typed_capacity_factor(capsys, tmp_path):
    out = tmp_path / "moe"
    code = main(["upcycle", str(REPO / "examples" / "tiny-vit-mnist"), "--recipe", VMOE, "--capacity-factor", "3.0",
                 "--experts", "4", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["moe_router"]["capacity_factor"] == 3.0
    assert json.loads((out / "ckptforge.json").read_text())["options"]["router"]["capacity_factor"] == 3.0


@pytest.mark.parametrize(("args", "message"), [
    (["--recipe", VMOE, "--heads", "4"], "error: --heads does not apply to --router topk; it is a setting of "
                                         "--router mh: drop it or use that router"),
    (["--router", "topk", "--heads", "4"], "error: --heads does not apply to --router topk; it is a setting of "
                                           "--router mh: drop it or use that router"),
    (["--recipe", SPHERO, "--calibration", SAMPLES, "--capacity-factor", "2"],
     "error: --capacity-factor does not apply to --router sphero; it is a setting of --router topk or "
     "--router expert-choice or --router mh: drop it or use that router"),
    (["--strategy", "random", "--metric", "l1"], "error: --metric does not apply to --strategy random; it is a "
                                                 "setting of --strategy importance: drop it or use that strategy"),
    (["--recipe", VMOE, "--parts", "8"], "error: --parts does not apply to --strategy copy-all; it is a setting of "
                                         "--strategy coactivation: drop it or use that strategy"),
])
def test_a_flag_for_another_router_is_refused_naming_its_router(vit, capsys, args, message):
    code, _, err = _dry_run(capsys, vit, *args)
    assert code == 2
    assert err.strip().splitlines()[-1] == message
