"""Input hashes for the recipe: computed from the mapping the merge reads (no second pass over the files), right on a
first merge, remembered per file version."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

import hubmix
from hubmix import Recipe


def _true_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def fresh_inputs(zoo, tmp_path, monkeypatch):
    """Three inputs hubmix has never seen (a single file, a diffusers folder, a .ckpt) and an empty hash cache."""
    import torch
    from safetensors.torch import load_file

    monkeypatch.setenv("HUBMIX_CACHE", str(tmp_path / "cache"))
    a = tmp_path / "a.safetensors"
    shutil.copy(zoo.single("sd1", 1), a)
    b = tmp_path / "b"
    shutil.copytree(zoo.diffusers("sd1", 2), b)
    c = tmp_path / "c.ckpt"
    torch.save({"state_dict": load_file(str(zoo.single("sd1", 3)))}, c)
    return a, b, c


def test_first_merge_hashes_inputs_from_the_merge_own_mapping(fresh_inputs, tmp_path, monkeypatch):
    import hubmix.hub.hashing as hashing
    from hubmix.formats.io.readers import SafetensorsFile

    a, b, c = fresh_inputs
    weights = [a, *sorted(b.glob("*/*.safetensors"))]
    maps: dict[str, list[int]] = {}
    hashed: list[int] = []
    own_maps: list[str] = []  # files the hashing mapped itself (readers without a mapping: the .ckpt)
    real_map, real_sha, real_own = SafetensorsFile._map, hashing.sha256_of, hashing._mapped

    def recording_map(self):
        mm = real_map(self)
        ids = maps.setdefault(str(self.path.resolve()), [])
        if id(mm) not in ids:
            ids.append(id(mm))
        return mm

    def recording_sha(buffer, *args, **kwargs):
        hashed.append(id(buffer))
        return real_sha(buffer, *args, **kwargs)

    def recording_own(path):
        own_maps.append(str(Path(path).resolve()))
        return real_own(path)

    def separate_pass(path):
        raise AssertionError(f"{path} was hashed by a separate read")

    monkeypatch.setattr(hashing, "file_sha256", separate_pass)
    monkeypatch.setattr(hashing, "sha256_of", recording_sha)
    monkeypatch.setattr(hashing, "_mapped", recording_own)
    monkeypatch.setattr(SafetensorsFile, "_map", recording_map)
    result = hubmix.merge(Recipe(models=[str(a), str(b), str(c)], method="lossless"), out=tmp_path / "m.safetensors",
                          quiet=True)

    files = {m["name"]: m["files"] for m in result.canonical["models"]}
    assert files["a"] == {"a.safetensors": _true_sha256(a)}
    assert files["b"] == {str(p.relative_to(b)): _true_sha256(p) for p in weights[1:]}
    assert files["c"] == {"c.ckpt": _true_sha256(c)}
    assert result.engine["hashed_files"] == len(weights) + 1
    for p in weights:  # one mapping per file, read by the engine and hashed: no second pass over the file
        key = str(p.resolve())
        assert len(maps[key]) == 1 and maps[key][0] in hashed, p
    assert own_maps == [str(c.resolve())]
    # remembered per file version: the next merge reads nothing for its hashes and records the same digests
    again = hubmix.merge(Recipe(models=[str(a), str(b), str(c)], method="lossless"),
                         out=tmp_path / "m2.safetensors", quiet=True)
    assert again.engine["hashed_files"] == 0
    assert again.canonical == result.canonical



def test_the_cli_hashes_single_files_ahead_through_the_merge_own_mapping(fresh_inputs, tmp_path, monkeypatch, cli):
    """`hubmix merge` starts hashing local single files before it imports the engine; the merge adopts those
    digests and reads each file through the same mapping (the file opened ahead is the one it merges)."""
    import json

    import hubmix.hub.hashing as hashing
    from hubmix.formats.io import readers

    a, b, c = fresh_inputs
    a2 = tmp_path / "a2.safetensors"
    shutil.copy(a, a2)
    a2.write_bytes(a2.read_bytes())  # another file version, the same bytes
    started, opened, adopted = [], [], []
    real_ahead, real_open, real_init = hashing.hash_ahead, readers.SafetensorsFile.__init__, hashing.InputHashes.__init__

    def recording_ahead(paths):
        n = real_ahead(paths)
        started.extend(hashing._AHEAD)
        return n

    def recording_open(self, path):
        opened.append(str(Path(path).resolve()))
        real_open(self, path)

    def recording_init(self, sources, threads=None):
        real_init(self, sources, threads)
        adopted.extend(str(p.resolve()) for p in self._adopted)

    monkeypatch.setattr(hashing, "hash_ahead", recording_ahead)
    monkeypatch.setattr(readers.SafetensorsFile, "__init__", recording_open)
    monkeypatch.setattr(hashing.InputHashes, "__init__", recording_init)
    code, out, err = cli("merge", a, b, a2, "-m", "lossless", "--out", tmp_path / "m.safetensors", "-q", "--json")
    assert code == 0, err
    singles = sorted(str(p.resolve()) for p in (a, a2))
    assert sorted(started) == singles and sorted(adopted) == singles  # the folder is left to the merge
    for p in singles:  # opened once: ahead, and the merge took that same object
        assert opened.count(p) == 1, p
    assert hashing._AHEAD == {} and readers._PREOPENED == {}
    assert json.loads(out)["engine"]["hashed_files"] == 2 + len(list(b.glob("*/*.safetensors")))
    text = (tmp_path / "m.recipe.yaml").read_text()  # the digests the ahead threads computed
    assert _true_sha256(a) in text and _true_sha256(a2) in text


def test_hashes_ahead_that_no_merge_adopts_are_dropped(fresh_inputs, tmp_path, cli):
    import hubmix.hub.hashing as hashing
    from hubmix.formats.io import readers

    a, b, _ = fresh_inputs
    code, _, err = cli("merge", a, b, "-m", "no_such_method", "--out", tmp_path / "m.safetensors")
    assert code != 0 and "no_such_method" in err
    assert hashing._AHEAD == {} and readers._PREOPENED == {}
    assert not (tmp_path / "m.safetensors").exists()
