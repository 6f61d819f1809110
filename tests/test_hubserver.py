"""The fake Hub in tests/hubserver.py, driven by the real huggingface_hub client (no network)."""

import hashlib
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

if str(Path(__file__).parent) not in sys.path:  # normally done by pytest / the root conftest
    sys.path.insert(0, str(Path(__file__).parent))
from hubserver import configure_hf_client, guard_loopback, start_hub_server  # noqa: E402

import huggingface_hub  # noqa: E402
from huggingface_hub import (  # noqa: E402
    CommitOperationAdd,
    HfApi,
    ModelCard,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (  # noqa: E402
    BadRequestError,
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

TOKEN = "hf_test_token_user"
OTHER = "hf_other"
BIG = 11 * 1024 * 1024  # above the 10 MiB regular-file limit
urlopen = urllib.request.build_opener(urllib.request.ProxyHandler({})).open  # raw HTTP, never through a proxy


@pytest.fixture
def hub(monkeypatch, tmp_path):
    off_loopback = guard_loopback(monkeypatch)
    server = start_hub_server(tokens={TOKEN: "user", OTHER: "other"}, orgs={"user": ["org"]})
    configure_hf_client(monkeypatch, server.url, tmp_path / "hf_home")
    yield server
    server.stop()
    assert server.errors == []
    assert off_loopback == []


@pytest.fixture
def api(hub):
    return HfApi(endpoint=hub.url, token=TOKEN)


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def _seed(hub, repo_id="user/model", **kwargs):
    hub.create_repo(repo_id, **kwargs)
    return hub.commit(repo_id, {"config.json": b'{"v": 1}', "unet/model.safetensors": b"weights-v1"}, message="v1")


def test_whoami(api, hub):
    assert api.whoami()["name"] == "user"
    assert api.whoami(token=OTHER)["name"] == "other"
    with pytest.raises(HfHubHTTPError) as err:
        api.whoami(token="hf_invalid")
    assert err.value.response.status_code == 401


def test_create_repo_public_private_and_exist_ok(api, hub):
    url = api.create_repo("model")  # namespace defaults to the token's user
    assert url.repo_id == "user/model" and url.endpoint == hub.url
    assert api.create_repo("user/model", exist_ok=True).repo_id == "user/model"
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo("user/model")
    assert err.value.response.status_code == 409
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo("someone-else/model")
    assert err.value.response.status_code == 403
    assert api.create_repo("org/shared").repo_id == "org/shared"  # member of org

    api.create_repo("user/secret", private=True)
    assert api.model_info("user/secret").private is True
    for token in (OTHER, False):
        with pytest.raises(RepositoryNotFoundError):
            api.model_info("user/secret", token=token)
    assert api.repo_exists("user/secret") and not api.repo_exists("user/secret", token=OTHER)
    # A fresh repo has a main branch holding .gitattributes, as on the Hub.
    assert list(hub.files("user/model")) == [".gitattributes"]


def test_upload_folder_mixed_regular_and_lfs_in_one_commit(api, hub, tmp_path, cache):
    api.create_repo("user/model")
    folder = tmp_path / "folder"
    (folder / "unet").mkdir(parents=True)
    files = {
        "config.json": b'{"merge": "weighted"}',
        "README.md": b"---\nlicense: mit\n---\n# merged\n",
        "unet/diffusion_pytorch_model.safetensors": os.urandom(4096),
        "big.txt": b"x" * BIG,
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    hub.clear_log()

    info = api.upload_folder(repo_id="user/model", folder_path=folder, commit_message="Upload merge")

    commits = [r for r in hub.requests if r.route == "commit"]
    assert len(commits) == 1
    lines = [json.loads(line) for line in commits[0].body.splitlines()]
    assert lines[0] == {"key": "header", "value": {"summary": "Upload merge", "description": ""}}
    by_kind = {}
    for line in lines[1:]:
        by_kind.setdefault(line["key"], set()).add(line["value"]["path"])
    assert by_kind == {"file": {"config.json", "README.md"},
                       "lfsFile": {"unet/diffusion_pytorch_model.safetensors", "big.txt"}}
    uploads = [r for r in hub.requests if r.route == "lfs_upload"]
    assert sorted(r.params["oid"] for r in uploads) == sorted(
        hashlib.sha256(files[p]).hexdigest() for p in ("unet/diffusion_pytorch_model.safetensors", "big.txt"))
    # The upload URL stands for a pre-signed S3 URL: no credentials go there, and none end up in any content.
    assert all("authorization" not in r.headers for r in uploads)
    assert all(TOKEN.encode() not in r.body for r in hub.requests)

    assert info.oid == hub.resolve("user/model") and len(hub.history("user/model")) == 2
    assert {p: d for p, d in hub.files("user/model").items() if p != ".gitattributes"} == files
    blobs = hub.blobs("user/model")
    assert blobs["big.txt"].lfs and blobs["unet/diffusion_pytorch_model.safetensors"].lfs
    assert not blobs["config.json"].lfs

    path = hf_hub_download("user/model", "big.txt", cache_dir=cache)
    assert Path(path).read_bytes() == files["big.txt"]
    assert Path(path).resolve().name == hashlib.sha256(files["big.txt"]).hexdigest()  # blob named by X-Linked-Etag

    # Re-uploading identical content is a no-op: preupload reports remote oids, the client skips the commit.
    hub.clear_log()
    api.upload_folder(repo_id="user/model", folder_path=folder)
    assert len(hub.history("user/model")) == 2
    assert not [r for r in hub.requests if r.route in ("commit", "lfs_upload")]


def test_download_at_main_old_commit_and_branch(api, hub, cache):
    v1 = _seed(hub)
    v2 = hub.commit("user/model", {"config.json": b'{"v": 2}'}, message="v2")
    hub.commit("user/model", {"config.json": b'{"v": "dev"}'}, branch="dev")  # forks main
    assert v1 != v2 and len(v1) == 40 and hub.resolve("user/model", "main") == v2

    def read(revision):
        return Path(hf_hub_download("user/model", "config.json", revision=revision, cache_dir=cache)).read_bytes()

    assert read(None) == b'{"v": 2}'
    assert read(v1) == b'{"v": 1}'
    assert read("dev") == b'{"v": "dev"}'
    heads = [r for r in hub.requests if r.route == "resolve" and r.method == "HEAD"]
    assert [r.params["rev"] for r in heads] == ["main", v1, "dev"]
    snapshots = cache / "models--user--model" / "snapshots"
    assert sorted(p.name for p in snapshots.iterdir()) == sorted({v1, v2, hub.resolve("user/model", "dev")})
    assert (cache / "models--user--model" / "refs" / "main").read_text() == v2


def test_snapshot_download_allow_patterns(api, hub, cache):
    _seed(hub)
    hub.commit("user/model", {"text_encoder/config.json": b"{}", "vae/model.safetensors": b"vae"})
    hub.clear_log()
    folder = snapshot_download("user/model", cache_dir=cache, allow_patterns=["*.json"])
    assert sorted(hub.downloads("user/model")) == ["config.json", "text_encoder/config.json"]
    assert sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file()) == [
        "config.json", "text_encoder/config.json"]
    assert Path(folder).name == hub.resolve("user/model")

    full = snapshot_download("user/model", cache_dir=cache)
    assert (Path(full) / "vae" / "model.safetensors").read_bytes() == b"vae"


def test_model_info_files_metadata_and_card(api, hub):
    _seed(hub)
    card = b"---\nlicense: openrail\nlibrary_name: diffusers\ntags:\n- merge\nbase_model: a/b\n---\n# Card\n"
    sha = hub.commit("user/model", {"README.md": card})

    info = api.model_info("user/model", files_metadata=True)
    assert info.id == "user/model" and info.sha == sha and info.private is False and info.gated is False
    siblings = {s.rfilename: s for s in info.siblings}
    weights = siblings["unet/model.safetensors"]
    assert weights.lfs.sha256 == hashlib.sha256(b"weights-v1").hexdigest() and weights.size == 10
    assert siblings["config.json"].lfs is None and siblings["config.json"].blob_id
    assert info.card_data.license == "openrail" and info.card_data.base_model == "a/b"
    assert "merge" in info.tags and info.library_name == "diffusers" and info.last_modified is not None

    assert api.model_info("user/model", revision=hub.history("user/model")[1].oid).card_data is None
    assert api.model_info("user/model").siblings[0].size is None  # metadata only when asked for
    assert ModelCard.load("user/model").data.license == "openrail"  # goes through HF_ENDPOINT (patched)
    assert huggingface_hub.model_info("user/model").sha == sha  # module-level HfApi


def test_list_repo_tree_refs_and_commits(api, hub):
    hub.create_repo("user/model", gitattributes=False)
    hub.commit("user/model", {"a.txt": b"a", "unet/config.json": b"{}", "unet/w.safetensors": b"w"}, message="one")
    hub.commit("user/model", {"a.txt": b"b"}, message="two")
    hub.tag("user/model", "v1")

    top = {e.path: e for e in api.list_repo_tree("user/model")}
    assert set(top) == {"a.txt", "unet"} and type(top["unet"]).__name__ == "RepoFolder"
    deep = {e.path: e for e in api.list_repo_tree("user/model", recursive=True, expand=True)}
    assert set(deep) == {"a.txt", "unet", "unet/config.json", "unet/w.safetensors"}
    assert deep["unet/w.safetensors"].lfs.sha256 == hashlib.sha256(b"w").hexdigest()
    assert deep["a.txt"].last_commit.title == "two" and deep["unet"].last_commit.title == "one"
    assert [e.path for e in api.list_repo_tree("user/model", path_in_repo="unet")] == [
        "unet/config.json", "unet/w.safetensors"]
    assert api.list_repo_files("user/model", revision="v1") == ["a.txt", "unet/config.json", "unet/w.safetensors"]
    with pytest.raises(RemoteEntryNotFoundError):
        list(api.list_repo_tree("user/model", path_in_repo="nope"))

    hub.tree_page_size = 1  # Link-header pagination is followed by the client
    assert len(list(api.list_repo_tree("user/model", recursive=True))) == 4

    refs = api.list_repo_refs("user/model")
    assert [b.name for b in refs.branches] == ["main"] and [t.name for t in refs.tags] == ["v1"]
    assert [c.title for c in api.list_repo_commits("user/model")] == ["two", "one", "initial commit"]
    paths = api.get_paths_info("user/model", ["a.txt", "unet", "missing"])
    assert [p.path for p in paths] == ["a.txt", "unet"]


def test_create_commit_with_pr(api, hub, cache):
    _seed(hub)
    main = hub.resolve("user/model")
    info = api.create_commit("user/model", operations=[CommitOperationAdd("proposal.json", b'{"p": 1}')],
                             commit_message="Proposal", create_pr=True)
    assert info.pr_url == f"{hub.url}/user/model/discussions/1"
    assert info.pr_revision == "refs/pr/1" and info.pr_num == 1
    assert hub.resolve("user/model") == main  # main untouched
    assert hub.resolve("user/model", "refs/pr/1") == info.oid

    path = hf_hub_download("user/model", "proposal.json", revision="refs/pr/1", cache_dir=cache)
    assert Path(path).read_bytes() == b'{"p": 1}'
    assert any(r.path.endswith("/resolve/refs%2Fpr%2F1/proposal.json") for r in hub.requests)

    # Pushing onto an open PR, and a second PR.
    api.upload_file(path_or_fileobj=b"more", path_in_repo="more.txt", repo_id="user/model", revision="refs/pr/1")
    assert "more.txt" in hub.files("user/model", "refs/pr/1")
    second = api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="user/model", create_pr=True)
    assert second.pr_revision == "refs/pr/2"
    prs = api.list_repo_refs("user/model", include_pull_requests=True).pull_requests
    assert [p.ref for p in prs] == ["refs/pr/1", "refs/pr/2"]


def test_commit_to_branch(api, hub, cache):
    _seed(hub)
    with pytest.raises(RevisionNotFoundError):  # branches must exist first
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="user/model", revision="dev")
    api.create_branch("user/model", branch="dev")
    api.create_branch("user/model", branch="dev", exist_ok=True)
    with pytest.raises(HfHubHTTPError):
        api.create_branch("user/model", branch="dev")
    info = api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="user/model", revision="dev")
    assert hub.resolve("user/model", "dev") == info.oid
    assert "x.txt" not in hub.files("user/model") and hub.files("user/model", "dev")["x.txt"] == b"x"
    assert Path(hf_hub_download("user/model", "x.txt", revision="dev", cache_dir=cache)).read_bytes() == b"x"

    api.delete_file("x.txt", "user/model", revision="dev")
    api.delete_folder("unet", "user/model", revision="dev")
    assert set(hub.files("user/model", "dev")) == {".gitattributes", "config.json"}
    with pytest.raises(EntryNotFoundError):
        api.delete_file("x.txt", "user/model", revision="dev")
    with pytest.raises(HfHubHTTPError) as err:  # stale parent_commit
        api.upload_file(path_or_fileobj=b"y", path_in_repo="y.txt", repo_id="user/model",
                        parent_commit=hub.history("user/model")[-1].oid)
    assert err.value.response.status_code == 412
    with pytest.raises(HfHubHTTPError) as err:  # no write access
        api.upload_file(path_or_fileobj=b"y", path_in_repo="y.txt", repo_id="user/model", token=OTHER)
    assert err.value.response.status_code == 403


