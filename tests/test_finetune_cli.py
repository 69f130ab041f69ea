"""The finetune command: exit codes and messages for bad input, --json, and a real 2-process run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import ckptforge
from tests.conftest import cli_env, run_cli
from tests.test_finetune import make_image_folder


@pytest.fixture
def vit_moe(tiny, tmp_path):
    out = tmp_path / "moe"
    ckptforge.upcycle(tiny("vit"), out, ckptforge.UpcycleOptions(num_experts=4, top_k=2, layers="every-2"))
    return out


def test_steps_zero_is_bad_usage(vit_moe, tmp_path):
    res = run_cli("finetune", str(vit_moe), "--data", str(tmp_path), "--steps", "0", "--batch-size", "0")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == (
        "error: --steps 0 trains nothing; use 1 or more steps; --batch-size 0 must be at least 1")


def test_model_dir_without_config_is_unreadable_source(tmp_path):
    res = run_cli("finetune", str(tmp_path), "--data", str(tmp_path), "--json")
    assert res.returncode == 3
    assert json.loads(res.stdout) == {
        "error": f"'{tmp_path}' has no config.json; pass a model directory (a ckptforge upcycle output)",
        "exit_code": 3,
    }


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_device_cuda_without_gpu_is_a_clear_error(vit_moe, tmp_path):
    res = run_cli("finetune", str(vit_moe), "--data", str(tmp_path), "--device", "cuda")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == (
        "error: --device cuda: no CUDA GPU is visible to torch; use --device cpu or --device auto")


def test_json_prints_one_object(vit_moe, tmp_path):
    data = make_image_folder(tmp_path / "imgs", per_class=4)
    res = run_cli("finetune", str(vit_moe), "--data", str(data), "--steps", "2", "--batch-size", "4",
                  "--device", "cpu", "--json", env=cli_env(OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert [r["name"] for r in report["runs"]] == ["moe"] and report["settings"]["eval_every"] == 1


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU (gloo) multi-process path; GPUs launch differently")
def test_two_processes_with_accelerate_launch(vit_moe, tmp_path):
    data = make_image_folder(tmp_path / "imgs", per_class=8)
    # `--multi_gpu` picks accelerate's torchrun launcher, which on a machine without CUDA starts
    # gloo CPU processes; `--cpu` alone would start ONE process unless MPI is set up.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "ckptforge", "finetune", str(vit_moe), "--data", str(data), "--steps", "3",
           "--batch-size", "4", "--eval-every", "3", "--json"]
    res = subprocess.run(cmd, env=cli_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout)  # one object: only the main process prints
    assert report["device"]["num_processes"] == 2
    (moe_run,) = report["runs"]
    assert moe_run["examples"] == 3 * 4 * 2  # both processes' batches counted
    assert (vit_moe / "finetune" / "finetune.json").is_file()
