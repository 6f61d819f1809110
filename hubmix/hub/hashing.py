"""sha256 of input files for the recipe: hashed from the memory map the merge reads, while it reads, and
remembered per file version.

A merge reads its inputs through memory maps. `InputHashes` hashes each file through that same mapping,
sequentially, on threads of its own while the engine computes (hashlib releases the GIL for large buffers): every
page comes from the disk or the page cache once, shared by the merge and the hash, and no second read pass copies
the bytes. Digests are kept per file version (path, size, mtime, inode) in hubmix's cache, so a file is hashed once;
files from the Hub are not hashed at all: `record_known` takes the sha256 the Hub records for them (hub.resolve).

The CLI starts reading local single files even earlier (`hash_ahead`): a merge's first 1.5 s go to importing
torch on one core while the other is idle, and the files are known from the command line. They are opened with the
reader the merge then uses (readers.preopen), so each is still read through one mapping; files never merged before
are hashed there (the merge's InputHashes adopts the digests), the others have their pages faulted in.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import sys
import threading
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

from hubmix.cache import cache_root, write_atomically

_lock = threading.Lock()
BLOCK = 16 << 20  # bytes per hashlib call: large enough to release the GIL, small enough to cancel promptly
NICE = 10  # added to a hash thread's nice value (HUBMIX_HASH_NICE overrides, 0: none): the merge's threads come first
_KNOWN: dict[str, str] = {}  # resolved path -> sha256 recorded elsewhere (the Hub's LFS metadata)


def cache_file() -> Path:
    return cache_root() / "sha256.json"


def _stamp(path: Path) -> str:
    from hubmix.formats.io.readers import file_version

    return file_version(path)


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


def record_known(path: str | os.PathLike, sha256: str) -> None:
    """The sha256 of `path` is known without reading it (the Hub records it for the downloaded file)."""
    _KNOWN[str(Path(path).resolve())] = sha256


def known_sha256(path: str | os.PathLike) -> str | None:
    """A digest that needs no hashing: recorded by the Hub, a Hugging Face cache blob's name, or this file
    version's cached digest; None if the file has to be read."""
    p = Path(path).resolve()
    if str(p) in _KNOWN:
        return _KNOWN[str(p)]
    if p.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", p.name):
        return p.name  # a Hugging Face cache blob of an LFS file is named by its sha256
    hit = _load().get(str(p))
    if hit and hit.get("stamp") == _stamp(p):
        return hit["sha256"]
    return None


def behind_the_merge() -> None:
    """Lower the calling thread's priority (Linux keeps a nice value per thread). Hashing is CPU work that can wait
    (the digests are needed only for the final header), while the merge's imports, planning, kernels and writes are
    its critical path: at equal priority three hash threads took most of a 2-core machine from them, so the disk
    idled early and the hashes ran on after. Niced, they use what the merge leaves, and all of it once it waits
    for the disk. Elsewhere, or where the system refuses, a no-op."""
    try:
        step = int(os.environ.get("HUBMIX_HASH_NICE", NICE))
    except ValueError:
        step = NICE
    if not sys.platform.startswith("linux") or step <= 0:
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + step))
    except (OSError, AttributeError):
        pass


def sha256_of(buffer: Any, cancelled: Callable[[], bool] = lambda: False) -> str | None:
    """sha256 of a buffer (a memory map), block by block; None if `cancelled()` became true meanwhile."""
    h = hashlib.sha256()
    view = memoryview(buffer)
    try:
        for start in range(0, len(view), BLOCK):
            if cancelled():
                return None
            with view[start:start + BLOCK] as block:
                h.update(block)
    finally:
        view.release()
    return h.hexdigest()


def _mapped(path: Path):
    """A read-only map of the file (shares the page cache with any other map of it); b'' for an empty file."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return b""
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def file_sha256(path: str | os.PathLike) -> str:
    """The file's sha256 from what is known, else by reading it (through a map: no copies)."""
    p = Path(path).resolve()
    known = known_sha256(p)
    if known is not None:
        return known
    stamp = _stamp(p)
    digest = sha256_of(_mapped(p))
    assert digest is not None
    _store(str(p), stamp, digest)
    return digest


class _Ahead:
    """One input read ahead of its merge, on its own thread: hashed when its digest is unknown, else only its
    pages faulted in (what the merge's prefetcher would do on its critical path)."""

    def __init__(self, path: Path, stamp: str, buffer: Any, hash_it: bool):
        self.path, self.stamp = path, stamp
        self.digest: str | None = None  # stays None if cancelled or failed: InputHashes then hashes it itself
        self.cancel = threading.Event()
        self.thread = threading.Thread(target=self._hash if hash_it else self._populate, args=(buffer,),
                                       name="hubmix-ahead", daemon=True)

    def _hash(self, buffer: Any) -> None:
        behind_the_merge()
        try:
            self.digest = sha256_of(buffer, self.cancel.is_set)
            if self.digest is not None:
                _store(str(self.path), self.stamp, self.digest)
        except BaseException:  # noqa: BLE001 - InputHashes hashes it again and reports the error then
            pass

    def _populate(self, buffer: Any) -> None:
        from hubmix.formats.io.pages import populate_mapping

        behind_the_merge()
        populate_mapping(buffer, self.cancel.is_set)