def test_client_errors(api, hub, cache):
    _seed(hub)
    hub.create_repo("user/gated", gated=True)
    hub.commit("user/gated", {"config.json": b"{}", "README.md": b"---\nlicense: other\n---\n"})
    hub.create_repo("user/private", private=True)

    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("user/missing", "config.json", cache_dir=cache)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("user/private", ".gitattributes", cache_dir=cache, token=OTHER)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("user/missing")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("user/model", "config.json", revision="nope", cache_dir=cache)
    with pytest.raises(RevisionNotFoundError):
        api.model_info("user/model", revision="nope")
    with pytest.raises(RemoteEntryNotFoundError) as err:
        hf_hub_download("user/model", "missing.json", cache_dir=cache)
    assert isinstance(err.value, EntryNotFoundError)
    with pytest.raises(GatedRepoError) as err:
        hf_hub_download("user/gated", "config.json", cache_dir=cache, token=False)
    assert err.value.response.status_code == 401 and err.value.response.headers["X-Error-Code"] == "GatedRepo"
    with pytest.raises(GatedRepoError) as err:
        hf_hub_download("user/gated", "config.json", cache_dir=cache, token=OTHER)
    assert err.value.response.status_code == 403
    assert not api.file_exists("user/model", "missing.json")

    # Gate: metadata and the card stay public; the owner and granted users get the files.
    assert api.model_info("user/gated", token=False).gated == "auto"
    assert ModelCard.load("user/gated", token=False).data.license == "other"
    assert hf_hub_download("user/gated", "config.json", cache_dir=cache / "owner", token=TOKEN)
    hub.grant("user/gated", "other")
    assert hf_hub_download("user/gated", "config.json", cache_dir=cache / "other", token=OTHER)

    with pytest.raises(BadRequestError):  # lfsFile pointing at an object never uploaded
        api.create_commit("user/model", operations=[_fake_lfs_add()], commit_message="broken")


