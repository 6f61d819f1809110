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
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

_lock = threading.Lock()
BLOCK = 8 << 20


def cache_file() -> Path:
    root = os.environ.get("HUBMIX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hubmix")
    return Path(root) / "sha256.json"


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
        target = cache_file()
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f"{target.name}.{os.getpid()}.{threading.get_ident()}")
            tmp.write_text(json.dumps(data, sort_keys=True))
            os.replace(tmp, target)
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
    """A future of {path: sha256}, computed while the merge runs, files in parallel (hashlib releases the GIL)."""
    pool = ThreadPoolExecutor(max(1, min(len(paths), os.cpu_count() or 1)), thread_name_prefix="hubmix-hash")
    futures = {p: pool.submit(file_sha256, p) for p in paths}
    pool.shutdown(wait=False)
    collector = ThreadPoolExecutor(1, thread_name_prefix="hubmix-hash-join")
    fut = collector.submit(lambda: {p: f.result() for p, f in futures.items()})
    collector.shutdown(wait=False)
    return fut
