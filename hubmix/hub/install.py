"""What a remote job installs to get the same hubmix as the caller, and the check that it exists before a job starts.

- hubmix installed from an index (its distribution has an INSTALLER and no direct_url.json, and the running code is
  that distribution's): `hubmix==V` from that index (PIP_INDEX_URL, else PyPI), checked on the index's simple page.
- anything else (a source checkout, an editable or local install): a reproducible wheel of the running hubmix
  (`hub.wheel`), uploaded once to the private repo `<you>/hubmix-wheels` (reused while unchanged: its name carries
  its sha256), mounted read-only at that commit, and installed from the mount; checked at that commit.
- `--remote-install SPEC`: SPEC as given, unchecked (a wheel URL, `git+https://...`).
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from hubmix import __version__
from hubmix.errors import HubError
from hubmix.hub.client import api, hub_error, one_line

WHEEL_REPO = "hubmix-wheels"
WHEEL_MOUNT = "/mnt/hubmix-wheel"
PYPI = "https://pypi.org/simple"


@dataclass(frozen=True)
class JobInstall:
    """What the job's `pip install` gets (`spec`), and what makes it available there."""

    spec: str
    source: str  # for the card: where this hubmix came from
    volume: tuple[str, str, str] | None = None  # (repo, commit, mount path) of the wheel
    env: dict[str, str] = field(default_factory=dict)


def _quiet(_: str) -> None:
    pass


# ---- where the running hubmix came from ---------------------------------------------------------------------------

def index_version(dist=None, package: Path | None = None) -> str | None:
    """The version to ask an index for, when the running hubmix was installed from one; else None."""
    from importlib import metadata as md

    if dist is None:
        try:
            dist = md.distribution("hubmix")
        except md.PackageNotFoundError:
            return None
    if package is None:
        import hubmix

        package = Path(hubmix.__file__).resolve().parent
    if dist.read_text("direct_url.json") is not None or not (dist.read_text("INSTALLER") or "").strip():
        return None  # a URL, a local folder, an editable install, or not installed by an installer at all
    init = Path(dist.locate_file("hubmix/__init__.py")).resolve()
    if init.parent != package or dist.version != __version__:
        return None  # the running code is not that distribution's (a checkout on PYTHONPATH)
    return dist.version


def index_url() -> str | None:
    """The index the job's pip should use (PIP_INDEX_URL, else PyPI); None when it holds credentials, which must
    not travel in a job's environment."""
    url = (os.environ.get("PIP_INDEX_URL") or PYPI).rstrip("/")
    return None if "@" in urllib.parse.urlsplit(url).netloc else url


def index_files(url: str, project: str = "hubmix") -> list[str]:
    """File names on the index's simple page of `project` (PEP 691 JSON or PEP 503 HTML); [] when it has none."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"{url}/{project}/", headers={
        "Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1", "User-Agent": f"hubmix/{__version__}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            body, ctype = r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return []
        raise HubError(f"{url}: HTTP {e.code} reading the {project} page of the index") from None
    except (OSError, ValueError) as e:
        raise HubError(f"{url}: could not read the index ({one_line(e, 120)})") from None
    if "json" in ctype:
        return [f.get("filename", "") for f in json.loads(body).get("files", [])]
    return [urllib.parse.unquote(h.split("#")[0].rsplit("/", 1)[-1])
            for h in re.findall(r'href=["\']([^"\']+)["\']', body.decode("utf-8", "replace"))]


def check_index(url: str, version: str) -> None:
    """Refuse, in one line, when the index has no hubmix `version` for the job's pip to find."""
    prefixes = (f"hubmix-{version}-", f"hubmix-{version}.tar.gz", f"hubmix-{version}.zip")
    if not any(f.lower().startswith(prefixes) for f in index_files(url)):
        raise HubError(f"{url}: no hubmix {version} there, so the job's `pip install hubmix=={version}` would fail; "
                       "nothing was started")


# ---- the wheel in the user's repo ---------------------------------------------------------------------------------

def _upload(repo: str, name: str, data: bytes) -> str:
    info = api().upload_file(path_or_fileobj=data, path_in_repo=name, repo_id=repo,
                             commit_message=f"hubmix: wheel {name}")
    return info.oid


def upload_wheel(ns: str, wheel, say: Callable[[str], None] = _quiet) -> str:
    """The commit of `ns/hubmix-wheels` that holds `wheel` (uploading it only when main lacks it)."""
    repo = f"{ns}/{WHEEL_REPO}"
    hub = api()
    try:
        hub.create_repo(repo, private=True, exist_ok=True)
        info = hub.model_info(repo)
        if wheel.name in {s.rfilename for s in info.siblings or []}:
            say(f"hubmix {wheel.version} wheel {wheel.sha256[:12]} already in {repo}")
            return info.sha
        say(f"uploading hubmix {wheel.version} wheel {wheel.sha256[:12]} to private repo {repo}")
        return _upload(repo, wheel.name, wheel.data)
    except HubError:
        raise
    except Exception as e:  # noqa: BLE001
        raise hub_error(e, repo, action="uploading the hubmix wheel") from None


def check_wheel(repo: str, commit: str, wheel) -> None:
    """Refuse, in one line, unless `repo` at `commit` holds exactly `wheel`'s bytes."""
    from hubmix.hub.wheel import git_blob_id

    try:
        found = [p for p in api().get_paths_info(repo, [wheel.name], revision=commit) if p.path == wheel.name]
    except Exception as e:  # noqa: BLE001
        raise hub_error(e, repo, revision=commit, action="checking the hubmix wheel") from None
    where = f"{repo}@{commit[:12]}"
    if not found:
        raise HubError(f"{where}: no {wheel.name}, so the job could not install hubmix; nothing was started")
    f = found[0]
    lfs = getattr(f, "lfs", None)
    same = (lfs.sha256 == wheel.sha256) if lfs is not None else (getattr(f, "blob_id", None) == git_blob_id(wheel.data))
    if not same or f.size != len(wheel.data):
        raise HubError(f"{where}: {wheel.name} is not the wheel built here (other bytes); nothing was started")


# ---- the one call -------------------------------------------------------------------------------------------------

def prepare(ns: str, custom: str | None = None, say: Callable[[str], None] = _quiet) -> JobInstall:
    """What the job installs, made available and checked (see the module's doc)."""
    if custom:
        return JobInstall(custom, f"`{custom}`")
    version, url = index_version(), index_url()
    if version and url:
        check_index(url, version)
        say(f"the job installs hubmix=={version} from {url}")
        return JobInstall(f"hubmix=={version}", f"`hubmix=={version}` from {url}",
                          env={} if url == PYPI else {"PIP_INDEX_URL": url})
    from hubmix.hub import wheel as wheels

    w = wheels.build()
    repo = f"{ns}/{WHEEL_REPO}"
    commit = upload_wheel(ns, w, say)
    check_wheel(repo, commit, w)
    return JobInstall(f"{WHEEL_MOUNT}/{w.name}",
                      f"the wheel `{w.name}` (sha256 `{w.sha256}`) of `{repo}` at commit `{commit}`",
                      volume=(repo, commit, WHEEL_MOUNT))