def _fake_lfs_add():
    op = CommitOperationAdd("ghost.safetensors", b"never uploaded")
    op._upload_mode, op._is_uploaded = "lfs", True  # pretend preupload already ran
    return op


def test_offline_mode_serves_from_cache(api, hub, cache, monkeypatch):
    _seed(hub)
    online = hf_hub_download("user/model", "config.json", cache_dir=cache)
    snapshot = snapshot_download("user/model", cache_dir=cache)
    hub.clear_log()

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert hf_hub_download("user/model", "config.json", cache_dir=cache) == online
    assert snapshot_download("user/model", cache_dir=cache) == snapshot
    with pytest.raises(LocalEntryNotFoundError):
        hf_hub_download("user/model", "not-cached.json", cache_dir=cache)
    assert hub.requests == []


def test_lfs_endpoint_integrity_and_range_requests(api, hub):
    _seed(hub)
    oid = hashlib.sha256(b"payload").hexdigest()
    bad = urllib.request.Request(f"{hub.url}/lfs-upload/user/model/{oid}", data=b"tampered", method="PUT")
    with pytest.raises(urllib.error.HTTPError) as err:
        urlopen(bad)
    assert err.value.code == 400

    url = f"{hub.url}/user/model/resolve/main/unet/model.safetensors"
    with urlopen(urllib.request.Request(url, headers={"Range": "bytes=2-4"})) as resp:
        assert resp.status == 206 and resp.read() == b"igh"
        assert resp.headers["Content-Range"] == "bytes 2-4/10"
        assert resp.headers["X-Linked-Etag"] == f'"{hashlib.sha256(b"weights-v1").hexdigest()}"'
        assert resp.headers["X-Repo-Commit"] == hub.resolve("user/model")
    with urlopen(f"{hub.url}/user/model/resolve/main/config.json") as resp:
        assert resp.headers["ETag"] == f'"{hub.blobs("user/model")["config.json"].oid}"'
        assert "X-Linked-Etag" not in resp.headers
