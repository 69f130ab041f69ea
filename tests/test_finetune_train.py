"""issue 13 finetune options: --train freezes the rest (unchanged bytes on --save), --lora through
peft (adapters beside the model, --merge-lora), --schedule / --warmup-steps, --max-grad-norm,
--checkpoint-every / --resume, and the progress bar's loss and throughput."""

from __future__ import annotations

import json
import math
import os
import pty
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from calib_helpers import add_tokenizer
from safetensors import safe_open

import ckptforge
from ckptforge.errors import PlanError, UsageError
from ckptforge.finetune import FinetuneOptions, finetune
from ckptforge.loading import load_model
from ckptforge.schedules import lr_factor
from tests.conftest import REPO, cli_env, run_cli

TEXT = "the cat sat on the mat. a dog lay by the door. " * 40


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def mixtral(tiny, tmp_path) -> Path:
    out = tmp_path / "moe"
    ckptforge.upcycle(add_tokenizer(tiny("llama")), out, ckptforge.UpcycleOptions(num_experts=4, top_k=2, layers="all"))
    (tmp_path / "text.txt").write_text(TEXT)
    return out


def run(moe: Path, tmp_path: Path, **kw) -> ckptforge.finetune.FinetuneReport:
    opts = dict(data=str(tmp_path / "text.txt"), steps=4, lr=3e-3, batch_size=4, eval_every=2, seq_len=16,
                device="cpu")
    return finetune(moe, FinetuneOptions(**{**opts, **kw}))


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(f, "pt") as s:
            out.update({k: s.get_tensor(k) for k in s.keys()})
    return out


def changed(before: Path, after: Path) -> set[str]:
    a, b = tensors(before), tensors(after)
    assert set(a) == set(b)
    return {k for k in a if not torch.equal(a[k], b[k])}


@pytest.mark.parametrize("train, role", [("router", ".block_sparse_moe.gate."), ("experts", ".block_sparse_moe.experts.")])
def test_train_role_leaves_every_frozen_tensor_byte_identical(mixtral, tmp_path, train, role):
    report = run(mixtral, tmp_path, train=train, save=str(tmp_path / "saved"))
    moved = changed(mixtral, tmp_path / "saved")
    assert moved and all(role in k for k in moved)
    assert len(moved) == len([k for k in tensors(mixtral) if role in k])  # every tensor of the role trained
    (moe_run,) = report.runs
    assert 0 < moe_run.trainable < moe_run.params


def test_train_all_changes_attention_too(mixtral, tmp_path):
    run(mixtral, tmp_path, save=str(tmp_path / "saved"))
    assert any("self_attn" in k for k in changed(mixtral, tmp_path / "saved"))


def test_train_experts_trains_the_dense_ffn_of_compare(mixtral, tmp_path):
    report = run(mixtral, tmp_path, train="experts", compare=str(tmp_path / "dense-llama"))
    dense = {r.name: r for r in report.runs}["dense"]
    ffn = sum(p.numel() for n, p in load_model(tmp_path / "dense-llama").named_parameters() if ".mlp." in n)
    assert dense.trainable == ffn


def test_train_router_on_a_dense_compare_is_refused(mixtral, tmp_path):
    with pytest.raises(UsageError) as err:
        run(mixtral, tmp_path, train="router", compare=str(tmp_path / "dense-llama"))
    assert str(err.value) == ("--train router selects no weight of the dense model (LlamaForCausalLM has no router); "
                              "use --train all or experts")
    assert not (mixtral / "finetune").exists()


