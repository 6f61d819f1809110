"""The first merge of never-seen files: its hash threads run behind the merge's own threads (a higher nice value,
per thread), and the digests they record stay exactly hashlib's."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")


def _nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_hash_threads_run_niced_behind_the_merge(zoo, tmp_path, monkeypatch, cli):
    import hubmix.hub.hashing as hashing

    monkeypatch.setenv("HUBMIX_CACHE", str(tmp_path / "cache"))
    inputs = []
    for i in (1, 2, 3):
        p = tmp_path / f"m{i}.safetensors"
        shutil.copy(zoo.single("sd1", i), p)
        inputs.append(p)
    seen: list[tuple[bool, int]] = []  # (on the main thread, the hashing thread's nice value)
    real_sha = hashing.sha256_of

    def recording_sha(buffer, *args, **kwargs):
        seen.append((threading.current_thread() is threading.main_thread(), _nice()))
        return real_sha(buffer, *args, **kwargs)

    monkeypatch.setattr(hashing, "sha256_of", recording_sha)
    before = _nice()
    code, out, err = cli("merge", *inputs, "-m", "lossless", "--out", tmp_path / "out.safetensors", "-q")
    assert code == 0, err
    assert _nice() == before  # the merge's own (main) thread keeps its priority
    assert len(seen) == 3 and not any(main for main, _ in seen)
    want = min(19, before + hashing.NICE)
    assert all(nice == want for _, nice in seen), seen
    recipe = (tmp_path / "out.recipe.yaml").read_text()
    for p in inputs:  # the niced threads' digests are the files' sha256
        assert hashlib.sha256(p.read_bytes()).hexdigest() in recipe


def test_behind_the_merge_changes_only_the_calling_thread():
    from hubmix.hub.hashing import NICE, behind_the_merge

    main_before = _nice()
    got = []

    def body():
        before = _nice()
        behind_the_merge()
        got.append((before, _nice()))

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert got == [(main_before, min(19, main_before + NICE))]
    assert _nice() == main_before


def test_hubmix_hash_nice_zero_leaves_hash_threads_as_they_are(monkeypatch):
    from hubmix.hub.hashing import behind_the_merge

    monkeypatch.setenv("HUBMIX_HASH_NICE", "0")
    got = []

    def body():
        before = _nice()
        behind_the_merge()
        got.append(_nice() - before)

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert got == [0]
