"""A Hugging Face Hub on 127.0.0.1 for tests: the real ``huggingface_hub`` client talks to it over HTTP.

It serves model repos and Spaces (``repo_type="space"``, kept under ``spaces/owner/name``), with what
huggingface_hub 2.x calls for ``create_repo``, ``create_branch``, ``upload_folder``
(``preupload`` then an NDJSON ``commit``), ``model_info``/``repo_info``, ``list_repo_tree``/``list_repo_files``,
``list_repo_refs``, ``list_repo_commits``, ``file_exists``, the model card check of ``/api/validate-yaml``
and ``hf_hub_download`` (``HEAD`` and ``GET``
on ``/{repo}/resolve/{revision}/{path}`` with ``ETag``, ``X-Repo-Commit`` and ``Content-Length``).

Every commit gets a sha and is kept, so files resolve by branch name or by commit sha (revision pinning).
``preupload`` answers ``"regular"`` for every file, so contents arrive base64-inlined in the commit. (For
``"lfs"`` files the installed client uploads through Xet storage, a separate protocol this server does not
speak; a commit that still names an ``lfsFile`` is refused with HTTP 400.) Errors carry the Hub's
``X-Error-Code`` header (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``), so the client raises its
usual exception types. Writes need ``Authorization: Bearer <token>`` with the server's token. Requests to
anything else get HTTP 501 naming the route, so a client change shows up as a loud failure.

Fixtures: ``hub_server`` (one server per test process) and ``hub`` (per test: a fresh, empty Hub; the
client pointed at it through ``huggingface_hub.constants`` with offline mode off, a token in ``HF_TOKEN``
and an empty cache under ``tmp_path``). Import both into a test module to use them.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest
import yaml

__all__ = ["HubState", "LoopbackHub", "hub", "hub_server"]

TOKEN = "hf_qing_loopback_token"
USER = "qing-tester"
MAX_INLINE_BYTES = 64 * 1024 * 1024


def git_blob_oid(data: bytes) -> str:
    """Git's object id of a file's content (``git hash-object``), the Hub's oid of a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    """One commit: the complete file set of the repo after it."""

    oid: str
    parent: Optional[str]
    files: dict[str, bytes]
    title: str
    message: str
    date: str


@dataclass
class Repo:
    """A model or Space repo: all commits by sha, and branch heads (a Space's ``repo_id`` starts with ``spaces/``)."""

    repo_id: str
    private: bool
    created: str
    sdk: Optional[str] = None  #: a Space's SDK (gradio, docker, static)
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Optional[Commit]:
        """The commit a branch name or full commit sha points to, or ``None``."""
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        return self.commits.get(revision)