def test_lora_saves_peft_adapters_beside_an_unchanged_base(mixtral, tmp_path):
    peft = pytest.importorskip("peft")
    report = run(mixtral, tmp_path, lora=True, lora_rank=4, save=str(tmp_path / "saved"))
    assert changed(mixtral, tmp_path / "saved") == set()  # the base is frozen: same bytes
    adapter = tmp_path / "saved" / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["peft_type"] == "LORA"
    assert all(".mlp.experts." in t for t in config["target_parameters"])
    (moe_run,) = report.runs
    assert moe_run.eval[-1]["loss"] < moe_run.eval[0]["loss"] and moe_run.trainable < moe_run.params // 4

    run(mixtral, tmp_path, lora=True, lora_rank=4, merge_lora=True, save=str(tmp_path / "merged"),
        report=str(tmp_path / "r2"))
    assert not (tmp_path / "merged" / "adapter").exists()
    moved = changed(mixtral, tmp_path / "merged")
    assert moved and all(".experts." in k for k in moved)
    ids = torch.randint(0, 128, (2, 12))
    adapted = peft.PeftModel.from_pretrained(load_model(tmp_path / "saved"), str(adapter)).eval()
    merged = load_model(tmp_path / "merged").eval()
    with torch.no_grad():  # same seed, same data: the merged weights compute the adapted model
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_lora_without_peft_says_how_to_install(mixtral, tmp_path):
    blocker = tmp_path / "no-peft"
    (blocker / "peft").mkdir(parents=True)
    (blocker / "peft" / "__init__.py").write_text("raise ImportError('No module named peft')\n")
    env = cli_env()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(blocker), env.get("PYTHONPATH", "")])
    res = run_cli("finetune", str(mixtral), "--data", str(tmp_path / "text.txt"), "--lora", env=env)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == "error: --lora needs the peft package: pip install peft"
    assert not (mixtral / "finetune").exists()


def test_schedules_and_warmup_follow_their_formulas(mixtral, tmp_path):
    cosine = lr_factor("cosine", 2, 10)
    assert [round(cosine(s), 4) for s in (0, 1, 2, 9)] == [0.5, 1.0, round(0.5 * (1 + math.cos(math.pi / 8)), 4), 0.0]
    assert [lr_factor("constant", 0, 10)(s) for s in (0, 9)] == [1.0, 1.0]
    report = run(mixtral, tmp_path, schedule="inverse-sqrt", warmup_steps=2, lr=1e-2, steps=8)
    lrs = [r["lr"] for r in report.runs[0].train]
    expected = [1e-2 * f for f in map(lr_factor("inverse-sqrt", 2, 8), range(8))]
    assert lrs == pytest.approx(expected) and lrs[0] == pytest.approx(5e-3) and lrs[-1] == pytest.approx(5e-3)


def test_max_grad_norm_clips(mixtral, tmp_path):
    loose = run(mixtral, tmp_path, max_grad_norm=0.0, save=str(tmp_path / "loose"), report=str(tmp_path / "r1"))
    tight = run(mixtral, tmp_path, max_grad_norm=1e-9, save=str(tmp_path / "tight"), report=str(tmp_path / "r2"))
    assert all("grad_norm" not in r for r in loose.runs[0].train)
    assert all(r["grad_norm"] > 1e-3 for r in tight.runs[0].train)  # the norm before clipping is recorded
    base = tensors(mixtral)

    def moved(d: Path) -> float:
        return sum((t - base[k]).abs().sum().item() for k, t in tensors(d).items())

    assert moved(tmp_path / "tight") < moved(tmp_path / "loose") / 10


def test_resume_continues_exactly_where_the_checkpoint_stopped(mixtral, tmp_path):
    whole = run(mixtral, tmp_path, steps=6, eval_every=3, compare=str(tmp_path / "dense-llama"),
                report=str(tmp_path / "whole"))
    first = run(mixtral, tmp_path, steps=3, eval_every=3, checkpoint_every=3, compare=str(tmp_path / "dense-llama"),
                report=str(tmp_path / "first"))
    assert {p.name for p in (tmp_path / "first" / "checkpoint").iterdir()} == {"moe.pt", "dense.pt"}
    resumed = run(mixtral, tmp_path, steps=6, eval_every=3, compare=str(tmp_path / "dense-llama"),
                  resume=str(tmp_path / "first" / "checkpoint"), report=str(tmp_path / "resumed"))
    assert [r.resumed_from for r in resumed.runs] == [3, 3] and first.runs[0].train == resumed.runs[0].train[:3]
    for a, b in zip(whole.runs, resumed.runs):
        assert a.train == b.train and a.eval == b.eval


