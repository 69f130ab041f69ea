"""``ckptforge push`` and ``upcycle --push-to`` through the real huggingface_hub client against a
loopback Hub (tests/hub_loopback.py); Hub errors; the token never appears in any output.

Most tests run the CLI in-process (``ckptforge.cli.main``) with huggingface_hub's endpoint pointed
at the loopback server, because a fresh interpreter costs seconds of imports; one test runs the
real subprocess with ``HF_ENDPOINT`` set.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import yaml

from ckptforge.cli import main
from ckptforge.io.source import sha256_file
from conftest import cli_env, run_cli
from hub_loopback import LoopbackHub

TOKEN = "hf_loopbackSECRETtoken0123456789"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    server = LoopbackHub().start()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", server.url)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    yield server
    server.stop()


@pytest.fixture
def cli(capsys):
    """Run the CLI in-process; the token must appear in none of its output."""

    def run(*args: str) -> SimpleNamespace:
        code = main(list(args))
        out = capsys.readouterr()
        assert TOKEN not in out.out + out.err
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)

    return run


def copy_of(converted: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(converted, tmp_path / "copy"))


def assert_token_sent_only_as_header(hub: LoopbackHub) -> None:
    real = [r for r in hub.requests if not r["endpoint"].startswith("unknown")]
    assert real and all(r["authorization"] == f"Bearer {TOKEN}" for r in real)
    assert not any(TOKEN.encode() in r["body"] for r in hub.requests)


def test_push_subprocess_with_hf_endpoint(converted, tmp_path):
    server = LoopbackHub().start()
    try:
        env = cli_env(HF_ENDPOINT=server.url, HF_TOKEN=TOKEN, HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf"))
        proc = run_cli("push", str(converted), "me/vit-moe", "--json", env=env)
    finally:
        server.stop()
    assert proc.returncode == 0, proc.stderr
    assert TOKEN not in proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["repo_id"] == "me/vit-moe"
    assert server.repos["me/vit-moe"].branches["main"]["model.safetensors"] == (converted / "model.safetensors").read_bytes()
    assert_token_sent_only_as_header(server)
    written = [p for p in [*tmp_path.rglob("*"), *converted.rglob("*")] if p.is_file()]
    assert written and not any(TOKEN.encode() in p.read_bytes() for p in written)


def test_push_sends_every_file_with_the_message_and_private_flag(hub, cli, converted, tmp_path):
    proc = cli("push", str(converted), "me/vit-moe", "--private", "--message", "first push", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    repo = hub.repos["me/vit-moe"]
    local = {p.name: p.read_bytes() for p in converted.iterdir() if p.is_file()}
    assert repo.private and result["private"] is True
    assert repo.branches["main"] == local
    assert [c["summary"] for c in repo.commits] == ["first push"]
    assert result["commits"][0]["oid"] == repo.commits[0]["oid"]
    assert result["url"] == f"{hub.url}/me/vit-moe"
    card = yaml.safe_load(repo.branches["main"]["README.md"].decode().split("---")[1])
    assert {"moe", "upcycled", "copy-all"} <= set(card["tags"]) and card["library_name"] == "transformers"
    assert_token_sent_only_as_header(hub)


def test_push_to_a_branch_in_several_commits_puts_metadata_last(hub, cli, converted, tmp_path):
    proc = cli("push", str(converted), "me/vit-moe", "--revision", "dev", "--commit-size", "1KB", "--json")
    assert proc.returncode == 0, proc.stderr
    repo = hub.repos["me/vit-moe"]
    assert [c["revision"] for c in repo.commits] == ["dev", "dev"]
    assert repo.commits[0]["files"] == ["model.safetensors"]
    assert {"README.md", "ckptforge.json", "config.json"} <= set(repo.commits[1]["files"])
    assert set(repo.branches["dev"]) == {p.name for p in converted.iterdir()} and repo.branches["main"] == {}
    assert json.loads(proc.stdout)["revision"] == "dev"


def test_push_create_pr_commits_to_the_pull_request(hub, cli, converted, tmp_path):
    proc = cli("push", str(converted), "me/vit-moe", "--create-pr", "--json")
    assert proc.returncode == 0, proc.stderr
    repo = hub.repos["me/vit-moe"]
    assert json.loads(proc.stdout)["pr_url"].endswith("/discussions/1")
    assert set(repo.prs[0]) == {p.name for p in converted.iterdir()} and repo.branches["main"] == {}


def test_push_refuses_a_changed_output_and_sends_nothing(hub, cli, converted, tmp_path):
    copy = copy_of(converted, tmp_path)
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    (copy / "model.safetensors").unlink()
    proc = cli("push", str(copy), "me/vit-moe")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error: '{copy}' is not a complete ckptforge output (missing: model.safetensors; changed since "
        "conversion: config.json); re-run 'ckptforge upcycle' or restore the files"
    )
    (copy / "ckptforge.json").unlink()
    proc = cli("push", str(copy), "me/vit-moe")
    assert proc.returncode == 2 and "has no ckptforge.json" in proc.stderr
    assert hub.requests == []


def test_push_refuses_a_card_with_broken_metadata(hub, cli, converted, tmp_path):
    copy = copy_of(converted, tmp_path)
    (copy / "README.md").write_text("---\ntags: [moe\n---\n# card\n")
    meta = json.loads((copy / "ckptforge.json").read_text())
    meta["files"]["README.md"] = sha256_file(copy / "README.md")
    (copy / "ckptforge.json").write_text(json.dumps(meta))
    proc = cli("push", str(copy), "me/vit-moe")
    assert proc.returncode == 2 and "has invalid metadata" in proc.stderr and "fix its YAML header" in proc.stderr
    assert hub.requests == []


@pytest.mark.parametrize("status, message", [
    (401, "error: the Hub rejected the token for 'me/vit-moe' (401 Unauthorized); set a valid HF_TOKEN or run 'hf auth login'"),
    (403, "error: the token may not write to 'me/vit-moe' (403 Forbidden); use a token with write access to that namespace"),
    (404, "error: the Hub answered 404 Not Found for 'me/vit-moe'; check the repo id, its namespace and --revision"),
    (429, "error: the Hub rate limit was hit while pushing 'me/vit-moe' (429 Too Many Requests); wait a few minutes and push again"),
])
def test_hub_errors_are_one_line_with_the_fix_and_exit_4(hub, cli, converted, tmp_path, status, message):
    hub.fail = {"create": status, "repo_info": status}
    proc = cli("push", str(converted), "me/vit-moe")
    assert proc.returncode == 4
    assert proc.stderr.strip() == message
    assert "me/vit-moe" not in hub.repos


def test_push_offline_or_without_token_sends_nothing(hub, cli, converted, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    proc = cli("push", str(converted), "me/vit-moe")
    assert proc.returncode == 4
    assert proc.stderr.strip() == "error: HF_HUB_OFFLINE=1 is set, so nothing can be pushed; unset HF_HUB_OFFLINE to push"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN")
    proc = cli("push", str(converted), "me/vit-moe")
    assert proc.returncode == 4
    assert proc.stderr.strip() == "error: no Hugging Face token found; set HF_TOKEN or run 'hf auth login' before pushing"
    assert hub.requests == []


def test_push_unreachable_hub_exit_4(hub, cli, converted, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    proc = cli("push", str(converted), "me/vit-moe")
    assert proc.returncode == 4
    assert proc.stderr.strip() == ("error: cannot reach the Hub while pushing 'me/vit-moe' (ConnectError); "
                                   "check the network and HF_ENDPOINT")


def test_push_bad_repo_id_and_commit_size_exit_2(hub, cli, converted):
    proc = cli("push", str(converted), "not-a-repo-id")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: 'not-a-repo-id' is not a Hub repo id; write it as namespace/name, e.g. me/vit-moe"
    proc = cli("push", str(converted), "me/x", "--commit-size", "lots")
    assert proc.returncode == 2 and proc.stderr.startswith("error: --commit-size: size 'lots' is not understood")
    assert hub.requests == []


def test_upcycle_push_to_pushes_only_a_verified_conversion(hub, cli, dense, tmp_path):
    out = tmp_path / "moe"
    proc = cli("upcycle", str(dense), "--experts", "4", "--out", str(out), "--verify", "--push-to", "me/vit-moe", "--json")
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    assert payload["push"]["repo_id"] == "me/vit-moe" and payload["verify"]["passed"]
    assert set(hub.repos["me/vit-moe"].branches["main"]) == {p.name for p in out.iterdir()}

    hub.requests.clear()
    proc = cli("upcycle", str(dense), "--experts", "4", "--noise-std", "0.5", "--out", str(tmp_path / "bad"),
               "--verify", "--tol", "1e-9", "--push-to", "me/other", "--json")
    assert proc.returncode == 1
    assert "push" not in json.loads(proc.stdout) and hub.requests == [] and "me/other" not in hub.repos
    proc = cli("upcycle", str(dense), "--experts", "3", "--top-k", "4", "--out", str(tmp_path / "bad2"),
               "--push-to", "me/other")
    assert proc.returncode == 2 and hub.requests == [] and not (tmp_path / "bad2").exists()
    hub.fail = {"create": 403, "repo_info": 403}
    proc = cli("upcycle", str(dense), "--experts", "4", "--out", str(tmp_path / "kept"), "--push-to", "me/x")
    assert proc.returncode == 4 and (tmp_path / "kept" / "ckptforge.json").is_file()
    assert proc.stderr.strip().endswith(f"the output was written to {tmp_path / 'kept'}, push it later with "
                                        f"'ckptforge push {tmp_path / 'kept'} me/x'")


def test_a_finetuned_output_is_still_pushable(hub, cli, converted, tmp_path):
    from ckptforge.finetune import FinetuneOptions, finetune
    from test_finetune import make_image_folder

    moe = copy_of(converted, tmp_path)
    data = make_image_folder(tmp_path / "imgs", per_class=4)
    finetune(moe, FinetuneOptions(data=str(data), steps=1, batch_size=4, eval_every=1, device="cpu"))
    assert "## Recovery" in (moe / "README.md").read_text()
    proc = cli("push", str(moe), "me/tuned", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "## Recovery" in hub.repos["me/tuned"].branches["main"]["README.md"].decode()
