"""`hubmix ui --space ORG/NAME`: the same page as a Gradio Space. The Space repo gets app.py (the page with sign-in),
README.md (front matter: sdk gradio, hf_oauth with the scopes a visitor's work needs), a wheel of this very hubmix
(no package index has it) and requirements.txt pinning that wheel at the commit that holds it.

Visitors sign in (gr.LoginButton); their work runs in a child process whose only token is theirs
(hubmix.ui.visitor), so the Space owner's token never does a visitor's work and never reaches the page."""

from __future__ import annotations

import base64
import hashlib
import io
import zipfile
from pathlib import Path
from typing import Any

from hubmix import __version__
from hubmix.ui import UIError

# https://huggingface.co/docs/hub/oauth (hub-docs PR 2014): read the visitor's repos, write and create them (the
# merge is pushed to their namespace: manage-repos grants creation), run Jobs under their account
SCOPES = ("read-repos", "write-repos", "manage-repos", "jobs")
DATE = (1980, 1, 1, 0, 0, 0)

APP = '''"""hubmix web UI as a Hugging Face Space (written by `hubmix ui --space`)."""
import subprocess
import sys
from pathlib import Path

try:
    import hubmix
    assert hubmix.__version__ == "{version}"
except (ImportError, AssertionError):  # a private Space cannot fetch the pinned URL: install the wheel beside us
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--no-deps", str(Path(__file__).with_name("{wheel}"))])

from hubmix.ui.app import build

demo = build(space=True)
demo.queue(default_concurrency_limit=2)

if __name__ == "__main__":
    demo.launch()
'''


def wheel() -> tuple[str, bytes]:
    """(file name, bytes) of a reproducible wheel of the running hubmix: hubmix.hub.wheel's when that module is
    here (the remote-jobs wheel), else the same recipe in brief: sorted entries, fixed dates, stored."""
    try:
        from hubmix.hub.wheel import build  # type: ignore[import-not-found]
    except ImportError:
        return _wheel()
    w = build()
    return w.name, w.data


def _wheel() -> tuple[str, bytes]:
    import hubmix

    root = Path(hubmix.__file__).resolve().parent
    files = [(f"hubmix/{p.relative_to(root).as_posix()}", p.read_bytes()) for p in sorted(root.rglob("*"))
             if p.is_file() and "__pycache__" not in p.parts and not p.name.endswith((".pyc", ".so", ".o"))
             and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    files.sort()
    info = f"hubmix-{__version__}.dist-info"
    files += [(f"{info}/METADATA", _metadata(root).encode()),
              (f"{info}/WHEEL", b"Wheel-Version: 1.0\nGenerator: hubmix\nRoot-Is-Purelib: true\nTag: py3-none-any\n"),
              (f"{info}/entry_points.txt", b"[console_scripts]\nhubmix = hubmix.cli:run\n")]
    digest = lambda d: "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b"=").decode()  # noqa
    record = "".join(f"{n},{digest(d)},{len(d)}\n" for n, d in files) + f"{info}/RECORD,,\n"
    files.append((f"{info}/RECORD", record.encode()))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, data in files:
            zi = zipfile.ZipInfo(name, DATE)
            zi.external_attr = 0o100644 << 16
            z.writestr(zi, data)
    data = buf.getvalue()
    return f"hubmix-{__version__}-0.{hashlib.sha256(data).hexdigest()}-py3-none-any.whl", data


def _metadata(root: Path) -> str:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    path = root.parent / "pyproject.toml"
    if not path.is_file():
        raise UIError(f"{root}: no pyproject.toml beside the package, so the wheel's dependencies are unknown")
    project = tomllib.loads(path.read_text()).get("project") or {}
    lines = ["Metadata-Version: 2.1", "Name: hubmix", f"Version: {__version__}"]
    lines += [f"Requires-Dist: {r}" for r in project.get("dependencies", [])]
    return "\n".join(lines) + "\n"


def readme(repo_id: str) -> str:
    scopes = "".join(f"  - {s}\n" for s in SCOPES)
    return (f"---\ntitle: hubmix\nemoji: 🧪\ncolorFrom: indigo\ncolorTo: pink\nsdk: gradio\napp_file: app.py\n"
            f"pinned: false\nhf_oauth: true\nhf_oauth_scopes:\n{scopes}---\n\n# hubmix\n\nMerge diffusion models "
            f"from the Hub with [hubmix](https://github.com/) {__version__}: sign in, enter models, dry run, "
            "merge. Merges run as Hugging Face Jobs under your account and are pushed to your namespace with a "
            "model card that records the recipe.\n")


def requirements(url: str) -> str:
    """The Space's requirements: this hubmix's wheel by URL at a pinned commit, and what the page itself needs."""
    return f"hubmix @ {url}\ngradio[oauth]\n"


def deploy_space(repo_id: str, *, private: bool = False) -> str:
    """Create or update the Space `repo_id` in two commits (the wheel, then the app pinned to the wheel's commit);
    returns the second commit's URL."""
    from hubmix.hub.client import api, endpoint
    from huggingface_hub import CommitOperationAdd

    hub = api()
    try:
        hub.create_repo(repo_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
        name, data = wheel()
        first = hub.create_commit(repo_id, repo_type="space", commit_message=f"hubmix {__version__} wheel",
                                  operations=[CommitOperationAdd(name, io.BytesIO(data))])
        url = f"{endpoint()}/spaces/{repo_id}/resolve/{first.oid}/{name}"
        files = {"app.py": APP.format(version=__version__, wheel=name), "README.md": readme(repo_id),
                 "requirements.txt": requirements(url)}
        info = hub.create_commit(repo_id, repo_type="space", commit_message=f"hubmix {__version__} web UI",
                                 operations=[CommitOperationAdd(k, io.BytesIO(v.encode())) for k, v in files.items()])
    except Exception as e:  # noqa: BLE001
        from hubmix.hub.client import hub_error

        raise hub_error(e, repo_id, action="writing the Space") from None
    return info.commit_url


def space_files(text: dict[str, bytes]) -> dict[str, Any]:
    """What a Space repo's files say (README front matter, the pinned requirement), for checks."""
    import yaml

    front = text["README.md"].decode().split("---")[1]
    return {"front": yaml.safe_load(front), "requirements": text["requirements.txt"].decode().splitlines()}


__all__ = ["deploy_space", "wheel", "readme", "requirements", "space_files", "SCOPES", "APP"]