def test_resume_from_a_checkpoint_of_another_model_is_refused(mixtral, tiny, tmp_path):
    other = tmp_path / "other-moe"
    ckptforge.upcycle(add_tokenizer(tiny("llama", name="wide", intermediate_size=96)), other,
                      ckptforge.UpcycleOptions(num_experts=4, top_k=2, layers="all"))
    run(other, tmp_path, steps=2, checkpoint_every=1, report=str(tmp_path / "other"))
    res = run_cli("finetune", str(mixtral), "--data", str(tmp_path / "text.txt"), "--steps", "4", "--seq-len", "16",
                  "--device", "cpu", "--resume", str(tmp_path / "other" / "checkpoint"))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == (
        f"error: --resume {tmp_path / 'other' / 'checkpoint'} holds a checkpoint of another model (moe: "
        "MixtralForCausalLM with other weights); resume with the model and options it was written for, "
        "or start without --resume")
    assert not (mixtral / "finetune").exists()


def test_new_option_problems_are_reported_together(tmp_path):
    problems = FinetuneOptions(data="x", train="head", lora=True, merge_lora=True, schedule="linear",
                               max_grad_norm=-1, checkpoint_every=-2, resume=str(tmp_path)).problems()
    assert problems == [
        "--train 'head' is not one of all, router, experts",
        "--lora trains adapters on the experts and freezes every base weight; drop --train head",
        "--merge-lora folds the adapters into the weights on --save; pass --lora and --save DIR",
        "--schedule 'linear' is not one of constant, cosine, inverse-sqrt",
        "--max-grad-norm -1 must be 0 (no clipping) or positive",
        "--checkpoint-every -2 must be 0 (no checkpoints) or positive",
        f"--resume {tmp_path} holds no checkpoint (*.pt); pass the directory a run with --checkpoint-every "
        "wrote (REPORT/checkpoint)",
    ]
    assert FinetuneOptions(data="x", lora=True, scratch=True).problems() == [
        "--lora adapts trained weights; a random-init --scratch run has none to adapt: drop --scratch"]
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(PlanError, match="--warmup-steps -1 must be 0 or more"):
        finetune(tmp_path, FinetuneOptions(data="x", warmup_steps=-1))


def test_progress_bar_shows_loss_and_throughput_on_a_tty(mixtral, tmp_path):
    leader, follower = pty.openpty()
    cmd = [sys.executable, "-m", "ckptforge", "finetune", str(mixtral), "--data", str(tmp_path / "text.txt"),
           "--steps", "3", "--seq-len", "16", "--batch-size", "4", "--device", "cpu"]
    chunks: list[bytes] = []

    def drain() -> None:  # read the terminal while the command runs (a full pty would block it)
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    proc = subprocess.Popen(cmd, env=cli_env(OMP_NUM_THREADS="1", COLUMNS="160"), stdout=subprocess.PIPE,
                            stderr=follower, text=True)
    os.close(follower)
    proc.communicate(timeout=300)
    reader.join(timeout=10)
    os.close(leader)
    shown = b"".join(chunks)
    assert proc.returncode == 0, shown.decode(errors="replace")[-2000:]
    text = shown.decode(errors="replace")
    assert "train moe" in text and "3/3" in text and "loss " in text and "/s" in text
    piped = run_cli(*cmd[3:], env=cli_env(OMP_NUM_THREADS="1"))  # not a TTY: no bar
    assert "train moe" not in piped.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal; FSDP on GPUs is the GPU check's job")
def test_fsdp_config_on_cpu_is_refused_not_ignored(mixtral, tmp_path):
    """accelerate runs FSDP only on GPU-type devices: on CPU an FSDP launch config would silently
    become plain data parallelism, so finetune refuses it."""
    res = run_cli("finetune", str(mixtral), "--data", str(tmp_path / "text.txt"), "--steps", "2",
                  env=cli_env(ACCELERATE_USE_FSDP="true"))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == (
        "error: FSDP (an accelerate config with distributed_type FSDP) needs CUDA GPUs: accelerate runs FSDP only "
        "on GPU-type devices; on CPU launch without the FSDP config (accelerate launch --multi_gpu "
        "--num_processes N starts gloo CPU processes)")
    assert not (mixtral / "finetune").exists()
