"""``ckptforge push``: publish a ckptforge output directory to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ckptforge.errors import HubError, UsageError

from .options import JsonOpt, QuietOpt, emit_json, stdout


def push(
    out_dir: Annotated[Path, typer.Argument(help="A ckptforge output directory (hashes in ckptforge.json are checked).")],
    repo_id: Annotated[str, typer.Argument(help="Hub repo id, namespace/name; created if absent.")],
    private: Annotated[bool, typer.Option("--private", help="Create the repo private.")] = False,
    revision: Annotated[str | None, typer.Option("--revision", help="Branch to push to (created if absent).")] = None,
    message: Annotated[str | None, typer.Option("--message", "-m", help="Commit message.")] = None,
    create_pr: Annotated[bool, typer.Option("--create-pr", help="Open a pull request instead of committing to the branch.")] = False,
    commit_size: Annotated[str, typer.Option("--commit-size", help="Largest commit of weight shards, e.g. 50GB; larger outputs go in several commits.")] = "50GB",
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    # --- issue 12: name the card's base_model ---
    base_model: Annotated[str | None, typer.Option("--base-model", help="Hub repo id to name as the card's base_model (default: the Hub repo the source came from, if any).")] = None,
) -> None:
    """Push an output directory to the Hub (token from HF_TOKEN or 'hf auth login'; never printed)."""
    from ckptforge.config import parse_size
    from ckptforge.hub import DEFAULT_COMMIT_BYTES, push_folder

    try:
        commit_bytes = parse_size(commit_size)
    except ValueError as exc:
        raise UsageError(f"--commit-size: {exc}") from None
    result = push_folder(out_dir, repo_id, private=private, revision=revision, message=message,
                         create_pr=create_pr, commit_bytes=commit_bytes or DEFAULT_COMMIT_BYTES, base_model=base_model)
    if as_json:
        emit_json(result.to_dict())
    elif not quiet:
        render_push(result.to_dict())


def push_output(out_dir: Path, repo_id: str, quiet: bool) -> dict[str, Any]:
    """``upcycle --push-to``: push with the defaults; returns the result for the JSON payload."""
    from ckptforge.hub import push_folder

    try:
        result = push_folder(out_dir, repo_id).to_dict()
    except (HubError, UsageError) as exc:  # the conversion itself succeeded: say where it is
        raise type(exc)(f"{exc}; the output was written to {out_dir}, push it later with "
                        f"'ckptforge push {out_dir} {repo_id}'") from exc
    if not quiet:
        render_push(result)
    return result


def render_push(result: dict[str, Any]) -> None:
    where = f" (branch {result['revision']})" if result["revision"] else ""
    stdout.print(f"pushed to [bold]{result['url']}[/]{where} in {len(result['commits'])} commit(s)")
    if result["pr_url"]:
        stdout.print(f"pull request: {result['pr_url']}")
