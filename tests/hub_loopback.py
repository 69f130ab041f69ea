"""A loopback stand-in for the Hugging Face Hub: just the endpoints the installed huggingface_hub
client calls for create_repo / create_branch / upload_folder (validate-yaml, preupload, commit) and
for snapshot_download (repo info, file resolve). It records every request and stores what arrived.

    server = LoopbackHub(); server.start()   # HF_ENDPOINT=server.url
    ...; server.stop()
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass
class Repo:
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    commits: list[dict[str, Any]] = field(default_factory=list)
    prs: list[dict[str, bytes]] = field(default_factory=list)


class LoopbackHub:
    """Threaded HTTP server on 127.0.0.1; ``fail`` maps an endpoint name to a status to answer with."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.repos: dict[str, Repo] = {}
        self.fail: dict[str, int] = {}
        self.pr_titles: list[str] = []
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> "LoopbackHub":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def add_model(self, repo_id: str, files: dict[str, bytes], revision: str = "main") -> None:
        """Seed a repo for download tests."""
        repo = self.repos.setdefault(repo_id, Repo(private=False))
        repo.branches.setdefault(revision, {}).update(files)

    def endpoints(self) -> list[str]:
        return [r["endpoint"] for r in self.requests]

    # --- request handling -------------------------------------------------------------------

    def handle(self, method: str, raw_path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict, bytes]:
        url = urlsplit(raw_path)
        path, query = unquote(url.path), parse_qs(url.query)
        endpoint, args = _route(method, path)
        with self.lock:
            self.requests.append({"method": method, "path": path, "query": query, "endpoint": endpoint,
                                  "authorization": headers.get("authorization"), "body": body})
        if endpoint in self.fail:
            status = self.fail[endpoint]
            return status, {"X-Error-Message": f"loopback {status}"}, json.dumps({"error": f"loopback {status}"}).encode()
        handler = getattr(self, f"_{endpoint}", None)
        if handler is None:
            return 404, {"X-Error-Code": "EntryNotFound"}, b'{"error": "no such endpoint"}'
        return handler(args, query, body)

    def _create(self, args: tuple, query: dict, body: bytes) -> tuple[int, dict, bytes]:
        data = json.loads(body)
        repo_id = f"{data['organization']}/{data['name']}"
        answer = json.dumps({"url": f"{self.url}/{repo_id}", "name": repo_id}).encode()
        if repo_id in self.repos:
            return 409, {}, answer
        self.repos[repo_id] = Repo(private=data.get("visibility") == "private")
        return 200, {}, answer

    def _validate_yaml(self, args: tuple, query: dict, body: bytes) -> tuple[int, dict, bytes]:
        return 200, {}, b'{"errors": [], "warnings": []}'

    def _branch(self, args: tuple, query: dict, body: bytes) -> tuple[int, dict, bytes]:
        repo_id, branch = args
        repo = self.repos.get(repo_id)
        if repo is None:
            return 404, {"X-Error-Code": "RepoNotFound"}, b'{"error": "repo not found"}'
        if branch in repo.branches:
            return 409, {}, b'{"error": "branch exists"}'
        repo.branches[branch] = dict(repo.branches["main"])
        return 200, {}, b"{}"

    def _preupload(self, args: tuple, query: dict, body: bytes) -> tuple[int, dict, bytes]:
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                 for f in json.loads(body)["files"]]
        return 200, {}, json.dumps({"files": files}).encode()

    def _commit(self, args: tuple, query: dict, body: bytes) -> tuple[int, dict, bytes]:
        repo_id, revision = args
        repo = self.repos.get(repo_id)
        if repo is None:
            return 404, {"X-Error-Code": "RepoNotFound"}, b'{"error": "repo not found"}'
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        files = {item["value"]["path"]: base64.b64decode(item["value"]["content"])
                 for item in lines if item["key"] == "file"}
        pr_url = None
        if revision.startswith("refs/pr/"):
            repo.prs[int(revision.rsplit("/", 1)[1]) - 1].update(files)
        elif revision not in repo.branches:
            return 404, {"X-Error-Code": "RevisionNotFound"}, b'{"error": "revision not found"}'
        else:
            repo.branches[revision].update(files)
        oid = hashlib.sha1(body).hexdigest()
        repo.commits.append({"revision": revision, "summary": header["summary"], "files": sorted(files), "oid": oid})
        answer = {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": pr_url}
        return 200, {}, json.dumps(answer).encode()

    def _discussion_open(self, args: tuple, query: dict, body: bytes) -> tuple[int, dict, bytes]:
        repo = self.repos.get(args[0])
        if repo is None:
            return 404, {"X-Error-Code": "RepoNotFound"}, b'{"error": "repo not found"}'
        repo.prs.append({})
        self.pr_titles.append(json.loads(body)["title"])
        return 200, {}, json.dumps({"num": len(repo.prs)}).encode()

    def _discussion(self, args: tuple, query: dict, body: bytes) -> tuple[int, dict, bytes]:
        repo_id, num = args
        details = {
            "title": self.pr_titles[int(num) - 1], "num": int(num), "author": {"name": "me"},
            "createdAt": "2026-01-01T00:00:00.000Z", "status": "draft", "isPullRequest": True,
            "repo": {"name": repo_id, "type": "model"}, "events": [], "filesWithConflicts": [],
            "changes": {"base": "refs/heads/main"},
        }
        return 200, {}, json.dumps(details).encode()

    def _repo_info(self, args: tuple, query: dict, body: bytes) -> tuple[int, dict, bytes]:
        repo_id, revision = args
        repo = self.repos.get(repo_id)
        if repo is None or revision not in repo.branches:
            return 404, {"X-Error-Code": "RepoNotFound"}, b'{"error": "repo not found"}'
        siblings = [{"rfilename": name} for name in sorted(repo.branches[revision])]
        return 200, {}, json.dumps({"id": repo_id, "sha": _sha(repo_id, revision), "siblings": siblings,
                                    "private": repo.private}).encode()

    def _files(self, repo_id: str, revision: str) -> dict[str, bytes] | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            return None
        by_sha = {_sha(repo_id, b): b for b in repo.branches}
        return repo.branches.get(by_sha.get(revision, revision))

    def _tree(self, args: tuple, query: dict, body: bytes) -> tuple[int, dict, bytes]:
        files = self._files(*args)
        if files is None:
            return 404, {"X-Error-Code": "RevisionNotFound"}, b'{"error": "revision not found"}'
        entries = [{"type": "file", "path": n, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                   for n, d in sorted(files.items())]
        return 200, {}, json.dumps(entries).encode()

    def _resolve(self, args: tuple, query: dict, body: bytes) -> tuple[int, dict, bytes]:
        repo_id, revision, filename = args
        files = self._files(repo_id, revision)
        data = files.get(filename) if files is not None else None
        if data is None:
            return 404, {"X-Error-Code": "EntryNotFound"}, b'{"error": "entry not found"}'
        branch = next((b for b in self.repos[repo_id].branches if _sha(repo_id, b) == revision), revision)
        return 200, {"X-Repo-Commit": _sha(repo_id, branch), "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                     "Content-Type": "application/octet-stream"}, data

    def _resolve_old(self, args: tuple, query: dict, body: bytes) -> tuple[int, dict, bytes]:
        repo_id, revision, filename = args
        repo = self.repos.get(repo_id)
        data = repo.branches.get(revision, {}).get(filename) if repo else None
        if data is None:
            return 404, {"X-Error-Code": "EntryNotFound"}, b'{"error": "entry not found"}'
        return 200, {"X-Repo-Commit": _sha(repo_id, revision), "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                     "Content-Type": "application/octet-stream"}, data


def _sha(repo_id: str, revision: str) -> str:
    return hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()


def _route(method: str, path: str) -> tuple[str, tuple]:
    parts = path.strip("/").split("/")
    if method == "POST" and path == "/api/repos/create":
        return "create", ()
    if method == "POST" and path == "/api/validate-yaml":
        return "validate_yaml", ()
    if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("preupload", "commit", "branch"):
        return parts[4], (f"{parts[2]}/{parts[3]}", "/".join(parts[5:]))
    if parts[:2] == ["api", "models"] and len(parts) >= 5 and parts[4] == "discussions":
        return ("discussion_open" if method == "POST" else "discussion"), (f"{parts[2]}/{parts[3]}", *parts[5:6])
    if method == "GET" and parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "tree":
        return "tree", (f"{parts[2]}/{parts[3]}", parts[5])
    if method == "GET" and parts[:2] == ["api", "models"] and len(parts) >= 4:
        revision = "/".join(parts[5:]) if len(parts) > 5 and parts[4] == "revision" else "main"
        return "repo_info", (f"{parts[2]}/{parts[3]}", revision)
    if len(parts) >= 5 and parts[2] == "resolve":
        return "resolve", (f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
    return f"unknown {method} {path}", ()


def _handler_for(hub: LoopbackHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, extra, payload = hub.handle(self.command, self.path, headers, body)
            self.send_response(status)
            extra.setdefault("Content-Type", "application/json")
            for key, value in extra.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        do_GET = do_POST = do_HEAD = do_PUT = _serve

        def log_message(self, *args: Any) -> None:  # keep test output quiet
            pass

    return Handler