_AHEAD: dict[str, _Ahead] = {}  # resolved path -> its hash ahead of the merge (digest unknown)
_WARMING: list[_Ahead] = []  # inputs whose pages are faulted in ahead (digest known)


def hash_ahead(paths: Iterable[str]) -> int:
    """Open the local `.safetensors` files among `paths` for the merge and start reading them on threads:
    hashing those whose digest is unknown, faulting in the pages of the others; returns how many are hashed.
    Anything else (Hub ids, folders, pickles, missing files) is left to the merge."""
    from hubmix.formats.io.readers import preopen

    started = 0
    seen = set(_AHEAD) | {str(w.path) for w in _WARMING}
    for raw in dict.fromkeys(paths):
        p = Path(raw)
        try:
            if p.suffix != ".safetensors" or not p.is_file():
                continue
            p = p.resolve()
            stamp = _stamp(p)
        except OSError:
            continue
        if str(p) in seen:
            continue
        seen.add(str(p))
        known = known_sha256(p) is not None
        f = preopen(p)
        if f is None:
            continue
        ahead = _Ahead(p, stamp, f.mapped(), hash_it=not known)
        if known:
            _WARMING.append(ahead)
        else:
            _AHEAD[str(p)] = ahead
            started += 1
        ahead.thread.start()
    return started


@contextmanager
def ahead(paths: Iterable[str]) -> Iterator[int]:
    """hash_ahead(paths) for the block's duration; at its end, hashes that no merge adopted (one that failed
    first) are cancelled and forgotten, with the files opened for them."""
    from hubmix.formats.io.readers import forget_preopened

    try:
        yield hash_ahead(paths)
    finally:
        for left in [*_AHEAD.values(), *_WARMING]:
            left.cancel.set()
        _AHEAD.clear()
        _WARMING.clear()
        forget_preopened()


class InputHashes:
    """The sha256 of a merge's input files, hashed while the merge runs from the buffers it reads.

    `sources` maps each file to its reader's mapping (`WeightFile.mapped()`), or to None where the reader has
    none (a torch pickle): such a file is mapped here, which shares the same page cache pages. Files whose digest
    is known are not read. Threads are daemons, so an interrupted merge does not wait for them at exit, and
    `cancel()` stops them between blocks."""

    def __init__(self, sources: dict[Path, Callable[[], Any] | None], threads: int | None = None):
        self._todo: list[Path] = []
        self.digests: dict[Path, str] = {}
        self._adopted: dict[Path, _Ahead] = {}  # started by hash_ahead on this file version
        for path in sorted(sources):
            ahead = _AHEAD.pop(str(path.resolve()), None)
            if ahead is not None and ahead.stamp == _stamp(path):
                self._adopted[path] = ahead
                continue
            known = known_sha256(path)
            if known is None:
                self._todo.append(path)
            else:
                self.digests[path] = known
        self._todo.sort(key=lambda p: -p.stat().st_size)  # largest first: no long file left alone at the end
        self._sources = sources
        # A thread per file (up to 8), not per core: the hashes share the cores with the merge, and all files then
        # finish near the merge's end, rather than the last large file hashing alone on one core after it.
        self._threads = threads or max(1, min(len(self._todo), 8))
        self._error: BaseException | None = None
        self._cancel = threading.Event()
        self._workers: list[threading.Thread] = []
        self._guard = threading.Lock()

    @property
    def pending(self) -> list[Path]:
        """The files this merge has to hash (no known digest)."""
        return list(self._adopted) + list(self._todo)

    def start(self) -> InputHashes:
        queue = list(self._todo)
        for _ in range(self._threads if queue else 0):
            t = threading.Thread(target=self._work, args=(queue,), name="hubmix-hash", daemon=True)
            t.start()
            self._workers.append(t)
        return self

    def _work(self, queue: list[Path]) -> None:
        if threading.current_thread() is not threading.main_thread():  # result() hashes a leftover file itself
            behind_the_merge()
        while not self._cancel.is_set():
            with self._guard:
                if not queue:
                    return
                path = queue.pop(0)
            try:
                stamp = _stamp(path)
                source = self._sources.get(path)
                buffer = source() if source is not None else None
                digest = sha256_of(_mapped(path) if buffer is None else buffer, self._cancel.is_set)
                if digest is None:
                    return
                with self._guard:
                    self.digests[path] = digest
                _store(str(path.resolve()), stamp, digest)
            except BaseException as e:  # noqa: BLE001 - raised by result()
                self._error = e
                self._cancel.set()
                return

    def result(self) -> dict[Path, str]:
        for path, ahead in self._adopted.items():
            ahead.thread.join()
            if ahead.digest is None:  # failed or cancelled: hash it here, where an error is reported
                self._work([path])
            else:
                self.digests[path] = ahead.digest
        for t in self._workers:
            t.join()
        if self._error is not None:
            raise self._error
        return dict(self.digests)

    def cancel(self) -> None:
        self._cancel.set()
        for ahead in self._adopted.values():
            ahead.cancel.set()


def input_hashes(files: Iterable[Any]) -> InputHashes:
    """InputHashes over weight files (readers.WeightFile): each hashed through its own mapping."""
    return InputHashes({f.path: getattr(f, "mapped", None) for f in files})