class HubError(Exception):
    """An HTTP error answer with the Hub's error headers."""

    def __init__(
        self, status: int, message: str, code: Optional[str] = None, headers: Optional[dict] = None, **body: Any
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.headers, self.body = status, message, code, headers or {}, body


class HubState:
    """The repos and the request log of one server (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self._counter = itertools.count()

    def reset(self) -> None:
        with self.lock:
            self.repos.clear()
            self.requests.clear()

    @staticmethod
    def now() -> str:
        return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")

    def repo(self, repo_id: str) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def commit_of(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def add_commit(self, repo: Repo, branch: str, files: dict[str, bytes], title: str, message: str = "") -> Commit:
        parent = repo.branches.get(branch)
        tree = "\n".join(f"{p} {git_blob_oid(c)}" for p, c in sorted(files.items()))
        seed = f"{parent}\n{tree}\n{title}\n{message}\n{next(self._counter)}"
        oid = hashlib.sha1(seed.encode()).hexdigest()
        commit = Commit(oid=oid, parent=parent, files=files, title=title, message=message, date=self.now())
        repo.commits[oid] = commit
        repo.branches[branch] = oid
        return commit

    def history(self, repo: Repo, commit: Commit) -> list[Commit]:
        out = [commit]
        while out[-1].parent is not None:
            out.append(repo.commits[out[-1].parent])
        return out


def _card_data(files: dict[str, bytes]) -> Optional[dict[str, Any]]:
    text = files.get("README.md", b"").decode("utf-8", errors="replace")
    if not text.startswith("---\n"):
        return None
    header, sep, _ = text[4:].partition("\n---\n")
    return yaml.safe_load(header) if sep else None


def _card_metadata_errors(text: str) -> list[str]:
    """What the Hub's card check would reject: unparsable YAML, wrong field types, a malformed model-index."""
    if not text.startswith("---\n"):
        return []
    header, sep, _ = text[4:].partition("\n---\n")
    if not sep:
        return ["metadata block is not closed by '---'"]
    try:
        data = yaml.safe_load(header)
    except yaml.YAMLError as err:
        return [f"invalid YAML: {err}"]
    if data is None:
        return []
    if not isinstance(data, dict):
        return ["metadata must be a mapping"]
    errors = [
        f'"{key}" must be a string'
        for key in ("license", "library_name", "pipeline_tag")
        if key in data and not isinstance(data[key], str)
    ]
    for key in ("tags", "datasets", "metrics"):
        if key in data and not (isinstance(data[key], list) and all(isinstance(v, str) for v in data[key])):
            errors.append(f'"{key}" must be a list of strings')
    for entry in data.get("model-index") or []:
        for result in entry.get("results") or []:
            if not isinstance(result.get("task", {}).get("type"), str):
                errors.append('"model-index" result needs task.type')
            if not {"name", "type"} <= set(result.get("dataset") or {}):
                errors.append('"model-index" result needs dataset.name and dataset.type')
            for metric in result.get("metrics") or []:
                if not isinstance(metric.get("type"), str) or not isinstance(metric.get("value"), (int, float)):
                    errors.append('"model-index" metrics need a string type and a numeric value')
    return errors


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the state keeps a request log
        pass

    # -- plumbing ------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", headers: Optional[dict] = None, *, head: bool = False) -> None:
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, str(value))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, data: Any, status: int = 200, headers: Optional[dict] = None) -> None:
        self._send(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _require_token(self) -> None:
        auth = self.headers.get("Authorization") or ""
        if not auth.startswith("Bearer "):
            raise HubError(401, "You must be authenticated to write to the Hub (no token sent)")
        if auth[len("Bearer ") :] != TOKEN:
            raise HubError(401, "Invalid credentials in Authorization header")

    def _dispatch(self, method: str) -> None:
        state = self.server.state
        url = urlsplit(self.path)
        with state.lock:
            state.requests.append((method, url.path))
        try:
            self._route(method, [unquote(p) for p in url.path.strip("/").split("/")], parse_qs(url.query))
        except HubError as err:
            headers = dict(err.headers)
            if err.code:
                headers["X-Error-Code"] = err.code
            headers["X-Error-Message"] = err.message
            if method == "HEAD":
                self._send(err.status, b"", {"Content-Length": "0", **headers}, head=True)
            else:
                self._json({"error": err.message, **err.body}, err.status, headers)

    do_GET = lambda self: self._dispatch("GET")  # noqa: E731
    do_HEAD = lambda self: self._dispatch("HEAD")  # noqa: E731
    do_POST = lambda self: self._dispatch("POST")  # noqa: E731
    do_DELETE = lambda self: self._dispatch("DELETE")  # noqa: E731

    # -- routes --------------------------------------------------------------------------------
    def _route(self, method: str, parts: list[str], query: dict[str, list[str]]) -> None:
        state = self.server.state
        with state.lock:
            if parts[:3] == ["api", "repos", "create"] and method == "POST":
                return self._create_repo()
            if parts[:2] == ["api", "validate-yaml"] and method == "POST":
                return self._validate_yaml()
            if parts[:2] == ["api", "whoami-v2"] and method == "GET":
                self._require_token()
                return self._json({"type": "user", "name": USER, "orgs": []})
            if len(parts) >= 4 and parts[:2] == ["api", "models"]:
                repo_id, rest = f"{parts[2]}/{parts[3]}", parts[4:]
                return self._model_api(method, repo_id, rest, query)
            if len(parts) >= 4 and parts[:2] == ["api", "spaces"]:  # Spaces: the same store, keys "spaces/..."
                return self._model_api(method, f"spaces/{parts[2]}/{parts[3]}", parts[4:], query)
            if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
                return self._resolve(method, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        raise HubError(501, f"the loopback test Hub does not implement {method} /{'/'.join(parts)}")

    def _create_repo(self) -> None:
        self._require_token()
        state = self.server.state
        payload = json.loads(self._body() or b"{}")
        kind = payload.get("type") or "model"
        if kind not in ("model", "space"):
            raise HubError(400, f"the loopback test Hub hosts model and Space repos, not {kind!r}")
        if kind == "space" and payload.get("sdk") not in ("gradio", "docker", "static"):
            raise HubError(400, f"a Space needs sdk gradio, docker or static, got {payload.get('sdk')!r}")
        name, namespace = payload["name"], payload.get("organization") or USER
        repo_id = f"{namespace}/{name}" if kind == "model" else f"spaces/{namespace}/{name}"
        url = f"{self.server.endpoint}/{repo_id}"
        if repo_id in state.repos:
            raise HubError(409, f"You already created this {kind} repo", url=url)
        private = payload.get("visibility") == "private"
        repo = Repo(repo_id=repo_id, private=private, created=state.now(), sdk=payload.get("sdk"))
        state.repos[repo_id] = repo
        state.add_commit(
            repo, "main", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}, "initial commit"
        )
        self._json({"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]})

    def _validate_yaml(self) -> None:
        content = json.loads(self._body())["content"]
        errors = _card_metadata_errors(content)
        self._json({"errors": [{"message": e} for e in errors], "warnings": []}, 400 if errors else 200)

    def _model_api(self, method: str, repo_id: str, rest: list[str], query: dict[str, list[str]]) -> None:
        state = self.server.state
        repo = state.repo(repo_id)
        head = rest[0] if rest else None
        if method == "GET" and head is None:
            return self._model_info(repo, state.commit_of(repo, "main"))
        if method == "GET" and head == "revision" and len(rest) == 2:
            return self._model_info(repo, state.commit_of(repo, rest[1]))
        if method == "GET" and head == "tree" and len(rest) >= 2:
            recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
            return self._tree(state.commit_of(repo, rest[1]), "/".join(rest[2:]), recursive)
        if method == "GET" and head == "refs":
            branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": oid} for b, oid in repo.branches.items()]
            return self._json({"branches": branches, "converts": [], "tags": [], "pullRequests": []})
        if method == "GET" and head == "commits" and len(rest) == 2:
            commits = state.history(repo, state.commit_of(repo, rest[1]))
            return self._json(
                [
                    {"id": c.oid, "title": c.title, "message": c.message, "date": c.date, "authors": [{"user": USER}]}
                    for c in commits
                ]
            )
        if method == "POST" and head == "preupload" and len(rest) == 2:
            self._require_token()
            return self._preupload(state.commit_of(repo, rest[1]))
        if method == "POST" and head == "commit" and len(rest) == 2:
            self._require_token()
            return self._commit(repo, rest[1])
        if method == "POST" and head == "branch" and len(rest) == 2:
            self._require_token()
            return self._create_branch(repo, rest[1])
        raise HubError(501, f"the loopback test Hub does not implement {method} /api/models/{repo_id}/{'/'.join(rest)}")

    def _model_info(self, repo: Repo, commit: Commit) -> None:
        card = _card_data(commit.files) or {}
        config = json.loads(commit.files["config.json"]) if "config.json" in commit.files else None
        self._json(
            {
                "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "author": repo.repo_id.split("/")[0],
                "sha": commit.oid,
                "private": repo.private,
                "gated": False,
                "disabled": False,
                "createdAt": repo.created,
                "lastModified": commit.date,
                "library_name": card.get("library_name"),
                "pipeline_tag": card.get("pipeline_tag"),
                "tags": list(card.get("tags") or []),
                "cardData": card or None,
                "config": config,
                "siblings": [{"rfilename": p} for p in sorted(commit.files)],
            }
        )

    def _tree(self, commit: Commit, path: str, recursive: bool) -> None:
        prefix = f"{path}/" if path else ""
        below = {p: c for p, c in commit.files.items() if p.startswith(prefix)}
        if path and not below:
            raise HubError(404, f"{path} does not exist at {commit.oid}", "EntryNotFound")
        entries: dict[str, dict[str, Any]] = {}
        for file_path, content in sorted(below.items()):
            parts = file_path[len(prefix) :].split("/")
            folders = [prefix + "/".join(parts[: i + 1]) for i in range(len(parts) - 1)]
            for folder in folders if recursive else folders[:1]:
                oid = hashlib.sha1(folder.encode()).hexdigest()
                entries.setdefault(folder, {"type": "directory", "oid": oid, "size": 0, "path": folder})
            if recursive or len(parts) == 1:
                entries[file_path] = {
                    "type": "file",
                    "oid": git_blob_oid(content),
                    "size": len(content),
                    "path": file_path,
                }
        self._json(list(entries.values()))

    def _preupload(self, commit: Commit) -> None:
        files = json.loads(self._body())["files"]
        answer = [
            {
                "path": f["path"],
                "uploadMode": "regular",
                "shouldIgnore": False,
                "oid": git_blob_oid(commit.files[f["path"]]) if f["path"] in commit.files else None,
            }
            for f in files
        ]
        self._json({"files": answer, "commitOid": commit.oid})

    def _commit(self, repo: Repo, branch: str) -> None:
        state = self.server.state
        body = self._body()
        if len(body) > MAX_INLINE_BYTES:
            raise HubError(413, f"commit payload of {len(body)} bytes is over the test Hub's {MAX_INLINE_BYTES}")
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch} (commits go to an existing branch)", "RevisionNotFound")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "commit payload must start with a header line")
        header = lines[0]["value"]
        head_oid = repo.branches[branch]
        parent = header.get("parentCommit")
        if parent is not None and parent != head_oid:
            raise HubError(412, f"parentCommit {parent} is not the head of {branch} ({head_oid})")
        files = dict(repo.commits[head_oid].files)
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, f"unsupported encoding {value.get('encoding')!r}")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, f"cannot delete missing file {value['path']}", "EntryNotFound")
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                files = {p: c for p, c in files.items() if not p.startswith(folder)}
            elif key == "lfsFile":
                raise HubError(400, f"the loopback test Hub takes no LFS files ({value['path']}): upload it inline")
            else:
                raise HubError(400, f"unknown commit operation {key!r}")
        commit = state.add_commit(repo, branch, files, header.get("summary") or "", header.get("description") or "")
        self._json(
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self.server.endpoint}/{repo.repo_id}/commit/{commit.oid}",
                "pullRequestUrl": None,
            }
        )

    def _create_branch(self, repo: Repo, branch: str) -> None:
        payload = json.loads(self._body() or b"{}")
        if branch in repo.branches:
            raise HubError(409, f"Reference refs/heads/{branch} already exists")
        start = self.server.state.commit_of(repo, payload.get("startingPoint") or "main")
        repo.branches[branch] = start.oid
        self._send(200)

    def _resolve(self, method: str, repo_id: str, revision: str, path: str) -> None:
        state = self.server.state
        repo = state.repo(repo_id)
        commit = state.commit_of(repo, revision)
        if path not in commit.files:
            raise HubError(404, f"{path} does not exist on {revision}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        content = commit.files[path]
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{git_blob_oid(content)}"',
            "X-Repo-Commit": commit.oid,
            "Accept-Ranges": "none",
        }
        self._send(200, content, headers, head=method == "HEAD")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.state = HubState()
        self.endpoint = f"http://127.0.0.1:{self.server_address[1]}"


