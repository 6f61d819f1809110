"""In-memory fake of the Hugging Face Hub, served over loopback HTTP for offline tests.

It speaks enough of the Hub's wire protocol for the real ``huggingface_hub`` client (2.x, httpx2 transport,
legacy LFS upload path, i.e. ``HF_HUB_DISABLE_XET=1``) to create repos, commit (regular + LFS files, PRs,
branches), list trees/refs/commits, read model info and download files. Standard library only.

    hub = start_hub_server(tokens={"hf_test_token_user": "user"})
    hub.create_repo("user/model")
    sha = hub.commit("user/model", {"config.json": b"{}"}, message="seed")
    ...  # point the client at hub.url (see `configure_hf_client`)
    hub.stop()

Git-like model: every commit is a full snapshot {path: Blob}; refs map full ref names
(``refs/heads/main``, ``refs/tags/v1``, ``refs/pr/1``) to commit shas; old commits stay readable.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import socket
import threading
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

__all__ = ["HubServer", "HubError", "Fault", "Blob", "RecordedRequest", "start_hub_server", "configure_hf_client"]

DEFAULT_TOKENS = {"hf_test_token_user": "user", "hf_other": "other"}
DEFAULT_BRANCH = "main"
# The Hub rejects regular (git) files >= 10 MiB and binary files; the default .gitattributes tracks these suffixes.
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
LFS_SUFFIXES = (".7z", ".arrow", ".bin", ".bz2", ".ckpt", ".ftz", ".gguf", ".gz", ".h5", ".joblib", ".mlmodel",
                ".model", ".msgpack", ".npy", ".npz", ".onnx", ".ot", ".parquet", ".pb", ".pickle", ".pkl", ".pt",
                ".pth", ".rar", ".safetensors", ".tar", ".tflite", ".tgz", ".wasm", ".xz", ".zip", ".zst")
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()
UNGATED_FILES = ("README.md", ".gitattributes")  # the Hub shows the card of a gated repo to everyone
_YAML_BLOCK = re.compile(r"^(\s*---[\r\n]+)([\S\s]*?)([\r\n]+---(\r\n|\n|$))")  # same as huggingface_hub.repocard


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def should_use_lfs(path: str, size: int, sample: bytes = b"") -> bool:
    """Upload-mode rule of the preupload endpoint: weights suffixes, big files and binary content go to LFS."""
    if size == 0:
        return False
    return path.lower().endswith(LFS_SUFFIXES) or "tfevents" in path or size >= LFS_SIZE_THRESHOLD or b"\0" in sample


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"  # format of parse_datetime


def parse_front_matter(text: str) -> dict:
    """YAML metadata block of a model card (PyYAML if importable, else flat `key: value` / `- item` lists)."""
    match = _YAML_BLOCK.search(text)
    if not match:
        return {}
    try:
        import yaml

        data = yaml.safe_load(match.group(2))
    except ImportError:
        data, key = {}, None
        for line in match.group(2).splitlines():
            if line.lstrip().startswith("- ") and key:
                data.setdefault(key, []).append(line.strip()[2:].strip("'\""))
            elif ":" in line and not line.startswith(" "):
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip().strip("'\"")
                data[key] = value if value else []
    except Exception:
        return {}
    return data if isinstance(data, dict) else {}


class Blob:
    """A file version. `oid` is the git blob sha1 (of the LFS pointer for LFS files), `sha256` of the content."""

    __slots__ = ("data", "lfs", "sha256", "oid")

    def __init__(self, data: bytes, lfs: bool):
        self.data, self.lfs = data, lfs
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.oid = git_blob_sha1(self.pointer if lfs else data)

    @property
    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()

    def entry(self, path: str) -> dict:
        """Entry of /tree and /paths-info. Note `lfs.oid` here vs `lfs.sha256` in model_info siblings."""
        out = {"type": "file", "oid": self.oid, "size": len(self.data), "path": path}
        if self.lfs:
            out["lfs"] = {"oid": self.sha256, "size": len(self.data), "pointerSize": len(self.pointer)}
        return out


@dataclass
class Commit:
    oid: str
    parent: str | None
    files: dict[str, Blob]
    title: str
    message: str
    author: str
    date: str


@dataclass
class Repo:
    repo_id: str
    owner: str
    private: bool
    gated: str | bool  # False, "auto" or "manual"
    created_at: str = field(default_factory=_now)
    refs: dict[str, str] = field(default_factory=dict)  # full ref name -> commit sha
    commits: dict[str, Commit] = field(default_factory=dict)
    lfs: dict[str, bytes] = field(default_factory=dict)  # per-repo LFS store: sha256 -> content
    granted: set[str] = field(default_factory=set)  # users allowed through the gate
    next_pr: int = 1


@dataclass
class Fault:
    """An injected failure (see HubServer.fail)."""

    route: str
    method: str | None
    status: int
    message: str
    kind: str
    times: int | None
    hits: int = 0


@dataclass
class RecordedRequest:
    method: str
    path: str  # raw path as sent (percent-encoded), without the query string
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names
    body: bytes
    route: str | None = None  # e.g. "resolve", "commit", "tree" (None: no route matched)
    params: dict[str, str] = field(default_factory=dict)  # decoded route params: repo, rev, path, ...
    status: int | None = None


class HubError(Exception):
    """Error answered as the Hub does: status, JSON {"error": message}, X-Error-Code / X-Error-Message headers."""

    def __init__(self, status: int, message: str, code: str | None = None, headers=None, extra=None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers, self.extra = dict(headers or {}), dict(extra or {})


class HubServer:
    def __init__(self, tokens: dict[str, str] | None = None, orgs: dict[str, list[str]] | None = None,
                 host: str = "127.0.0.1", port: int = 0, tree_page_size: int = 1000):
        self.tokens = dict(DEFAULT_TOKENS if tokens is None else tokens)  # token -> username
        self.orgs = {u: list(o) for u, o in (orgs or {}).items()}  # username -> org names (write access)
        self.tree_page_size = tree_page_size
        self.repos: dict[str, Repo] = {}
        self.requests: list[RecordedRequest] = []
        self.errors: list[str] = []  # tracebacks of server-side bugs (answered with 500)
        self.faults: list[Fault] = []  # injected by `fail`
        self._lock = threading.RLock()
        self._counter = itertools.count()
        self._httpd = ThreadingHTTPServer((host, port), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.hub = self
        self._thread: threading.Thread | None = None
        self.url = f"http://{host}:{self._httpd.server_address[1]}"

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> HubServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="fake-hub",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> HubServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------- seeding / inspection API (no HTTP)
    def create_repo(self, repo_id: str, *, private: bool = False, gated: bool | str = False,
                    owner: str | None = None, gitattributes: bool = True) -> str:
        """Create a model repo. Like the Hub, its main branch starts with a commit holding `.gitattributes`."""
        with self._lock:
            if repo_id in self.repos:
                raise ValueError(f"repo {repo_id} exists")
            gated = "auto" if gated is True else gated
            repo = Repo(repo_id, owner or repo_id.split("/")[0], private, gated)
            self.repos[repo_id] = repo
            files = {".gitattributes": Blob(GITATTRIBUTES, False)} if gitattributes else {}
            self._new_commit(repo, f"refs/heads/{DEFAULT_BRANCH}", None, files, "initial commit", "", repo.owner)
            return f"{self.url}/{repo_id}"

    def commit(self, repo_id: str, files: dict | None = None, *, message: str = "Upload files",
               branch: str = DEFAULT_BRANCH, delete=(), description: str = "", author: str | None = None) -> str:
        """Commit `{path: bytes | local path}` (and deletions) to `branch`; a missing branch is forked from main.

        Upload mode follows the preupload rule (`should_use_lfs`). Returns the new commit sha.
        """
        with self._lock:
            repo = self._repo(repo_id)
            ref = branch if branch.startswith("refs/") else f"refs/heads/{branch}"
            base = repo.commits[repo.refs.get(ref) or repo.refs[f"refs/heads/{DEFAULT_BRANCH}"]]
            ops = []
            for path, content in (files or {}).items():
                data = bytes(content) if isinstance(content, (bytes, bytearray)) else Path(content).read_bytes()
                blob = Blob(data, should_use_lfs(path, len(data), data[:512]))
                if blob.lfs:
                    repo.lfs[blob.sha256] = data
                ops.append(("file", path, blob))
            ops += [("deletedFile", p, None) for p in delete]
            return self._apply(repo, ref, base, ops, message, description, author or repo.owner).oid

    def create_branch(self, repo_id: str, branch: str, revision: str = DEFAULT_BRANCH) -> str:
        with self._lock:
            repo = self._repo(repo_id)
            repo.refs[f"refs/heads/{branch}"] = sha = self._resolve(repo, revision).oid
            return sha

    def tag(self, repo_id: str, tag: str, revision: str = DEFAULT_BRANCH) -> str:
        with self._lock:
            repo = self._repo(repo_id)
            repo.refs[f"refs/tags/{tag}"] = sha = self._resolve(repo, revision).oid
            return sha

    def grant(self, repo_id: str, user: str) -> None:
        """Let `user` through the gate of a gated repo."""
        with self._lock:
            self._repo(repo_id).granted.add(user)

    def resolve(self, repo_id: str, revision: str = DEFAULT_BRANCH) -> str:
        """Commit sha of a branch / tag / `refs/pr/N` / sha."""
        with self._lock:
            return self._resolve(self._repo(repo_id), revision).oid

    def blobs(self, repo_id: str, revision: str = DEFAULT_BRANCH) -> dict[str, Blob]:
        with self._lock:
            return dict(self._resolve(self._repo(repo_id), revision).files)

    def files(self, repo_id: str, revision: str = DEFAULT_BRANCH) -> dict[str, bytes]:
        return {path: blob.data for path, blob in self.blobs(repo_id, revision).items()}

    def refs(self, repo_id: str) -> dict[str, str]:
        with self._lock:
            return dict(self._repo(repo_id).refs)

    def history(self, repo_id: str, revision: str = DEFAULT_BRANCH) -> list[Commit]:
        """Commits reachable from `revision`, newest first."""
        with self._lock:
            repo = self._repo(repo_id)
            commit, out = self._resolve(repo, revision), []
            while commit is not None:
                out.append(commit)
                commit = repo.commits.get(commit.parent) if commit.parent else None
            return out

    def downloads(self, repo_id: str | None = None, method: str = "GET") -> list[str]:
        """Paths of files fetched through /resolve (GET by default; "HEAD" for metadata calls)."""
        return [r.params["path"] for r in list(self.requests) if r.route == "resolve" and r.method == method
                and (repo_id is None or r.params["repo"] == repo_id)]

    def fail(self, route: str, status: int = 500, *, method: str | None = None, times: int | None = None,
             message: str = "Internal Error", kind: str = "answer") -> Fault:
        """Inject a fault on `route` (a name of _ROUTES, e.g. "resolve", "commit"; `method` narrows it): kind
        "answer" replies `status` with `message` instead of handling the request; kind "drop_reply" handles it
        (its effect stays) and closes the connection without a reply. `times` faults, or every request (None)."""
        if kind not in ("answer", "drop_reply"):
            raise ValueError(kind)
        fault = Fault(route, method, status, message, kind, times)
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()

    def _take_fault(self, route: str, method: str) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if f.route == route and f.method in (None, method) and (f.times is None or f.times > 0):
                    if f.times is not None:
                        f.times -= 1
                    f.hits += 1
                    return f
        return None

    def clear_log(self) -> None:
        with self._lock:
            self.requests.clear()

    # ---------------------------------------------------------------- internals shared by both APIs
    def _repo(self, repo_id: str) -> Repo:
        if repo_id not in self.repos:
            raise KeyError(repo_id)
        return self.repos[repo_id]

    def _can_write(self, repo_or_ns, user: str | None) -> bool:
        owner = repo_or_ns.owner if isinstance(repo_or_ns, Repo) else repo_or_ns
        return user is not None and (user == owner or owner in self.orgs.get(user, []))

    def _visible_repo(self, repo_id: str, user: str | None) -> Repo:
        """Private repos don't exist for others: 401 when anonymous, 404 otherwise, both `RepoNotFound`."""
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not self._can_write(repo, user)):
            raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        return repo

    def _writable_repo(self, repo_id: str, user: str | None) -> Repo:
        repo = self._visible_repo(repo_id, user)
        if user is None:
            raise HubError(401, "You must be authenticated to write to a repository")
        if not self._can_write(repo, user):
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _check_gate(self, repo: Repo, user: str | None, path: str) -> None:
        # Real Hub: 401 GatedRepo when anonymous, 403 GatedRepo when logged in but not granted.
        if repo.gated and path not in UNGATED_FILES and not (self._can_write(repo, user) or user in repo.granted):
            msg = f"Access to model {repo.repo_id} is restricted"
            raise HubError(401 if user is None else 403, msg + (". You must be authenticated to access it."
                           if user is None else " and you are not in the authorized list."), "GatedRepo")

    def _resolve(self, repo: Repo, rev: str) -> Commit:
        if rev in repo.commits:
            return repo.commits[rev]
        for ref in (rev, f"refs/heads/{rev}", f"refs/tags/{rev}"):
            if ref in repo.refs:
                return repo.commits[repo.refs[ref]]
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def _branch_ref(self, repo: Repo, rev: str) -> str:
        """Refs a commit can be pushed onto: an existing branch or an existing `refs/pr/N`."""
        for ref in (rev, f"refs/heads/{rev}"):
            if ref in repo.refs and ref.startswith(("refs/heads/", "refs/pr/")):
                return ref
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def _apply(self, repo: Repo, ref: str, base: Commit, ops, title, description, author) -> Commit:
        """Apply ("file"|"lfsFile", path, Blob) / ("deletedFile"|"deletedFolder", path, None) ops on top of `base`."""
        files = dict(base.files)
        for kind, path, blob in ops:
            if kind in ("file", "lfsFile"):
                files[path] = blob
            elif kind == "deletedFile":
                if files.pop(path, None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            else:
                prefix = path.rstrip("/") + "/"
                doomed = [p for p in files if p.startswith(prefix)]
                if not doomed:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for p in doomed:
                    del files[p]
        return self._new_commit(repo, ref, base.oid, files, title, description, author)

    def _new_commit(self, repo, ref, parent, files, title, description, author) -> Commit:
        tree = hashlib.sha1("".join(f"{p}\0{b.oid}\n" for p, b in sorted(files.items())).encode()).hexdigest()
        seed = f"{repo.repo_id}\n{parent}\n{tree}\n{title}\n{description}\n{next(self._counter)}\n{_now()}"
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), parent, files, title,
                        f"{title}\n\n{description}".strip(), author, _now())
        repo.commits[commit.oid] = commit
        repo.refs[ref] = commit.oid
        return commit

    def _last_commit(self, repo: Repo, commit: Commit, path: str) -> dict:
        """Most recent ancestor commit that changed `path` (file or folder): the `lastCommit` of expanded trees."""
        def state(c: Commit):
            return sorted((p, b.oid) for p, b in c.files.items() if p == path or p.startswith(path + "/"))
        while commit.parent and state(repo.commits[commit.parent]) == state(commit):
            commit = repo.commits[commit.parent]
        return {"id": commit.oid, "title": commit.title, "date": commit.date}

    def _tree(self, repo: Repo, commit: Commit, path: str, recursive: bool, expand: bool) -> list[dict]:
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        files, folders = {}, set()
        for p, blob in commit.files.items():
            if not p.startswith(prefix):
                continue
            parts = p[len(prefix):].split("/")
            depth = len(parts) if recursive else 1
            for i in range(1, min(depth, len(parts) - 1) + 1):
                folders.add(prefix + "/".join(parts[:i]))
            if recursive or len(parts) == 1:
                files[p] = blob
        if prefix and not files and not folders:
            raise HubError(404, f"{path} does not exist on {commit.oid}", "EntryNotFound")
        entries = [blob.entry(p) for p, blob in files.items()]
        for d in folders:
            oid = hashlib.sha1(repr(sorted((p, b.oid) for p, b in commit.files.items()
                                           if p.startswith(d + "/"))).encode()).hexdigest()
            entries.append({"type": "directory", "oid": oid, "size": 0, "path": d})
        entries.sort(key=lambda e: (e["type"] != "directory", e["path"]))
        if expand:
            for e in entries:
                e["lastCommit"] = self._last_commit(repo, commit, e["path"])
        return entries

    def _model_info(self, repo: Repo, commit: Commit, blobs: bool) -> dict:
        readme = commit.files.get("README.md")
        card = parse_front_matter(readme.data.decode("utf-8", "replace")) if readme else {}
        siblings = []
        for path, blob in sorted(commit.files.items()):
            sibling = {"rfilename": path}
            if blobs:  # files_metadata=True sends ?blobs=True
                sibling.update(size=len(blob.data), blobId=blob.oid)
                if blob.lfs:
                    sibling["lfs"] = {"sha256": blob.sha256, "size": len(blob.data), "pointerSize": len(blob.pointer)}
            siblings.append(sibling)
        tags = [t for t in (card.get("tags") or []) if isinstance(t, str)] if isinstance(card.get("tags"), list) else []
        tags += [v for v in (card.get("library_name"), card.get("pipeline_tag")) if isinstance(v, str)]
        if isinstance(card.get("license"), str):
            tags.append(f"license:{card['license']}")
        info = {"_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
                "modelId": repo.repo_id, "author": repo.repo_id.split("/")[0], "sha": commit.oid,
                "lastModified": commit.date, "createdAt": repo.created_at, "private": repo.private,
                "gated": repo.gated, "disabled": False, "downloads": 0, "likes": 0, "tags": tags,
                "library_name": card.get("library_name"), "pipeline_tag": card.get("pipeline_tag"),
                "cardData": card or None, "siblings": siblings, "spaces": [],
                "usedStorage": sum(len(b.data) for b in commit.files.values())}
        return {k: v for k, v in info.items() if v is not None}


