"""Publish a ckptforge output directory to the Hugging Face Hub.

Before anything is sent: the directory must be a complete ckptforge output (every file listed in
``ckptforge.json`` present with its sha256) and its model card must parse with huggingface_hub's
ModelCard / ModelCardData. The token comes from ``HF_TOKEN`` or the saved login and is never
printed, written or put into an error message.

    >>> result = push_folder("out/vit-moe", "me/vit-moe", private=True)   # doctest: +SKIP
    >>> result.commits[0]["oid"]                                          # doctest: +SKIP
    '1f0c…'
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ckptforge.errors import HubError, UsageError
from ckptforge.io.source import sha256_file

#: Weight shards go in commits of at most this many bytes; everything else goes in the last one,
#: so a repo whose push was interrupted never holds a README / ckptforge.json claiming completeness.
DEFAULT_COMMIT_BYTES = 50 * 10**9
_REQUIRED_CARD_TAGS = ("moe", "upcycled")


@dataclass
class PushResult:
    """What arrived on the Hub: the repo, its URL, and one entry per commit."""

    repo_id: str
    url: str
    revision: str | None
    private: bool
    commits: list[dict[str, Any]] = field(default_factory=list)
    pr_url: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_output(folder: str | Path) -> dict[str, Any]:
    """Refuse anything that is not a complete ckptforge output; return its provenance.

        >>> check_output("out/vit-moe")["options"]["num_experts"]   # doctest: +SKIP
        8
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"'{folder}' is not a directory; pass a ckptforge output directory")
    meta = read_provenance(folder, "push only directories written by 'ckptforge upcycle'")
    files = meta["files"]
    missing = sorted(n for n in files if not (folder / n).is_file())
    changed = sorted(n for n in files if n not in missing and sha256_file(folder / n) != files[n])
    if missing or changed:
        parts = ([f"missing: {', '.join(missing)}"] if missing else []) + \
                ([f"changed since conversion: {', '.join(changed)}"] if changed else [])
        raise UsageError(f"'{folder}' is not a complete ckptforge output ({'; '.join(parts)}); "
                         "re-run 'ckptforge upcycle' or restore the files")
    return meta


def read_provenance(folder: Path, hint: str) -> dict[str, Any]:
    """``folder/ckptforge.json`` with a ``files`` table of name → sha256; :class:`UsageError` when
    absent or malformed (``hint`` says what to do instead)."""
    meta_path = folder / "ckptforge.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"'{folder}' has no ckptforge.json, so it is not a ckptforge output; {hint}") from None
    except (ValueError, UnicodeDecodeError, OSError):
        meta = None
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict) or not all(isinstance(n, str) and Path(n).name == n and isinstance(h, str)
                                              for n, h in files.items()):
        raise UsageError(f"'{meta_path}' is not a valid ckptforge.json (no \"files\" table of file name → sha256); "
                         "re-run 'ckptforge upcycle' to rewrite the output")
    return meta


def check_repo_id(repo_id: str) -> None:
    """Refuse a repo id the Hub would refuse (huggingface_hub's own rules), before anything else.

        >>> check_repo_id("my org/my model")   # doctest: +SKIP
        Traceback (most recent call last):
        ckptforge.errors.UsageError: 'my org/my model' is not a Hub repo id (...)
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    hint = "write it as namespace/name, e.g. me/vit-moe"
    if repo_id.count("/") != 1:
        raise UsageError(f"'{repo_id}' is not a Hub repo id; {hint}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        reason = str(exc).split(":")[0].rstrip(".")
        raise UsageError(f"'{repo_id}' is not a Hub repo id ({reason}); {hint}") from None


def record_hashes(folder: str | Path, names: list[str]) -> None:
    """Record the new sha256 of files a later step rewrote on purpose (finetune's Recovery section
    in README.md, its finetune.json / curves.png) so the output still checks as complete.

        >>> record_hashes("out/vit-moe", ["README.md"])   # doctest: +SKIP
    """
    folder = Path(folder)
    meta_path = folder / "ckptforge.json"
    if not meta_path.is_file():
        return
    meta = json.loads(meta_path.read_text())
    meta["files"].update({n: sha256_file(folder / n) for n in names if (folder / n).is_file()})
    meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def set_base_model(folder: str | Path, repo_id: str) -> None:
    """Name ``repo_id`` as the card's ``base_model`` (``push --base-model``) and record README.md's new hash."""
    from huggingface_hub import ModelCard

    from ckptforge.card import check_base_model

    check_base_model(repo_id)
    readme = Path(folder) / "README.md"
    card = ModelCard.load(readme)
    card.data.base_model = repo_id
    readme.write_text(str(card))
    record_hashes(folder, ["README.md"])


def validate_card(folder: str | Path) -> dict[str, Any]:
    """Parse README.md with huggingface_hub's ModelCard and check its metadata; returns the metadata."""
    from huggingface_hub import ModelCard, ModelCardData

    readme = Path(folder) / "README.md"
    if not readme.is_file():
        raise UsageError(f"'{folder}' has no README.md model card; re-run 'ckptforge upcycle'")
    try:
        card = ModelCard.load(readme)
        data = ModelCardData(**card.data.to_dict()).to_dict()
    except Exception as exc:  # huggingface_hub raises ValueError / yaml errors for bad front matter
        raise UsageError(f"the model card '{readme}' has invalid metadata ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:200]}); fix its YAML header") from None
    problems = []
    if not data.get("library_name"):
        problems.append("no library_name")
    tags = data.get("tags") or []
    problems += [f"tag '{t}' missing" for t in _REQUIRED_CARD_TAGS if t not in tags]
    if problems:
        raise UsageError(f"the model card '{readme}' metadata is incomplete ({', '.join(problems)}); "
                         "re-run 'ckptforge upcycle' to rewrite it")
    return data


