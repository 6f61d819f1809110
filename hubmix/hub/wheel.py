"""A wheel of the running hubmix, for a remote job to install when no index has this hubmix.

Reproducible: the package's files in sorted order, every entry dated 1980-01-01 with mode 0644 and STORED (not
deflated, so the bytes do not depend on the zlib build either), the metadata written from pyproject.toml (or the
installed distribution's metadata) in a fixed order. An unchanged hubmix gives the same bytes on any machine, and the
file name carries their sha256 as the wheel's build tag (`hubmix-0.1.0-0.<sha256>-py3-none-any.whl`, a name pip
accepts), so a wheel uploaded once is found again by name. Standard library only."""

from __future__ import annotations

import base64
import hashlib
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

from hubmix import __version__
from hubmix.errors import HubError

DATE = (1980, 1, 1, 0, 0, 0)  # the earliest a zip can say: no build time in the bytes
SKIP_SUFFIXES = (".pyc", ".pyo", ".so", ".dylib", ".dll", ".o", ".tmp")


@dataclass(frozen=True)
class Wheel:
    name: str  # file name, the sha256 in its build tag
    data: bytes
    sha256: str
    version: str


def package_dir() -> Path:
    import hubmix

    return Path(hubmix.__file__).resolve().parent


def package_files(root: Path) -> list[Path]:
    """The files a wheel of the package at `root` holds: sources and package data; no caches, builds or dotfiles."""
    out = []
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if (p.is_file() and not any(part.startswith(".") or part == "__pycache__" for part in rel.parts)
                and not p.name.endswith(SKIP_SUFFIXES)):
            out.append(p)
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def project_table(root: Path) -> dict | None:
    """[project] of the pyproject.toml beside the package (a source checkout), when it is hubmix's."""
    path = root.parent / "pyproject.toml"
    if not path.is_file():
        return None
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            return None
    project = tomllib.loads(path.read_text(encoding="utf-8")).get("project") or {}
    return project if project.get("name") == "hubmix" else None


def _extra(req: str, extra: str) -> str:
    spec, _, marker = req.partition(";")
    cond = f'extra == "{extra}"'
    return f"{spec.strip()}; ({marker.strip()}) and {cond}" if marker.strip() else f"{spec.strip()}; {cond}"


def metadata(root: Path) -> tuple[str, str]:
    """(METADATA, entry_points.txt) of the running hubmix: from its pyproject.toml, else from the installed
    distribution of the same version."""
    project = project_table(root)
    if project is not None:
        if project.get("version") != __version__:
            raise HubError(f"{root.parent / 'pyproject.toml'}: version {project.get('version')} but hubmix says "
                           f"{__version__}; the job would install another hubmix")
        lines = ["Metadata-Version: 2.1", "Name: hubmix", f"Version: {__version__}"]
        if project.get("description"):
            lines.append(f"Summary: {project['description']}")
        if project.get("requires-python"):
            lines.append(f"Requires-Python: {project['requires-python']}")
        lines += [f"Requires-Dist: {r}" for r in project.get("dependencies", [])]
        for extra, reqs in sorted((project.get("optional-dependencies") or {}).items()):
            lines.append(f"Provides-Extra: {extra}")
            lines += [f"Requires-Dist: {_extra(r, extra)}" for r in reqs]
        scripts = project.get("scripts") or {}
        entry = "".join(f"{k} = {v}\n" for k, v in sorted(scripts.items()))
        return "\n".join(lines) + "\n", ("[console_scripts]\n" + entry if entry else "")
    from importlib import metadata as md

    try:
        dist = md.distribution("hubmix")
    except md.PackageNotFoundError:
        dist = None
    if dist is None or dist.version != __version__:
        raise HubError(f"{root}: no pyproject.toml beside it and no installed hubmix {__version__} metadata, so its "
                       "dependencies are unknown; pass --remote-install")
    meta = dist.read_text("METADATA") or ""
    return meta if meta.endswith("\n") else meta + "\n", dist.read_text("entry_points.txt") or ""


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build(root: Path | None = None) -> Wheel:
    """The wheel of the hubmix package at `root` (default: the running one), built in memory."""
    root = root or package_dir()
    files = [(f"hubmix/{p.relative_to(root).as_posix()}", p.read_bytes()) for p in package_files(root)]
    meta, entry_points = metadata(root)
    info = f"hubmix-{__version__}.dist-info"
    files.append((f"{info}/METADATA", meta.encode()))
    files.append((f"{info}/WHEEL", b"Wheel-Version: 1.0\nGenerator: hubmix\nRoot-Is-Purelib: true\n"
                                   b"Tag: py3-none-any\n"))
    if entry_points:
        files.append((f"{info}/entry_points.txt", entry_points.encode()))
    files.append((f"{info}/top_level.txt", b"hubmix\n"))
    record = "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data in files) + f"{info}/RECORD,,\n"
    files.append((f"{info}/RECORD", record.encode()))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, data in files:
            zi = zipfile.ZipInfo(name, DATE)
            zi.create_system, zi.external_attr, zi.compress_type = 3, 0o100644 << 16, zipfile.ZIP_STORED
            z.writestr(zi, data)
    data = buf.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    return Wheel(f"hubmix-{__version__}-0.{sha}-py3-none-any.whl", data, sha, __version__)


def git_blob_id(data: bytes) -> str:
    """The Hub's `blob_id` of a regular (non-LFS) file with these bytes."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
