"""What a remote job installs (hubmix/hub/install.py, hubmix/hub/wheel.py): a reproducible wheel of the running
hubmix uploaded once to the user's private repo and mounted at its commit, or `hubmix==V` from the index hubmix came
from; both checked before a job starts. The jobs run in the image of tests/jobimage.py, whose pip is real pip with
a PyPI that has no hubmix. Fixtures from tests/test_jobs.py (the loopback Hub with jobs)."""

from __future__ import annotations

import base64
import hashlib
import http.server
import io
import os
import shutil
import threading

import zipfile
from importlib.metadata import PathDistribution
from pathlib import Path

import jobimage
import pytest
from conftest import assert_one_line_error
from test_jobs import _creates, hub, seeded  # noqa: F401 - the fixtures

from hubmix.hub import install
from hubmix.hub.wheel import build as build_wheel, package_dir

ROOT = Path(__file__).resolve().parents[1]


def _wheel_commits(hub) -> list:
    return [r for r in hub.requests if r.route == "commit" and "hubmix-wheels" in r.path]


def test_wheel_is_byte_identical_and_what_pip_reads(tmp_path):
    a, b = build_wheel(), build_wheel()
    assert a.data == b.data and a.sha256 == hashlib.sha256(a.data).hexdigest() and a.sha256 in a.name
    from pip._vendor.packaging.utils import parse_wheel_filename  # pip's own parser of the name

    name, version, build, tags = parse_wheel_filename(a.name)
    assert (str(name), str(version), build[0]) == ("hubmix", a.version, 0) and {str(t) for t in tags} == {"py3-none-any"}
    # a copy with other mtimes and stray caches gives the same bytes; a changed file another wheel
    copy = tmp_path / "src" / "hubmix"
    shutil.copytree(package_dir(), copy, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy.parent / "pyproject.toml")
    for p in copy.rglob("*"):
        os.utime(p, (1_700_000_000, 1_700_000_000))
    (copy / "__pycache__").mkdir(exist_ok=True)
    (copy / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"junk")
    assert build_wheel(copy).data == a.data
    (copy / "errors.py").write_text((copy / "errors.py").read_text() + "\n# changed\n")
    assert build_wheel(copy).sha256 != a.sha256
    # every file's RECORD line, hashed independently; the metadata is pyproject's
    z = zipfile.ZipFile(io.BytesIO(a.data))
    record = z.read(f"hubmix-{a.version}.dist-info/RECORD").decode().splitlines()
    for line in record:
        path, digest, size = line.rsplit(",", 2)
        if path.endswith("RECORD"):
            continue
        data = z.read(path)
        assert digest == "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        assert int(size) == len(data)
    assert sorted(line.split(",")[0] for line in record) == sorted(z.namelist())
    assert {n for n in z.namelist() if n.startswith("hubmix/")} == {
        f"hubmix/{p.relative_to(package_dir()).as_posix()}" for p in package_dir().rglob("*")
        if p.is_file() and "__pycache__" not in p.parts}
    project = pytest.importorskip("tomllib").loads((ROOT / "pyproject.toml").read_text())["project"]
    meta = z.read(f"hubmix-{a.version}.dist-info/METADATA").decode().splitlines()
    assert [m.split(": ", 1)[1] for m in meta if m.startswith("Requires-Dist") and "extra ==" not in m] == \
        project["dependencies"]
    assert {i.date_time for i in z.infolist()} == {(1980, 1, 1, 0, 0, 0)}


def test_second_remote_merge_reuses_the_uploaded_wheel(hub, cli):
    hub.repos.pop("user/hubmix-wheels", None)
    args = ["merge", "org/a", "org/b@v1", "--method", "weighted_sum", "--push", "user/reuse", "--remote", "--detach"]
    code, _, err = cli(*args)
    assert code == 0, err
    assert len(_wheel_commits(hub)) == 1 and "uploading hubmix 0.1.0 wheel" in err
    hub.clear_log()
    code, _, err = cli(*args, "--alpha", "0.3")
    assert code == 0, err
    assert _wheel_commits(hub) == [] and "already in user/hubmix-wheels" in err
    hub.runner.wait()
    commit = hub.resolve("user/hubmix-wheels")
    jobs = [j for j in hub.runner.jobs.values() if j.spec["labels"].get("hubmix-repo") == "user--reuse"]
    assert len(jobs) == 2 and all(j.stage == "COMPLETED" for j in jobs), [j.logs[-5:] for j in jobs]
    for job in jobs:
        assert ("user/hubmix-wheels", commit) in {(v["source"], v["revision"]) for v in job.spec["volumes"]}
        assert jobimage.imported_from(hub.runner, job.id).startswith(str(jobimage.site(hub.runner, job.id)))