def plan_commits(folder: str | Path, commit_bytes: int = DEFAULT_COMMIT_BYTES) -> list[list[str]]:
    """Split the files into commits: weight shards in batches of ≤ ``commit_bytes``, the rest last.

        >>> plan_commits("out/vit-moe")   # doctest: +SKIP
        [['config.json', 'README.md', 'ckptforge.json', 'model.safetensors']]
    """
    folder = Path(folder)
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    weights = [n for n in names if n.endswith(".safetensors")]
    if sum((folder / n).stat().st_size for n in names) <= commit_bytes:
        return [names]
    batches: list[list[str]] = [[]]
    size = 0
    for name in weights:
        n_bytes = (folder / name).stat().st_size
        if batches[-1] and size + n_bytes > commit_bytes:
            batches.append([])
            size = 0
        batches[-1].append(name)
        size += n_bytes
    batches.append([n for n in names if n not in weights])
    return [b for b in batches if b]


def push_folder(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                message: str | None = None, create_pr: bool = False,
                commit_bytes: int = DEFAULT_COMMIT_BYTES, base_model: str | None = None) -> PushResult:
    """Check ``folder``, then create ``repo_id`` (exist_ok) and upload it in one or more commits.

    ``base_model`` (a Hub repo id) is written into the card's metadata first (and its hash recorded).
    """
    import huggingface_hub

    check_repo_id(repo_id)
    meta = check_output(folder)
    validate_card(folder)
    if base_model is not None:
        from ckptforge.card import check_base_model

        check_base_model(base_model)
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise HubError("HF_HUB_OFFLINE=1 is set, so nothing can be pushed; unset HF_HUB_OFFLINE to push")
    if huggingface_hub.get_token() is None:
        raise HubError("no Hugging Face token found; set HF_TOKEN or run 'hf auth login' before pushing")
    if base_model is not None:
        set_base_model(folder, base_model)
    message = message or _default_message(meta)
    api = huggingface_hub.HfApi()
    try:
        return _push(api, Path(folder), repo_id, private, revision, message, create_pr, commit_bytes)
    except HubError:
        raise
    except Exception as exc:
        raise hub_error(exc, repo_id, revision) from None


def _push(api: Any, folder: Path, repo_id: str, private: bool, revision: str | None, message: str,
          create_pr: bool, commit_bytes: int) -> PushResult:
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    result = PushResult(repo_id, str(url), revision, private)
    batches = plan_commits(folder, commit_bytes)
    target = revision
    for i, batch in enumerate(batches):
        title = message if len(batches) == 1 else f"{message} ({i + 1}/{len(batches)})"
        info = api.upload_folder(
            repo_id=repo_id, folder_path=folder, allow_patterns=batch, commit_message=title,
            revision=target, create_pr=create_pr and i == 0, repo_type="model",
        )
        if create_pr and i == 0:
            result.pr_url = info.pr_url
            target = info.pr_revision or target
        result.commits.append({"oid": info.oid, "url": info.commit_url, "message": title, "files": batch})
    return result


def _default_message(meta: dict[str, Any]) -> str:
    o = meta.get("options", {})
    return (f"Upload MoE checkpoint made by ckptforge {meta.get('ckptforge_version', '')} "
            f"({o.get('strategy')}, E={o.get('num_experts')}, k={o.get('top_k')})").replace("  ", " ")


def hub_error(exc: BaseException, repo_id: str, revision: str | None = None) -> HubError:
    """One line with the fix for a failed Hub call (never includes the token or the server's text)."""
    from huggingface_hub import errors as hf_errors

    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, hf_errors.OfflineModeIsEnabled):
        return HubError("HF_HUB_OFFLINE=1 is set, so nothing can be pushed; unset HF_HUB_OFFLINE to push")
    if status == 401:
        return HubError(f"the Hub rejected the token for '{repo_id}' (401 Unauthorized); "
                        "set a valid HF_TOKEN or run 'hf auth login'")
    if status == 403:
        return HubError(f"the token may not write to '{repo_id}' (403 Forbidden); "
                        "use a token with write access to that namespace")
    if status == 404:
        what = f"revision '{revision}' of '{repo_id}'" if revision else f"'{repo_id}'"
        return HubError(f"the Hub answered 404 Not Found for {what}; check the repo id, its namespace "
                        "and --revision")
    if status == 429:
        return HubError(f"the Hub rate limit was hit while pushing '{repo_id}' (429 Too Many Requests); "
                        "wait a few minutes and push again")
    if isinstance(exc, ValueError) and "metadata" in str(exc):
        return HubError(f"the Hub rejected the model card metadata of '{repo_id}'; fix the README.md YAML header")
    if status is not None:
        return HubError(f"pushing to '{repo_id}' failed (HTTP {status}); try again later or check the Hub status")
    return HubError(f"cannot reach the Hub while pushing '{repo_id}' ({type(exc).__name__}); "
                    "check the network and HF_ENDPOINT")
