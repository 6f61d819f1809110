"""The atomic target: a result is built in hidden temporary siblings of `--out` and renamed into place in one
final step, so the target is the old result or the new one, never half of either; every failure is one line that
names the target the user gave (never the hidden temporary), and leaves nothing behind.

- Temporaries are named `.NAME.hubmix-tmp-PID-BOOT-RANDOM`: a later run into the same target removes those whose
  process is gone (a kill -9, a power cut), and only those.
- The final step runs under an exclusive lock on the target's folder (flock), so two merges into one `--out` take
  turns: each installs its whole result (weights and the sidecar recipe) and neither sees the other half-way.
- A companion file (a single file's `<stem>.recipe.yaml`) is staged like the weights and renamed in the same locked
  step, before the weights. Why that order: should the process die between the two renames, the weights (what
  users load) are still the old ones, beside a recipe whose sha256 line does not match their `hubmix.recipe_sha256`
  metadata, which readers prefer anyway; the new weights never appear without their recipe. A rename that fails
  after the companion went in puts the old companion back.
- A folder cannot replace a folder in one step: the old one is parked aside, the new one renamed in, the old one
  removed. If another process takes the name in between, the newcomer is parked too (we were asked to overwrite)
  and the rename retried; without --overwrite the merge fails in one line. Parked folders are always removed.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from hubmix.errors import OutputError

RETRIES = 5


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:8]
    except OSError:
        return "0"


BOOT = _boot_id()


def temp_name(final: Path, kind: str = "tmp") -> Path:
    """A hidden sibling of `final` that records who made it (pid and boot), so stale ones can be told apart."""
    return final.with_name(f".{final.name}.hubmix-{kind}-{os.getpid()}-{BOOT}-{secrets.token_hex(4)}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's live process
        return True
    return True


def clean_stale(final: Path) -> list[Path]:
    """Remove the temporaries of `final` left by processes that no longer run (this boot's dead pids, or any pid
    of an earlier boot). Temporaries of live processes, and names hubmix did not make, are left alone."""
    rx = re.compile(rf"\.{re.escape(final.name)}\.hubmix-(?:tmp|old)-(\d+)-([0-9a-f]+)-[0-9a-f]{{8}}")
    parent = final.parent if str(final.parent) else Path(".")
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        m = rx.fullmatch(name)
        if m and (m.group(2) != BOOT or not _alive(int(m.group(1)))):
            _remove(parent / name)
            removed.append(parent / name)
    return removed


def check_target(target: Path, overwrite: bool) -> None:
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise OutputError(f"{target}: already exists (pass --overwrite to replace it)")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.exists():
        raise OutputError(f"{target}: parent folder {parent} does not exist")
    if not parent.is_dir():
        raise OutputError(f"{target}: {parent} is not a folder")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{target}: cannot write to {parent}")


class Staging:
    """Where a result is built: `path` becomes the target; `beside(final)` stages a companion file."""

    def __init__(self, target: Path):
        self.target = target
        self.path = temp_name(target)
        self.companions: dict[Path, Path] = {}  # final path -> temporary

    def beside(self, final: Path) -> Path:
        tmp = self.companions.get(final)
        if tmp is None:
            tmp = self.companions[final] = temp_name(final)
        return tmp

    def temporaries(self) -> dict[Path, Path]:
        return {self.path: self.target, **{tmp: final for final, tmp in self.companions.items()}}


@contextmanager
def atomic_target(target: Path, overwrite: bool, companions: tuple[Path, ...] = ()) -> Iterator[Staging]:
    """Stage a result beside `target` (and its `companions`); on success install everything in one locked step, on
    any failure remove every temporary and raise one line naming the target."""
    for final in (target, *companions):
        check_target(final, overwrite)
        clean_stale(final)
    stage = Staging(target)
    try:
        yield stage
        _fsync_tree(stage.path)
        for tmp in stage.companions.values():
            _fsync_tree(tmp)
        with _folder_lock(target.parent if str(target.parent) else Path(".")):
            _install(stage, overwrite)
    except OutputError as e:
        raise OutputError(_unhide(str(e), stage)) from None
    except OSError as e:  # shutil.Error (copytree) included
        if not _about_output(e, stage):
            raise
        raise OutputError(f"{target}: cannot write ({_unhide(_reason(e), stage)})") from None
    finally:
        for tmp in stage.temporaries():
            _remove(tmp)


def _about_output(e: OSError, stage: Staging) -> bool:
    """Whether an OSError is about writing the result (a staged path, a copy into it, a full or read-only disk),
    rather than about reading an input."""
    if isinstance(e, shutil.Error) or e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS):
        return True
    temps = [str(t) for t in stage.temporaries()]
    return any(str(n).startswith(t) for n in (e.filename, e.filename2) if n for t in temps)


def _reason(e: BaseException) -> str:
    if isinstance(e, shutil.Error) and e.args and isinstance(e.args[0], list) and e.args[0]:
        first = e.args[0][0]  # copytree collects (src, dst, why) for every file it could not copy
        return str(first[2]) if isinstance(first, tuple) and len(first) == 3 else str(first)
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return str(e)


def _unhide(text: str, stage: Staging) -> str:
    """A message about a temporary, told about the path the user gave."""
    for tmp, final in stage.temporaries().items():
        text = text.replace(str(tmp), str(final))
    return text


def _install(stage: Staging, overwrite: bool) -> None:
    """The final step (under the folder lock): companions first, then the result; see the module docstring."""
    target = stage.target
    for final in (*stage.companions, target):
        if (final.exists() or final.is_symlink()) and not overwrite:
            raise OutputError(f"{final}: already exists: another process wrote it while this merge ran (pass "
                              "--overwrite to replace it)")
    backups: dict[Path, Path] = {}
    try:
        for final, tmp in stage.companions.items():
            if final.is_file():
                backups[final] = temp_name(final, "old")
                os.link(final, backups[final])
            os.replace(tmp, final)
        _install_result(stage.path, target, overwrite)
    except BaseException:
        for final, backup in backups.items():  # put the old companions back: the old result is still there
            os.replace(backup, final)
        for final in stage.companions:
            if final not in backups:
                final.unlink(missing_ok=True)
        raise
    finally:
        for backup in backups.values():
            _remove(backup)
    _fsync_dir(target.parent if str(target.parent) else Path("."))


def _install_result(tmp: Path, target: Path, overwrite: bool) -> None:
    if tmp.is_file() and not target.is_dir():
        os.replace(tmp, target)  # one atomic step: the target is the old file or the new one, never absent
        return
    parked: list[Path] = []
    try:
        for _ in range(RETRIES):
            if target.exists() or target.is_symlink():
                if not overwrite:
                    raise OutputError(f"{target}: already exists: another process wrote it while this merge ran "
                                      "(pass --overwrite to replace it)")
                old = temp_name(target, "old")
                try:
                    os.rename(target, old)
                    parked.append(old)
                except FileNotFoundError:
                    pass  # gone meanwhile: the name is free
            try:
                os.rename(tmp, target)
                return
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
                    raise
                # another process took the name between our two renames: park theirs too, and retry
        raise OutputError(f"{target}: other processes keep writing to this name; nothing was replaced, try again")
    finally:
        for old in parked:
            _remove(old)


@contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive flock on the folder itself (no lock file to leave behind); where the file system has no
    flock, the final step runs unlocked, as atomic as its renames."""
    import fcntl

    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    if root.is_file():
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)
