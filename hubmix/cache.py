"""hubmix's own cache folder (input hashes, Hub file listings, native kernels, the torch.compile cache) and the
one way files are written there and beside outputs: complete or not at all."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def cache_root() -> Path:
    """`$HUBMIX_CACHE`, else `~/.cache/hubmix`."""
    return Path(os.environ.get("HUBMIX_CACHE") or Path.home() / ".cache" / "hubmix")


def umask() -> int:
    """The process umask, read without changing it where Linux tells it (/proc), else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def write_new(path: Path, text: str) -> None:
    """Write a new file (a staged temporary) with an ordinary file's mode: 0666 minus the umask, as the weights."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to a unique temporary sibling and rename it over `path`: readers never see half a file, and
    concurrent writers never share a temporary."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~umask())  # mkstemp makes 0600; an ordinary file (as the weights beside it) is not
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
