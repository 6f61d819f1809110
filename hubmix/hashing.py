"""sha256 of input files, remembered per file version, so recipes can identify local inputs without rehashing.

Hashing a 2 GB checkpoint costs about 2 s of one core; the cache (keyed by path, size, mtime and inode) makes it a
once-per-file cost, and files in the Hugging Face cache are named by their sha256 already.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from concurrent.futures import Future
from pathlib import Path

from hubmix.cache import cache_root, write_atomically

_lock = threading.Lock()
BLOCK = 8 << 20


def cache_file() -> Path:
    return cache_root() / "sha256.json"


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def _load() -> dict[str, dict[str, str]]:
    try:
        return json.loads(cache_file().read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _store(path: str, stamp: str, digest: str) -> None:
    with _lock:
        data = _load()
        data[path] = {"stamp": stamp, "sha256": digest}
        try:
            cache_file().parent.mkdir(parents=True, exist_ok=True)
            write_atomically(cache_file(), json.dumps(data, sort_keys=True))
        except OSError:
            pass  # a read-only home only costs rehashing next time


def file_sha256(path: str | os.PathLike) -> str:
    p = Path(path).resolve()
    if p.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", p.name):
        return p.name  # a Hugging Face cache blob of an LFS file is named by its sha256
    stamp = _stamp(p)
    hit = _load().get(str(p))
    if hit and hit.get("stamp") == stamp:
        return hit["sha256"]
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while block := f.read(BLOCK):
            h.update(block)
    digest = h.hexdigest()
    _store(str(p), stamp, digest)
    return digest


def hash_in_background(paths: list[Path]) -> Future:
    """A future of {path: sha256}, computed while the merge runs, files in parallel (hashlib releases the GIL).

    Daemon threads, not an executor: an executor's threads are joined at interpreter exit, so a failed or
    interrupted merge would wait for every queued file to be hashed before the process could end."""
    result: Future = Future()
    digests: dict[Path, str] = {}
    todo = list(paths)
    remaining = [len(todo)]
    guard = threading.Lock()

    def worker() -> None:
        while True:
            with guard:
                if not todo or result.done():
                    return
                p = todo.pop(0)
            try:
                d = file_sha256(p)
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits
                with guard:
                    if not result.done():
                        result.set_exception(e)
                return
            with guard:
                digests[p] = d
                remaining[0] -= 1
                if remaining[0] == 0 and not result.done():
                    result.set_result(dict(digests))

    if not todo:
        result.set_result({})
    for _ in range(max(1, min(len(todo), os.cpu_count() or 1))):
        threading.Thread(target=worker, name="hubmix-hash", daemon=True).start()
    return result