def test_missing_wheel_is_refused_before_any_job(hub, cli, monkeypatch):
    hub.repos.pop("user/hubmix-wheels", None)
    args = ["merge", "org/a", "org/b", "--method", "weighted_sum", "--push", "user/nowheel", "--remote", "-q"]
    # an upload that "succeeded" without the file: the check at that commit refuses
    monkeypatch.setattr(install, "_upload", lambda repo, name, data: hub.resolve(repo))
    code, _, err = cli(*args)
    wheel = build_wheel()
    assert_one_line_error(code, err, "user/hubmix-wheels@", f"no {wheel.name}", "nothing was started")
    # a file of that name with other bytes: refused too
    hub.commit("user/hubmix-wheels", {wheel.name: b"PK\x05\x06" + bytes(18)})
    code, _, err = cli(*args)
    assert_one_line_error(code, err, "user/hubmix-wheels@", "not the wheel built here")
    assert _creates(hub) == []
    hub.repos.pop("user/hubmix-wheels", None)


@pytest.fixture
def index(tmp_path):
    """A simple index on loopback (a folder served by http.server: PEP 503 pages are directory listings)."""
    root = tmp_path / "index"
    (root / "hubmix").mkdir(parents=True)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(root), **k)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_installed_from_an_index_installs_that_version(hub, cli, monkeypatch, index):
    root, url = index
    monkeypatch.setattr(install, "index_version", lambda: "0.1.0")  # as if pip had installed hubmix 0.1.0
    monkeypatch.setenv("PIP_INDEX_URL", url)
    args = ["merge", "org/a", "org/b@v1", "--method", "weighted_sum", "--push", "user/fromindex", "--remote", "-q"]
    code, _, err = cli(*args)
    assert_one_line_error(code, err, url, "no hubmix 0.1.0 there", "nothing was started")
    assert _creates(hub) == []
    (root / "hubmix" / "hubmix-0.1.0-py3-none-any.whl").write_bytes(build_wheel().data)
    code, out, err = cli(*args)
    assert code == 0, err
    (spec,) = _creates(hub)
    env = spec["environment"]
    assert (env["HUBMIX_INSTALL"], env["PIP_INDEX_URL"]) == ("hubmix==0.1.0", url)
    assert {v["source"] for v in spec["volumes"]} == {"org/a", "org/b"}  # no wheel mounted
    assert not [r for r in hub.requests if "hubmix-wheels" in r.path]
    job = next(j for j in hub.runner.jobs.values() if j.spec == spec)
    assert jobimage.imported_from(hub.runner, job.id) == str(jobimage.site(hub.runner, job.id) / "hubmix/__init__.py")
    assert f"`hubmix==0.1.0` from {url}" in hub.files("user/fromindex")["README.md"].decode()


def test_pypi_has_no_hubmix_for_the_test_image(hub, cli):
    """The image's pip fails on what "PyPI" lacks, as the real one does: the old default would fail in the job."""
    code, _, err = cli("merge", "org/a", "org/b@v1", "--method", "weighted_sum", "--push", "user/oldway",
                       "--remote", "--remote-install", "hubmix==0.1.0", "-q")
    assert code == 1
    assert "No matching distribution found for hubmix==0.1.0" in err


def test_index_version_reads_how_hubmix_was_installed(tmp_path):
    site = tmp_path / "site"
    (site / "hubmix").mkdir(parents=True)
    (site / "hubmix" / "__init__.py").write_text("")
    info = site / "hubmix-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: hubmix\nVersion: 0.1.0\n")
    (info / "INSTALLER").write_text("pip\n")
    dist = PathDistribution(info)
    assert install.index_version(dist, site / "hubmix") == "0.1.0"  # from an index
    assert install.index_version(dist, tmp_path / "checkout" / "hubmix") is None  # other code runs
    (info / "direct_url.json").write_text('{"url": "file:///src", "dir_info": {"editable": true}}')
    assert install.index_version(dist, site / "hubmix") is None  # editable / local / URL install
    (info / "direct_url.json").unlink()
    (info / "INSTALLER").unlink()
    assert install.index_version(dist, site / "hubmix") is None  # copied in by hand: no installer