def start_hub_server(tokens: dict[str, str] | None = None, **kwargs) -> HubServer:
    """Start a HubServer on 127.0.0.1, random port, in a daemon thread. Usable as a context manager."""
    return HubServer(tokens=tokens, **kwargs).start()


def guard_loopback(monkeypatch) -> list:
    """Refuse (and record) every connection off loopback for the rest of a test: Hub tests must stay offline."""
    off_loopback, real_connect = [], socket.socket.connect

    def guarded_connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1"):
            off_loopback.append(address)
            raise OSError(f"network access in an offline test: {address}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    return off_loopback


def configure_hf_client(monkeypatch, endpoint: str, hf_home) -> None:
    """Point `huggingface_hub` (imported already or not) at `endpoint`, with HF_HOME/cache/token under `hf_home`.

    Several settings are read once at import time (huggingface_hub.constants, the module-level `HfApi`), so
    the environment variables alone are not enough once the library is imported: patch the constants too.
    """
    hf_home = str(hf_home)
    for key, value in {"HF_ENDPOINT": endpoint, "HF_HOME": hf_home, "HF_HUB_CACHE": f"{hf_home}/hub",
                       "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}.items():
        monkeypatch.setenv(key, value)
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE_DIR"):
        monkeypatch.delenv(key, raising=False)
    import huggingface_hub.constants as c
    import huggingface_hub.hf_api as hf_api

    template = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    for name, value in {"ENDPOINT": endpoint, "HUGGINGFACE_CO_URL_TEMPLATE": template,
                        "HF_URL_HOSTS": c.HF_URL_HOSTS | {urlsplit(endpoint).hostname},
                        "HF_HUB_DISABLE_XET": True, "HF_HUB_OFFLINE": False, "HF_HUB_DISABLE_TELEMETRY": True,
                        "HF_HOME": hf_home, "HF_HUB_CACHE": f"{hf_home}/hub", "HF_XET_CACHE": f"{hf_home}/xet",
                        "HF_ASSETS_CACHE": f"{hf_home}/assets", "HF_TOKEN_PATH": f"{hf_home}/token",
                        "HF_STORED_TOKENS_PATH": f"{hf_home}/stored_tokens"}.items():
        if hasattr(c, name):
            monkeypatch.setattr(c, name, value)
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)  # module-level HfApi behind `huggingface_hub.model_info` & co


REPO = r"(?P<repo>[^/]+/[^/]+?)"
# Spaces (`hubmix ui --space`) are served like models, in the same name space (a test names them apart)
KIND = r"(?:models|spaces)"
_ROUTES = [(methods.split("|"), re.compile(pattern), name) for methods, pattern, name in [
    ("GET", r"/api/whoami-v2", "whoami"),
    ("GET", r"/api/agent-harnesses", "agent_harnesses"),
    ("GET", r"/api/models", "list_models"),
    ("POST", r"/api/repos/create", "create_repo"),
    ("DELETE", r"/api/repos/delete", "delete_repo"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("GET", rf"/api/{KIND}/{REPO}(?:/revision/(?P<rev>[^/]+))?", "model_info"),
    ("GET", rf"/api/{KIND}/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "tree"),
    ("POST", rf"/api/{KIND}/{REPO}/paths-info/(?P<rev>[^/]+)", "paths_info"),
    ("GET", rf"/api/{KIND}/{REPO}/refs", "refs"),
    ("GET", rf"/api/{KIND}/{REPO}/commits/(?P<rev>[^/]+)", "commits"),
    ("POST|DELETE", rf"/api/{KIND}/{REPO}/branch/(?P<branch>[^/]+)", "branch"),
    ("POST", rf"/api/{KIND}/{REPO}/tag/(?P<rev>[^/]+)", "tag"),
    ("POST", rf"/api/{KIND}/{REPO}/preupload/(?P<rev>[^/]+)", "preupload"),
    ("POST", rf"/api/{KIND}/{REPO}/commit/(?P<rev>[^/]+)", "commit"),
    ("POST", rf"/(?:spaces/)?{REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
    ("PUT", rf"/lfs-upload/{REPO}/(?P<oid>[0-9a-f]{{64}})", "lfs_upload"),
    ("POST", rf"/lfs-verify/{REPO}", "lfs_verify"),
    ("GET|HEAD", rf"/(?:spaces/)?{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
]]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub: every response carries a Content-Length
    server_version = "FakeHub/1.0"
    timeout = 120  # idle keep-alive connections die eventually

    def setup(self) -> None:
        super().setup()
        # Small request/response pairs on keep-alive connections otherwise stall ~40 ms (Nagle + delayed ACK).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    # ---------------------------------------------------------------- plumbing
    def _dispatch(self) -> None:
        hub: HubServer = self.server.hub
        url = urlsplit(self.path)
        self.query = parse_qs(url.query, keep_blank_values=True)
        self.body = self._read_body()
        self.record = RecordedRequest(self.command, url.path, self.query,
                                      {k.lower(): v for k, v in self.headers.items()}, self.body)
        with hub._lock:
            hub.requests.append(self.record)
        try:
            for methods, regex, name in _ROUTES:
                if (match := regex.fullmatch(url.path)) and self.command in methods:
                    break
            else:
                raise HubError(404, f"No route for {self.command} {url.path}")
            # Revisions and tree paths arrive percent-encoded (`refs%2Fpr%2F1`): decode each route param.
            params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
            self.record.route, self.record.params = name, params
            self.user = self._authenticate(hub)
            fault = hub._take_fault(name, self.command)
            if fault is not None and fault.kind == "answer":
                raise HubError(fault.status, fault.message)
            with hub._lock:
                getattr(self, f"h_{name}")(hub, **params)
            if fault is not None:  # "drop_reply": the request took effect, its reply is lost on the way
                self.record.status = None
                self.close_connection = True
                return
        except HubError as e:
            headers = {"X-Error-Message": e.message.encode("ascii", "replace").decode(), **e.headers}
            if e.code:
                headers["X-Error-Code"] = e.code
            self._json({"error": e.message, **e.extra}, e.status, headers)
        except Exception:
            hub.errors.append(traceback.format_exc())  # a bug in this file: surface it, tests should check
            self._json({"error": "fake hub crashed:\n" + hub.errors[-1]}, 500)
        stream, self._stream = getattr(self, "_stream", None), None
        stream() if stream and self._response[0] == 200 else self._flush()  # streams (SSE) run unlocked

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():  # streamed uploads (file objects)
            chunks = []
            while (size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _authenticate(self, hub: HubServer) -> str | None:
        header = self.headers.get("Authorization")
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        user = hub.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:  # exact message the client special-cases (not mapped to RepositoryNotFoundError)
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _send(self, status: int, body: bytes = b"", headers=None, content_type="application/octet-stream") -> None:
        # Buffered: written by `_flush` once the state lock is released.
        self._response = (status, body, {"Content-Type": content_type, **(headers or {})})

    def _flush(self) -> None:
        status, body, headers = self._response
        self.record.status = status
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))  # HEAD: length the GET would have
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, status: int = 200, headers=None, content_type="application/json") -> None:
        self._send(status, json.dumps(obj, default=str).encode(), headers, content_type)

    def _payload(self) -> dict:
        try:
            return json.loads(self.body or b"{}")
        except ValueError:
            raise HubError(400, "Invalid JSON body")

    def _flag(self, name: str) -> bool:
        return self.query.get(name, [""])[-1].lower() in ("1", "true")

    # ---------------------------------------------------------------- account & repos
    def h_whoami(self, hub: HubServer) -> None:
        if self.user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        self._json({"type": "user", "id": hashlib.md5(self.user.encode()).hexdigest()[:24], "name": self.user,
                    "fullname": self.user, "avatarUrl": f"/avatars/{self.user}.svg",
                    "email": f"{self.user}@example.com", "emailVerified": True,
                    "isPro": False, "orgs": [{"type": "org", "name": o, "roleInOrg": "write"}
                                             for o in hub.orgs.get(self.user, [])],
                    "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}})

    def h_agent_harnesses(self, hub: HubServer) -> None:
        self._json({"standardEnvVars": [], "harnesses": {}})  # fetched for the user-agent unless telemetry is off

    def h_create_repo(self, hub: HubServer) -> None:
        p = self._payload()  # {"name", "organization", "visibility": "private"|"public" (or legacy "private": bool)}
        if p.get("type", "model") not in ("model", "space"):
            raise HubError(400, "The fake hub only serves model repos and Spaces")
        if self.user is None:
            raise HubError(401, "You must be authenticated to create a repo")
        namespace = p.get("organization") or self.user
        if not hub._can_write(namespace, self.user):
            raise HubError(403, f'You don\'t have the rights to create a model under the namespace "{namespace}"')
        repo_id = f"{namespace}/{p['name']}"
        url = f"{hub.url}/{repo_id}"
        if repo_id in hub.repos:  # create_repo(exist_ok=True) reads `url` from this 409 body
            raise HubError(409, "You already created this model repo", extra={"url": url})
        private = p.get("visibility") == "private" or bool(p.get("private"))
        hub.create_repo(repo_id, private=private, owner=namespace)
        self._json({"url": url, "name": repo_id, "id": repo_id})

    def h_delete_repo(self, hub: HubServer) -> None:
        p = self._payload()
        repo = hub._writable_repo(f"{p.get('organization') or self.user}/{p.get('name')}", self.user)
        del hub.repos[repo.repo_id]
        self._json({})

    def h_validate_yaml(self, hub: HubServer) -> None:
        self._json({"errors": [], "warnings": []})  # create_commit posts README.md here before committing

    def h_list_models(self, hub: HubServer) -> None:
        """GET /api/models (HfApi.list_models) as the Hub answers it: the short entry per repo (no siblings unless
        asked), `search` a case-insensitive part of the id, every `filter` a tag (library, pipeline, card tags),
        `author`, `pipeline_tag`, `sort` descending, `limit`, cursor pages through a Link header."""
        q = self.query
        search, filters = q.get("search", [""])[-1].lower(), q.get("filter", [])
        found = []
        for repo in hub.repos.values():
            if repo.private and not hub._can_write(repo, self.user):
                continue
            info = hub._model_info(repo, hub._resolve(repo, DEFAULT_BRANCH), blobs=False)
            if (search in repo.repo_id.lower() and all(f in info["tags"] for f in filters)
                    and q.get("author", [repo.owner])[-1] == repo.owner
                    and q.get("pipeline_tag", [info.get("pipeline_tag")])[-1] == info.get("pipeline_tag")):
                found.append(info)
        key = q.get("sort", [""])[-1]
        found.sort(key=lambda i: i["id"])
        if key:
            found.sort(key=lambda i: i.get(key) or 0, reverse=True)
        short = ("_id", "id", "likes", "private", "downloads", "tags", "pipeline_tag", "library_name", "createdAt",
                 "modelId")
        entries = [{k: i[k] for k in short if k in i} | {"trendingScore": 0} for i in found]
        size = min(int(q.get("limit", ["1000"])[-1]), 1000)
        start = int(q.get("cursor", ["0"])[-1])
        headers = {}
        if start + size < len(entries):
            query = urlencode(self.query | {"cursor": [start + size]}, doseq=True)
            headers["Link"] = f'<{hub.url}{self.record.path}?{query}>; rel="next"'
        self._json(entries[start:start + size], headers=headers)

    def h_model_info(self, hub: HubServer, repo: str, rev: str = DEFAULT_BRANCH) -> None:
        r = hub._visible_repo(repo, self.user)
        info = hub._model_info(r, hub._resolve(r, rev), blobs=self._flag("blobs"))
        if expand := self.query.get("expand") or self.query.get("expand[]"):
            info = {k: v for k, v in info.items() if k in expand or k in ("_id", "id")}
        self._json(info)

    def h_tree(self, hub: HubServer, repo: str, rev: str, path: str = "") -> None:
        r = hub._visible_repo(repo, self.user)
        entries = hub._tree(r, hub._resolve(r, rev), path, self._flag("recursive"), self._flag("expand"))
        # Cursor pagination through a `Link: <...>; rel="next"` header, like the Hub (1000 entries per page).
        start = int(self.query.get("cursor", ["0"])[-1])
        page, headers = entries[start:start + hub.tree_page_size], {}
        if start + hub.tree_page_size < len(entries):
            query = {k: v[-1] for k, v in self.query.items()} | {"cursor": start + hub.tree_page_size}
            headers["Link"] = f'<{hub.url}{self.record.path}?{urlencode(query)}>; rel="next"'
        self._json(page, headers=headers)

    def h_paths_info(self, hub: HubServer, repo: str, rev: str) -> None:
        r = hub._visible_repo(repo, self.user)
        commit = hub._resolve(r, rev)
        form = parse_qs(self.body.decode(), keep_blank_values=True)  # urlencoded form: paths=a&paths=b&expand=...
        expand, out = form.get("expand", [""])[-1].lower() in ("1", "true"), []
        for path in form.get("paths", []):
            path = path.strip("/")
            if path in commit.files:
                out.append(commit.files[path].entry(path))
            elif any(p.startswith(path + "/") for p in commit.files):
                out.append({"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0,
                            "path": path})
            else:
                continue
            if expand:
                out[-1]["lastCommit"] = hub._last_commit(r, commit, path)
        self._json(out)

    def h_refs(self, hub: HubServer, repo: str) -> None:
        r = hub._visible_repo(repo, self.user)
        out = {"branches": [], "converts": [], "tags": [], "pullRequests": []}
        for ref, sha in sorted(r.refs.items()):
            kind = {"heads": "branches", "tags": "tags", "pr": "pullRequests"}[ref.split("/")[1]]
            name = ref if kind == "pullRequests" else ref.split("/", 2)[2]
            out[kind].append({"name": name, "ref": ref, "targetCommit": sha})
        if not self._flag("include_prs"):
            del out["pullRequests"]
        self._json(out)

    def h_commits(self, hub: HubServer, repo: str, rev: str) -> None:
        r = hub._visible_repo(repo, self.user)
        hub._resolve(r, rev)
        self._json([{"id": c.oid, "title": c.title, "message": c.message, "authors": [{"user": c.author}],
                     "date": c.date} for c in hub.history(repo, rev)])

    def h_branch(self, hub: HubServer, repo: str, branch: str) -> None:
        r = hub._writable_repo(repo, self.user)
        ref = f"refs/heads/{branch}"
        if self.command == "DELETE":
            if ref not in r.refs or branch == DEFAULT_BRANCH:
                raise HubError(404 if ref not in r.refs else 403, f"Cannot delete branch {branch}")
            del r.refs[ref]
        elif ref in r.refs:
            raise HubError(409, "Reference already exists")
        else:
            r.refs[ref] = hub._resolve(r, self._payload().get("startingPoint") or DEFAULT_BRANCH).oid
        self._json({})

    def h_tag(self, hub: HubServer, repo: str, rev: str) -> None:
        r = hub._writable_repo(repo, self.user)
        ref = f"refs/tags/{self._payload()['tag']}"
        if ref in r.refs:
            raise HubError(409, "Tag already exists")
        r.refs[ref] = hub._resolve(r, rev).oid
        self._json({})

    # ---------------------------------------------------------------- upload: preupload -> LFS batch/PUT -> commit
    def h_preupload(self, hub: HubServer, repo: str, rev: str) -> None:
        r = hub._writable_repo(repo, self.user)
        commit = hub._resolve(r, rev)
        out = []
        for f in self._payload()["files"]:
            lfs = should_use_lfs(f["path"], f["size"], base64.b64decode(f.get("sample", "")))
            entry = {"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
            # `oid` of the current remote file lets the client drop unchanged files from the commit:
            # sha256 for LFS files, git sha1 for regular ones (see CommitOperationAdd._local_oid).
            if (old := commit.files.get(f["path"])) is not None and old.lfs == lfs:
                entry["oid"] = old.sha256 if lfs else old.oid
            out.append(entry)
        self._json({"files": out, "commitOid": commit.oid})

    def h_lfs_batch(self, hub: HubServer, repo: str) -> None:
        r = hub._writable_repo(repo, self.user)
        p = self._payload()
        if p.get("operation") != "upload":
            raise HubError(422, "The fake hub only implements LFS uploads")
        objects = []
        for obj in p.get("objects", []):
            out = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in r.lfs:  # no `actions` = already stored, the client skips the upload
                # No `header.chunk_size` => the client uses the single-PUT "basic" transfer.
                out["actions"] = {"upload": {"href": f"{hub.url}/lfs-upload/{repo}/{obj['oid']}?size={obj['size']}"},
                                  "verify": {"href": f"{hub.url}/lfs-verify/{repo}"}}
            objects.append(out)
        self._json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                   content_type="application/vnd.git-lfs+json")

    def h_lfs_upload(self, hub: HubServer, repo: str, oid: str) -> None:
        # Stands for the pre-signed S3 URL: no auth header is sent; integrity is checked against the oid.
        if repo not in hub.repos:
            raise HubError(404, "Unknown upload URL")
        if hashlib.sha256(self.body).hexdigest() != oid:
            raise HubError(400, f"sha256 of the uploaded bytes does not match oid {oid}")
        if self.query.get("size") and int(self.query["size"][-1]) != len(self.body):
            raise HubError(400, "Size of the uploaded bytes does not match")
        hub.repos[repo].lfs[oid] = self.body
        self._send(200, headers={"ETag": f'"{oid}"'})

    def h_lfs_verify(self, hub: HubServer, repo: str) -> None:
        r = hub._writable_repo(repo, self.user)
        p = self._payload()
        if len(r.lfs.get(p.get("oid"), b"")) != p.get("size") or p.get("oid") not in r.lfs:
            raise HubError(404, f"LFS object {p.get('oid')} not found")
        self._json({})

    def h_commit(self, hub: HubServer, repo: str, rev: str) -> None:
        r = hub._writable_repo(repo, self.user)
        header, ops = {}, []
        for line in self.body.splitlines():  # NDJSON: {"key": "header"|"file"|"lfsFile"|..., "value": {...}}
            if not line.strip():
                continue
            item = json.loads(line)
            key, v = item["key"], item["value"]
            if key == "header":
                header = v
            elif key == "file":
                content = v["content"]
                data = base64.b64decode(content) if v.get("encoding") == "base64" else content.encode()
                ops.append(("file", v["path"], Blob(data, False)))
            elif key == "lfsFile":
                if v["oid"] not in r.lfs:
                    raise HubError(400, f"LFS object {v['oid']} for {v['path']} was never uploaded")
                ops.append(("lfsFile", v["path"], Blob(r.lfs[v["oid"]], True)))
            elif key in ("deletedFile", "deletedFolder"):
                ops.append((key, v["path"], None))
            else:
                raise HubError(400, f"Unknown commit operation {key}")
        create_pr = self._flag("create_pr")
        if create_pr:  # a PR is a new ref refs/pr/N forked from `rev`
            base, ref = hub._resolve(r, rev), f"refs/pr/{r.next_pr}"
        else:  # commits only go onto branches (or open PRs); a missing branch is RevisionNotFound
            ref = hub._branch_ref(r, rev)
            base = r.commits[r.refs[ref]]
        if header.get("parentCommit") and header["parentCommit"] != base.oid:
            raise HubError(412, f"Parent commit {header['parentCommit']} is not the head of {rev} ({base.oid})")
        commit = hub._apply(r, ref, base, ops, header.get("summary") or "Update", header.get("description", ""),
                            self.user)
        out = {"success": True, "commitOid": commit.oid, "commitUrl": f"{hub.url}/{repo}/commit/{commit.oid}"}
        if create_pr:
            # The client derives pr_revision "refs/pr/N" from the trailing number of this URL.
            out["pullRequestUrl"] = f"{hub.url}/{repo}/discussions/{r.next_pr}"
            r.next_pr += 1
        self._json(out)

    # ---------------------------------------------------------------- download
    def h_resolve(self, hub: HubServer, repo: str, rev: str, path: str) -> None:
        r = hub._visible_repo(repo, self.user)
        hub._check_gate(r, self.user, path)
        commit = hub._resolve(r, rev)
        blob = commit.files.get(path)
        if blob is None:  # X-Repo-Commit lets the client cache the non-existence (.no_exist/<sha>/<path>)
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        # The client keys its cache on X-Linked-Etag (LFS) or ETag, both normalised by stripping quotes / W/.
        etag = f'"{blob.sha256 if blob.lfs else blob.oid}"'
        size = len(blob.data)
        headers = {"X-Repo-Commit": commit.oid, "ETag": etag, "Accept-Ranges": "bytes"}
        if blob.lfs:  # the real Hub 302s LFS files to a CDN; we serve them in place with the same metadata
            headers.update({"X-Linked-Etag": etag, "X-Linked-Size": str(size)})
        data, status = blob.data, 200
        if rng := self.headers.get("Range"):  # used by the client to resume an interrupted download
            m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", rng)
            start, end = (m.group(1), m.group(2)) if m else ("", "")
            start, end = (int(start), int(end or size - 1)) if start else (max(size - int(end or 0), 0), size - 1)
            if not m or start >= size or start > end:
                raise HubError(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
            end = min(end, size - 1)
            data, status = blob.data[start:end + 1], 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        self._send(status, data, headers)