@dataclass
class LoopbackHub:
    """What a test gets from the ``hub`` fixture."""

    endpoint: str
    state: HubState
    cache_dir: Path
    token: str = TOKEN

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of ``repo_id`` at a branch or commit, read from the server's store (not over HTTP)."""
        with self.state.lock:
            repo = self.state.repos[repo_id]
            return dict(self.state.commit_of(repo, revision).files)

    def url(self, repo_id: str, revision: str, path: str) -> str:
        return f"{self.endpoint}/{repo_id}/resolve/{quote(revision, safe='')}/{path}"


@pytest.fixture(scope="session")
def hub_server():
    """One loopback Hub server per test process, serving from a background thread."""
    server = _Server()
    thread = threading.Thread(target=server.serve_forever, name="loopback-hub", daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def hub(hub_server, tmp_path, monkeypatch) -> LoopbackHub:
    """An empty loopback Hub, with the real client pointed at it and online for this test only.

    ``huggingface_hub.constants`` reads ``HF_ENDPOINT``, ``HF_HUB_OFFLINE`` and the cache paths at import
    time, so the module attributes are patched (and restored after the test). Tests that want offline
    behaviour set ``constants.HF_HUB_OFFLINE = True`` through ``monkeypatch``.
    """
    from huggingface_hub import constants

    hub_server.state.reset()
    endpoint = hub_server.endpoint
    cache_dir = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf-home" / "stored_tokens"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    return LoopbackHub(endpoint=endpoint, state=hub_server.state, cache_dir=cache_dir)
