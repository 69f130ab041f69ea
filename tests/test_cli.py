"""The command line: exit codes, one-line errors, --json, nothing written on bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ckptforge.cli import main
from conftest import cli_env, read_json, run_cli
from test_source import _populate_cache


def _invoke(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


def test_upcycle_json_then_verify_and_inspect(tiny, tmp_path, capsys):
    out = tmp_path / "moe"
    code, stdout, _ = _invoke(capsys, "upcycle", str(tiny("vit")), "--experts", "4", "--out", str(out), "--json")
    assert code == 0
    payload = json.loads(stdout)
    assert payload["plan"]["moe_layers"] == [1, 3] and payload["verify"] is None
    code, stdout, _ = _invoke(capsys, "verify", str(out), "--json")
    assert code == 0 and json.loads(stdout)["passed"] is True
    code, stdout, _ = _invoke(capsys, "inspect", str(out), "--json")
    info = json.loads(stdout)
    assert code == 0 and info["is_moe"] and info["num_experts"] == 4 and info["params_active"] < info["params_total"]
    code, stdout, _ = _invoke(capsys, "inspect", "--aliases", "--json")
    assert json.loads(stdout)["aliases"]["vit-base"] == "google/vit-base-patch16-224"


def test_dry_run_prints_plan_and_writes_nothing(tiny, tmp_path, capsys):
    out = tmp_path / "moe"
    code, stdout, _ = _invoke(capsys, "upcycle", str(tiny("llama")), "--experts", "8", "--layers", "all",
                              "--out", str(out), "--dry-run", "--json")
    plan = json.loads(stdout)["plan"]
    assert code == 0 and not out.exists()
    assert plan["output_format"] == "mixtral" and plan["num_experts"] == 8
    assert plan["bytes_to_write"] > 0 and plan["params_active"] < plan["params_total"]


def test_verify_fails_with_exit_1_above_tolerance(tiny, tmp_path, capsys):
    out = tmp_path / "moe"
    assert main(["upcycle", str(tiny("bert")), "--experts", "4", "--noise-std", "0.05", "--out", str(out), "-q"]) == 0
    code, stdout, err = _invoke(capsys, "verify", str(out), "--json")
    assert code == 1 and json.loads(stdout)["passed"] is False
    assert "above tolerance" in _one_line_error(err)


@pytest.mark.parametrize("args,code,message", [
    (["--experts", "1"], 2, "error: --experts 1 makes no mixture; use 2 or more experts"),
    (["--experts", "0"], 2, "error: --experts 0 makes no mixture; use 2 or more experts"),
    (["--experts", "4", "--top-k", "5"], 2, "error: --top-k 5 is larger than --experts 4; use --top-k ≤ 4"),
    (["--layers", "7"], 2, "error: --layers 7: layer index 7 is out of range; the model has layers 0..3"),
    (["--experts", "1", "--layers", "9"], 2,
     "error: --experts 1 makes no mixture; use 2 or more experts; --layers 9: layer index 9 is out of range; "
     "the model has layers 0..3"),
    (["--router-init", "magic"], 2, "error: --router-init 'magic' is not one of normal, zeros, centroid"),
    (["--shard-size", "lots"], 2,
     "error: --shard-size: size 'lots' is not understood; write e.g. 5GB, 500MB or 2GiB"),
])
def test_bad_options_exit_2_with_the_fix_and_write_nothing(tiny, tmp_path, capsys, args, code, message):
    out = tmp_path / "moe"
    got, _, err = _invoke(capsys, "upcycle", str(tiny("vit")), "--out", str(out), *args)
    assert got == code
    assert _one_line_error(err) == message
    assert not out.exists() and not list(tmp_path.glob(".moe*"))


def test_source_errors_exit_3(tmp_path, capsys):
    code, _, err = _invoke(capsys, "upcycle", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert code == 3 and "not found" in _one_line_error(err)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    (tmp_path / "model.safetensors").write_bytes(os.urandom(1000))
    code, _, err = _invoke(capsys, "upcycle", str(tmp_path), "--out", str(tmp_path / "o"))
    assert code == 3 and "not a valid safetensors file" in _one_line_error(err)
    assert not (tmp_path / "o").exists()


def test_unsupported_architecture_lists_what_is_supported(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    save_file({"wte.weight": torch.zeros(4, 4)}, tmp_path / "model.safetensors")
    code, _, err = _invoke(capsys, "upcycle", str(tmp_path), "--out", str(tmp_path / "o"))
    line = _one_line_error(err)
    assert code == 2
    assert line.startswith("error: unsupported architecture model_type='gpt2'; supported model types: vit, bert, llama, mistral, qwen2")


def test_output_exists_exit_5_unless_force(tiny, tmp_path, capsys):
    out = tmp_path / "moe"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = _invoke(capsys, "upcycle", str(tiny("vit")), "--experts", "2", "--out", str(out))
    assert code == 5
    assert _one_line_error(err) == f"error: output '{out}' already exists; pass --force to replace it or choose another --out"
    assert (out / "keep.txt").read_text() == "mine"
    # issue 11: --force replaces a previous output, never a folder of the user's files
    code, _, err = _invoke(capsys, "upcycle", str(tiny("vit", name="v2")), "--experts", "2", "--out", str(out), "--force")
    assert code == 2 and "holds files but no ckptforge.json" in _one_line_error(err)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()  # an empty directory may be replaced, and so may a previous output
    assert main(["upcycle", str(tiny("vit", name="v2")), "--experts", "2", "--out", str(out), "--force", "-q"]) == 0
    assert main(["upcycle", str(tiny("vit", name="v2")), "--experts", "4", "--out", str(out), "--force", "-q"]) == 0
    assert read_json(out / "ckptforge.json")["options"]["num_experts"] == 4
    assert not list(tmp_path.glob(".moe.ckptforge-*"))


def test_not_enough_disk_exit_2_and_nothing_written(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("ckptforge.io.paths.free_bytes", lambda out: 1000)
    out = tmp_path / "moe"
    code, _, err = _invoke(capsys, "upcycle", str(tiny("vit")), "--experts", "4", "--out", str(out))
    assert code == 2 and "not enough free disk" in _one_line_error(err)
    assert not out.exists()


def test_json_errors_are_one_object_on_stdout(tmp_path, capsys):
    code, stdout, _ = _invoke(capsys, "inspect", str(tmp_path / "missing"), "--json")
    payload = json.loads(stdout)
    assert code == 3 and payload["exit_code"] == 3 and "not found" in payload["error"]


def test_console_entry_points_and_hub_cache_in_a_real_process(tiny, tmp_path):
    hf_home = tmp_path / "hf"
    _populate_cache(hf_home, "tiny-org/tiny-vit", tiny("vit"))
    env = cli_env(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    done = run_cli("inspect", "tiny-org/tiny-vit", "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["family"] == "vit"
    done = run_cli("inspect", "tiny-org/not-cached", "--json", env=env)
    assert done.returncode == 4 and "HF_HUB_OFFLINE" in json.loads(done.stdout)["error"]
    done = run_cli("--version")
    assert done.returncode == 0 and done.stdout.startswith("ckptforge ")


def _big_dense(directory: Path) -> Path:
    """A one-layer LLaMA-shaped checkpoint whose 8-expert output is ~400 MB (zeros: fast to make)."""
    d, f = 1024, 4096
    directory.mkdir()
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": d,
              "intermediate_size": f, "num_hidden_layers": 1, "num_attention_heads": 8,
              "num_key_value_heads": 8, "vocab_size": 32, "hidden_act": "silu"}
    (directory / "config.json").write_text(json.dumps(config))
    p = "model.layers.0."
    tensors = {"model.embed_tokens.weight": torch.zeros(32, d), "model.norm.weight": torch.ones(d),
               "lm_head.weight": torch.zeros(32, d), p + "input_layernorm.weight": torch.ones(d),
               p + "post_attention_layernorm.weight": torch.ones(d),
               p + "mlp.gate_proj.weight": torch.zeros(f, d), p + "mlp.up_proj.weight": torch.zeros(f, d),
               p + "mlp.down_proj.weight": torch.zeros(d, f)}
    for n in "qkvo":
        tensors[p + f"self_attn.{n}_proj.weight"] = torch.zeros(d, d)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def _interruptible_conversion(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """An ~400 MB conversion into ``tmp_path / "moe"`` (50 MB shards), returned once two shard files
    exist in its temporary directory (still running), with its output path."""
    dense = _big_dense(tmp_path / "dense")
    out = tmp_path / "moe"
    proc = subprocess.Popen([sys.executable, "-m", "ckptforge", "upcycle", str(dense), "--experts", "8", "--layers",
                             "all", "--out", str(out), "--shard-size", "50MB", "-q"], env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        tmp_dirs = list(tmp_path.glob(".moe.ckptforge-tmp-*"))
        if tmp_dirs and len(list(tmp_dirs[0].glob("*.safetensors"))) >= 2:
            break
        time.sleep(0.002)
    assert proc.poll() is None, "the conversion finished before it could be interrupted"
    return proc, out


@pytest.mark.slow
def test_sigkill_while_writing_leaves_nothing_that_looks_complete(tmp_path):
    proc, out = _interruptible_conversion(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    assert list(tmp_path.glob(".moe.ckptforge-tmp-*"))  # the partial write stayed under its hidden name
    done = subprocess.run(proc.args, env=cli_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (out / "ckptforge.json").is_file()
    assert not list(tmp_path.glob(".moe.ckptforge-tmp-*"))  # the next run removed the stale one


def test_unknown_option_is_a_one_line_usage_error(capsys):
    code, _, err = _invoke(capsys, "inspect", "--no-such-flag")
    assert code == 2 and _one_line_error(err) == "error: No such option: --no-such-flag; see --help"


def test_sphero_with_calibration_defaults_to_importance(tmp_path, capsys):
    example = Path(__file__).resolve().parents[1] / "examples"
    out = tmp_path / "sph"
    code, stdout, _ = _invoke(capsys, "upcycle", str(example / "tiny-vit-mnist"), "--router", "sphero",
                              "--calibration", str(example / "mnist-samples"), "--calib-samples", "32",
                              "--experts", "4", "--out", str(out), "--json")
    plan = json.loads(stdout)["plan"]
    assert code == 0 and plan["strategy"] == "importance" and plan["expert_width"] == 64
