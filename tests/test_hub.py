"""The Hub workflow against the loopback Hub in tests/hubserver.py, driven by the real huggingface_hub client:
resolve and fetch (only what a merge reads, pinned, offline from the cache), push in one commit with a model card,
load the pushed repo with diffusers, reproduce, and every error a user hits, as one line naming the repo."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import yaml
from hubserver import HubError as ServerError
from conftest import assert_one_line_error
from hubserver import configure_hf_client, guard_loopback, start_hub_server

TOKEN = "hf_test_token_user"
OTHER = "hf_other"
LICENSE = "creativeml-openrail-m"
DECOYS = {  # what a merge must never download from org/a
    "unet/diffusion_pytorch_model.bin": b"torch duplicate",
    "unet/diffusion_pytorch_model.fp16.safetensors": b"another variant",
    "text_encoder/flax_model.msgpack": b"flax duplicate",
    "onnx/unet/model.onnx": b"onnx export",
    "v1-5-pruned.ckpt": b"original checkpoint duplicate",
}


def _card(license_: str) -> bytes:
    return f"---\nlicense: {license_}\nlibrary_name: diffusers\n---\n# model\n".encode()


def _folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _processor_config() -> bytes:
    return json.dumps({"crop_size": {"height": 32, "width": 32}, "do_center_crop": True, "do_normalize": True,
                       "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
                       "image_processor_type": "CLIPImageProcessor", "image_std": [0.5, 0.5, 0.5], "resample": 3,
                       "rescale_factor": 1 / 255, "size": {"shortest_edge": 32}}).encode()


def seed_repos(server, zoo) -> dict[str, str]:
    """org/a (diffusers, with decoys and a feature extractor), org/b (diffusers, tag v1 then a newer main), org/c
    (single file in a subfolder), org/d (single file, another license), org/v (default + fp16 variant), org/sharded.
    Returns the commit shas worth knowing."""
    shas = {}
    server.create_repo("org/a")
    files = _folder_files(zoo.diffusers("sd1", 1))
    index = json.loads(files["model_index.json"])
    index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    files["model_index.json"] = json.dumps(index, indent=2).encode()
    files["feature_extractor/preprocessor_config.json"] = _processor_config()
    shas["a"] = server.commit("org/a", {**files, **DECOYS, "README.md": _card(LICENSE)}, message="a")
    server.create_repo("org/b")
    shas["b_v1"] = server.commit("org/b", {**_folder_files(zoo.diffusers("sd1", 2)), "README.md": _card(LICENSE)})
    server.tag("org/b", "v1")
    newer = zoo.diffusers("sd1", 4) / "unet" / "diffusion_pytorch_model.safetensors"
    shas["b_main"] = server.commit("org/b", {"unet/diffusion_pytorch_model.safetensors": newer}, message="v2")
    server.create_repo("org/c")
    shas["c"] = server.commit("org/c", {"checkpoints/c.safetensors": zoo.single("sd1", 3),
                                        "README.md": _card(LICENSE)})
    server.create_repo("org/d")
    server.commit("org/d", {"d.safetensors": zoo.single("sd1", 5), "README.md": _card("mit")})
    server.create_repo("org/v")
    variant = _folder_files(zoo.diffusers("sd1", 6, dtype="fp16", variant="fp16"))
    server.commit("org/v", {**_folder_files(zoo.diffusers("sd1", 6)), **variant})
    server.create_repo("org/sharded")
    server.commit("org/sharded", _folder_files(zoo.diffusers("sd1", 7, shard="100KB")))
    return shas


@pytest.fixture(scope="module")
def seeded(zoo):
    server = start_hub_server(tokens={TOKEN: "user", OTHER: "other"})
    shas = seed_repos(server, zoo)
    yield server, shas
    server.stop()
    assert server.errors == []


@pytest.fixture
def hub(seeded, monkeypatch, tmp_path):
    """The seeded Hub, a fresh HF_HOME and hubmix cache, no token (tests that push set HF_TOKEN), no network."""
    server, shas = seeded
    off_loopback = guard_loopback(monkeypatch)
    configure_hf_client(monkeypatch, server.url, tmp_path / "hf_home")
    monkeypatch.setenv("HUBMIX_CACHE", str(tmp_path / "hubmix-cache"))
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()  # tqdm output would mix with the one-line errors the tests read
    server.clear_log()
    server.shas = shas
    yield server
    if not was_disabled:
        enable_progress_bars()
    assert off_loopback == []


@pytest.fixture
def token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return TOKEN


INPUTS = ["org/a", "org/b@v1", "org/c/checkpoints/c.safetensors"]
A_NEEDED = sorted(["model_index.json", "scheduler/scheduler_config.json", "feature_extractor/preprocessor_config.json",
                   "text_encoder/config.json", "text_encoder/model.safetensors", "unet/config.json",
                   "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                   "vae/diffusion_pytorch_model.safetensors"])


def _tokenizer_files(server, repo):
    return sorted(p for p in server.files(repo) if p.startswith("tokenizer/"))


# ---- 1, 2, 4, 5, 7: merge three Hub repos, push, load with diffusers, read the card ------------------------------

def test_merge_push_load_and_card(hub, token, cli, tmp_path, zoo):
    out = tmp_path / "merged"
    code, stdout, err = cli("merge", *INPUTS, "--method", "lossless", "--out", out, "--push", "user/merge", "-q")
    assert code == 0, err
    head = hub.resolve("user/merge")
    assert stdout.strip().splitlines()[-1] == f"{hub.url}/user/merge/commit/{head}"

    # 2: every input pinned, only what the merge reads downloaded (configs + weights; no .bin/flax/onnx/ckpt)
    assert sorted(hub.downloads("org/a")) == sorted(A_NEEDED + _tokenizer_files(hub, "org/a"))
    assert sorted(hub.downloads("org/b")) == sorted(
        [p for p in A_NEEDED if not p.startswith("feature_extractor")] + _tokenizer_files(hub, "org/b"))
    assert hub.downloads("org/c") == ["checkpoints/c.safetensors"]
    assert all(r.params["rev"] in (hub.shas["a"], hub.shas["b_v1"], hub.shas["c"], "main", "v1")
               for r in hub.requests if r.route == "resolve" and r.params["repo"] != "user/merge")
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    a, b, c = recipe["models"]
    assert (a["ref"], a["repo"], a["revision"]) == ("org/a", "org/a", hub.shas["a"])
    assert (b["ref"], b["revision"]) == ("org/b@v1", hub.shas["b_v1"])  # the tag, not the newer main
    assert (c["repo"], c["file"], c["revision"]) == ("org/c", "checkpoints/c.safetensors", hub.shas["c"])
    assert c["files"] == {"c.safetensors": hub.blobs("org/c")["checkpoints/c.safetensors"].sha256}
    assert a["files"]["unet/diffusion_pytorch_model.safetensors"] == hub.blobs("org/a")[
        "unet/diffusion_pytorch_model.safetensors"].sha256

    # 4: one commit with the weights, configs, recipe.yaml and README.md, nothing else
    pushed = {p: d for p, d in hub.files("user/merge").items() if p != ".gitattributes"}
    local = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert pushed == local
    assert "recipe.yaml" in pushed and "README.md" in pushed and "feature_extractor/preprocessor_config.json" in pushed
    assert not [p for p in pushed if p.endswith((".bin", ".msgpack", ".onnx", ".ckpt"))]
    assert [c.title for c in hub.history("user/merge")][:1] == ["hubmix: lossless merge of " + ", ".join(INPUTS)]
    assert len(hub.history("user/merge")) == 2 and len([r for r in hub.requests if r.route == "commit"]) == 1
    # the token never leaves the Authorization header: not in any request body, pushed byte, output or card
    assert all(TOKEN.encode() not in r.body for r in hub.requests)
    assert all(TOKEN.encode() not in data for data in pushed.values())
    assert TOKEN not in stdout + err
    # no local path in anything pushed
    for secret in (str(tmp_path), str(zoo.root), str(Path.home())):
        assert all(secret.encode() not in data for data in pushed.values()), secret

    # 5: the card, parsed by huggingface_hub from the Hub
    from huggingface_hub import ModelCard

    card = ModelCard.load("user/merge")
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image"
    assert card.data.base_model == ["org/a", "org/b", "org/c"]
    assert card.data.base_model_relation == "merge"
    assert {"hubmix", "merge", "stable-diffusion"} <= set(card.data.tags)
    assert card.data.license == LICENSE  # every input shares it
    text = card.text
    from hubmix.methods import get_method

    assert get_method("lossless").formula in text and get_method("lossless").reference in text
    for sha in (hub.shas["a"], hub.shas["b_v1"], hub.shas["c"]):
        assert sha in text
    for m in recipe["models"]:
        for sha in m["files"].values():
            assert sha in text
    assert "| unet | lossless | a, b, c | alpha=1, beta=1 |" in text
    assert (out / "recipe.yaml").read_text().strip() in text  # the canonical recipe verbatim
    from hubmix.flow.result import recipe_from_card

    assert recipe_from_card(text) == recipe  # what reproduce reads when a repo has no recipe.yaml
    assert 'DiffusionPipeline.from_pretrained("user/merge")' in text
    assert "hubmix reproduce user/merge" in text
    info = hub.repos["user/merge"]
    assert info.private is False

    # 7: the pushed repo loads with diffusers through the same endpoint and runs
    from diffusers import DiffusionPipeline

    from hubmix.formats.tiny import run_pipeline

    pipe = DiffusionPipeline.from_pretrained("user/merge")
    images = run_pipeline(pipe, steps=2)
    assert images.shape == (1, 32, 32, 3) and float(abs(images).sum()) > 0


# ---- 2: selective downloads: components, variants, shards; offline from the cache ------------------------------

def test_only_needed_components_are_fetched(hub, tmp_path):
    import hubmix

    recipe = hubmix.Recipe(models=["org/a", "org/b@v1", "org/c/checkpoints/c.safetensors"], method="lossless",
                           components={"text_encoder": hubmix.recipe.ComponentRecipe(from_="a"),
                                       "vae": hubmix.recipe.ComponentRecipe(from_="a")})
    result = hubmix.merge(recipe, out=tmp_path / "unet-only", quiet=True)
    assert result.family.id == "sd1"  # b's family found without its text encoder and VAE weights
    b = hub.downloads("org/b")
    assert "unet/diffusion_pytorch_model.safetensors" in b
    assert "text_encoder/model.safetensors" not in b and "vae/diffusion_pytorch_model.safetensors" not in b
    assert result.canonical["models"][1]["files"] == {
        "unet/diffusion_pytorch_model.safetensors": hub.blobs("org/b", "v1")["unet/diffusion_pytorch_model.safetensors"].sha256}


def test_hub_inputs_take_the_sha256_the_hub_records(hub, tmp_path, monkeypatch):
    """The recipe's sha256 of a Hub file is the LFS sha256 of model_info(files_metadata) at the pinned commit:
    downloads are never hashed."""
    import dataclasses

    import hubmix
    import hubmix.hub.hashing as hashing
    from hubmix.hub import resolve

    def no_hashing(*args, **kwargs):
        raise AssertionError("a Hub download was hashed")

    monkeypatch.setattr(hashing, "file_sha256", no_hashing)
    monkeypatch.setattr(hashing, "sha256_of", no_hashing)
    monkeypatch.setattr(hashing, "_KNOWN", {})
    result = hubmix.merge(hubmix.Recipe(models=INPUTS, method="lossless"), out=tmp_path / "m", quiet=True)
    a, b, c = result.canonical["models"]
    for m, repo, rev in ((a, "org/a", "main"), (b, "org/b", "v1")):
        blobs = hub.blobs(repo, rev)
        assert m["files"] and m["files"] == {p: blobs[p].sha256 for p in m["files"]}
    assert c["files"] == {"c.safetensors": hub.blobs("org/c")["checkpoints/c.safetensors"].sha256}
    # taken from the metadata itself (not from the bytes or a file name): a doctored listing shows in the recipe
    real_pin = resolve.pin

    def doctored(repo, revision=None):
        state = real_pin(repo, revision)
        return dataclasses.replace(state, sha256={k: "f" * 64 for k in state.sha256})

    monkeypatch.setattr(resolve, "pin", doctored)
    again = hubmix.merge(hubmix.Recipe(models=["org/c/checkpoints/c.safetensors", "org/d"], method="weighted_sum"),
                         out=tmp_path / "m2.safetensors", quiet=True)
    assert [m["files"] for m in again.canonical["models"]] == [{"c.safetensors": "f" * 64}, {"d.safetensors": "f" * 64}]


def test_variant_and_shards(hub, tmp_path):
    import hubmix

    hubmix.merge(hubmix.Recipe(models=["org/v", "org/v@main"], method="weighted_sum", variant="fp16"),
                 out=tmp_path / "fp16", quiet=True)
    weights = [p for p in hub.downloads("org/v") if p.endswith(".safetensors")]
    assert sorted(weights) == ["text_encoder/model.fp16.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
                               "vae/diffusion_pytorch_model.fp16.safetensors"]
    assert (tmp_path / "fp16" / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert yaml.safe_load((tmp_path / "fp16" / "recipe.yaml").read_text())["variant"] == "fp16"

    from hubmix.flow.convert import convert

    convert("org/sharded", tmp_path / "sharded.safetensors", to="single-file", quiet=True)
    got = sorted(hub.downloads("org/sharded"))
    shards = sorted(p for p in hub.files("org/sharded") if "-of-" in p or p.endswith(".index.json"))
    assert len(shards) > 2 and set(shards) <= set(got)
    assert not [p for p in got if p.endswith(".safetensors") and p not in shards]


def test_config_from_a_hub_repo_fetches_no_weights(hub, tmp_path):
    import hubmix

    out = tmp_path / "from-singles"
    hubmix.merge(hubmix.Recipe(models=["org/c/checkpoints/c.safetensors", "org/d"], method="weighted_sum",
                               config_from="org/b@v1"), out=out, quiet=True)
    got = hub.downloads("org/b")
    assert "model_index.json" in got and "tokenizer/tokenizer.json" in got and "unet/config.json" in got
    assert not [p for p in got if p.endswith(".safetensors")]
    assert (out / "tokenizer" / "tokenizer.json").read_bytes() == hub.files("org/b", "v1")["tokenizer/tokenizer.json"]


def test_open_model_reads_only_the_components_asked(zoo, tmp_path):
    """model.open_model(components=...): components left out may lack weights; family detection still works."""
    import shutil

    from hubmix.errors import InputError
    from hubmix.formats.model import open_model

    for family in ("sd1", "sd2"):
        folder = tmp_path / family
        shutil.copytree(zoo.diffusers(family, 1), folder)
        (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
        (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
        m = open_model(folder, components={"text_encoder"})
        assert m.family.id == family and set(m.components) == {"text_encoder"}  # sd1 vs sd2: from the UNet config
        with pytest.raises(InputError, match="no weight file"):
            open_model(folder)


def test_offline_from_the_cache(hub, tmp_path, monkeypatch):
    import huggingface_hub

    import hubmix

    recipe = hubmix.Recipe(models=INPUTS, method="lossless")
    first = hubmix.merge(recipe, out=tmp_path / "online", quiet=True)
    hub.clear_log()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = hubmix.merge(hubmix.Recipe(models=INPUTS, method="lossless"), out=tmp_path / "offline", quiet=True)
    assert hub.requests == []
    assert again.canonical == first.canonical
    for f in first.files:
        rel = f.relative_to(tmp_path / "online")
        assert (tmp_path / "offline" / rel).read_bytes() == f.read_bytes(), rel


# ---- 3: errors, one line naming the repo ---------------------------------------------------------------------

def test_input_errors(hub, cli, tmp_path, monkeypatch):
    hub.repos.pop("org/secret", None), hub.repos.pop("org/gated", None), hub.repos.pop("org/empty", None)
    hub.repos.pop("org/two", None)
    hub.create_repo("org/secret", private=True)
    hub.commit("org/secret", {"model.safetensors": b"x"})
    hub.create_repo("org/gated", gated=True)
    hub.commit("org/gated", {"model.safetensors": b"x", "README.md": _card("other")})
    hub.create_repo("org/empty")
    hub.commit("org/empty", {"README.md": b"# nothing here\n"})
    hub.create_repo("org/two")
    hub.commit("org/two", {"x.safetensors": b"x", "sub/y.safetensors": b"y"})

    def merge(*refs):
        return cli("merge", *refs, "org/a", "-m", "weighted_sum", "--out", tmp_path / "out", "-q")

    assert_one_line_error(*merge("org/nope")[::2], "org/nope", "repository not found")
    assert_one_line_error(*merge("org/secret")[::2], "org/secret", "repository not found", "HF_TOKEN")
    assert_one_line_error(*merge("org/gated")[::2], "org/gated", "gated", "HF_TOKEN")
    monkeypatch.setenv("HF_TOKEN", OTHER)
    assert_one_line_error(*merge("org/gated")[::2], "org/gated", "gated", "not been granted")
    monkeypatch.delenv("HF_TOKEN")
    assert_one_line_error(*merge("org/a@nope")[::2], "org/a", "revision 'nope' not found")
    assert_one_line_error(*merge("org/c/checkpoints/missing.safetensors")[::2], "org/c",
                   "'checkpoints/missing.safetensors' not found", "checkpoints/c.safetensors")
    assert_one_line_error(*merge("org/empty")[::2], "org/empty", "no weights")
    assert_one_line_error(*merge("org/two")[::2], "org/two", "several weight files", "x.safetensors", "sub/y.safetensors")
    assert not (tmp_path / "out").exists()

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert_one_line_error(*merge("org/d")[::2], "org/d", "not in the local cache", "HF_HUB_OFFLINE")


def test_network_down(hub, tmp_path, monkeypatch, cli, caplog):
    """With the Hub unreachable, what was fetched before merges from the cache; anything else is a one-line error."""
    import hubmix

    recipe = hubmix.Recipe(models=["org/a", "org/c/checkpoints/c.safetensors"], method="weighted_sum")
    first = hubmix.merge(recipe, out=tmp_path / "up", quiet=True)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    configure_hf_client(monkeypatch, dead, tmp_path / "hf_home")  # same cache, unreachable Hub
    hub.clear_log()
    with caplog.at_level("WARNING", logger="hubmix"):
        again = hubmix.merge(hubmix.Recipe(models=["org/a", "org/c/checkpoints/c.safetensors"],
                                           method="weighted_sum"), out=tmp_path / "down", quiet=True)
    assert "org/a: the Hub cannot be reached; using the cached commit" in caplog.text
    assert again.canonical == first.canonical and hub.requests == []
    for f in first.files:
        assert (tmp_path / "down" / f.relative_to(tmp_path / "up")).read_bytes() == f.read_bytes()
    code, _, err = cli("merge", "org/a", "org/d", "-m", "weighted_sum", "--out", tmp_path / "z", "-q")
    assert_one_line_error(code, err, "org/d", "cannot reach the Hub", dead, "not in the local cache")


def test_push_errors(hub, cli, tmp_path, monkeypatch):
    import hubserver

    out = tmp_path / "m"
    code, _, err = cli("merge", "org/a", "org/d", "-m", "weighted_sum", "--out", out, "--push", "user/x", "-q")
    assert_one_line_error(code, err, "user/x", "needs a token", "HF_TOKEN")
    assert not out.exists()  # refused before any work
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    code, _, err = cli("merge", "org/a", "org/d", "-m", "weighted_sum", "--out", out, "--push", "someone/x", "-q")
    assert_one_line_error(code, err, "someone/x", "no permission")

    def refuse(self, hub_, repo, rev):
        raise ServerError(503, "commit service unavailable")

    monkeypatch.setattr(hubserver._Handler, "h_commit", refuse)
    code, _, err = cli("merge", "org/a", "org/d", "-m", "weighted_sum", "--out", tmp_path / "m2", "--push", "user/fail",
                       "-q")
    line = assert_one_line_error(code, err, "user/fail", "upload to main failed", "503", "nothing was committed",
                          "model_index.json", "created empty")
    assert TOKEN not in line
    assert list(hub.files("user/fail")) == [".gitattributes"] and len(hub.history("user/fail")) == 1


# ---- 4: push variants: default name, branch, PR, private, single file --------------------------------------------

def test_push_default_name_branch_pr_private(hub, token, cli, tmp_path):
    code, stdout, err = cli("merge", *INPUTS, "-m", "lossless", "--push", "--private", "-q")
    assert code == 0, err
    assert "user/a-b-c-lossless" in hub.repos and hub.repos["user/a-b-c-lossless"].private
    head = hub.resolve("user/a-b-c-lossless")
    assert stdout.strip() == f"{hub.url}/user/a-b-c-lossless/commit/{head}"
    assert "recipe.yaml" in hub.files("user/a-b-c-lossless")

    code, stdout, err = cli("merge", "org/a", "org/b@v1", "-m", "weighted_sum", "--alpha", "0.25", "--push",
                            "user/a-b-c-lossless", "--create-pr", "--commit-message", "try 0.25", "-q")
    assert code == 0, err
    assert hub.resolve("user/a-b-c-lossless") == head  # main untouched
    pr = hub.history("user/a-b-c-lossless", "refs/pr/1")[0]
    assert pr.title == "try 0.25" and stdout.strip().endswith(pr.oid)
    assert "weighted_sum" in hub.files("user/a-b-c-lossless", "refs/pr/1")["recipe.yaml"].decode()

    code, stdout, err = cli("merge", "org/a", "org/b@v1", "-m", "weighted_sum", "--push", "user/a-b-c-lossless",
                            "--branch", "dev", "-q")
    assert code == 0, err
    assert hub.resolve("user/a-b-c-lossless") == head
    assert stdout.strip().endswith(hub.resolve("user/a-b-c-lossless", "dev"))
    dev_card = hub.files("user/a-b-c-lossless", "dev")["README.md"].decode()
    assert "hubmix reproduce user/a-b-c-lossless@dev" in dev_card and 'revision="dev"' in dev_card

    # a single-file result: the file, its recipe and the card as README.md, nothing else
    out = tmp_path / "single.safetensors"
    code, stdout, err = cli("merge", "org/a", "org/d", "-m", "weighted_sum", "--out", out, "--push", "-q")
    assert code == 0, err
    assert sorted(hub.files("user/single")) == [".gitattributes", "README.md", "single.recipe.yaml",
                                                "single.safetensors"]
    assert "from_single_file" in hub.files("user/single")["README.md"].decode()
    code, stdout, err = cli("reproduce", "user/single", "-q")
    assert code == 0 and "all 2 files identical" in stdout, err + stdout


def test_license_not_shared(hub, token, cli, tmp_path):
    from huggingface_hub import ModelCard

    code, _, err = cli("merge", "org/a", "org/d", "-m", "weighted_sum", "--out", tmp_path / "ad", "--push",
                       "user/ad", "-q")
    assert code == 0, err
    warning = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(warning) == 1 and LICENSE in warning[0] and "mit" in warning[0] and "--license" in warning[0]
    assert ModelCard.load("user/ad").data.license is None
    code, _, err = cli("merge", "org/a", "org/d", "-m", "weighted_sum", "--out", tmp_path / "ad2", "--push",
                       "user/ad2", "--license", "mit", "-q")
    assert code == 0 and "warning" not in err
    assert ModelCard.load("user/ad2").data.license == "mit"


def test_card_command_for_a_local_result(zoo, cli, tmp_path):
    from huggingface_hub import ModelCard

    out = tmp_path / "local-merge"
    code, _, err = cli("merge", zoo.diffusers("sd1", 1), zoo.single("sd1", 2), "-m", "weighted_sum", "--out", out,
                       "-q")
    assert code == 0, err
    code, stdout, err = cli("card", out)
    assert code == 0 and stdout.strip() == str(out / "README.md")
    assert "unknown (local file)" in err and "--license" in err
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "diffusers" and card.data.base_model is None and card.data.license is None
    assert str(tmp_path) not in card.text and str(zoo.root) not in card.text
    assert "sd1-s1-fp32" in card.text and "sd1-s2-fp32.safetensors" in card.text  # local inputs by name
    assert "--model a=PATH/TO/sd1-s1-fp32 --model b=PATH/TO/sd1-s2-fp32.safetensors" in card.text
    code, _, err = cli("card", out, "--license", "mit", "--repo-id", "me/local-merge")
    assert code == 0 and not err
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "mit" and 'from_pretrained("me/local-merge")' in card.text
    assert "hubmix reproduce me/local-merge --model a=" in card.text


# ---- 6: reproduce --------------------------------------------------------------------------------------------

def test_reproduce_identical_then_changed_input(hub, token, cli, tmp_path, zoo):
    hub.repos.pop("org/moving", None)
    hub.create_repo("org/moving")
    hub.commit("org/moving", _folder_files(zoo.diffusers("sd1", 8)))
    refs = ["org/moving", "org/b@v1", "org/c/checkpoints/c.safetensors"]
    out = tmp_path / "repro"
    code, _, err = cli("merge", *refs, "-m", "lossless", "--beta", "1.1", "--out", out, "--push", "user/repro", "-q")
    assert code == 0, err

    code, stdout, err = cli("reproduce", "user/repro", "-q")
    assert code == 0, err + stdout
    assert "all 14 files identical" in stdout or stdout.strip().endswith("files identical"), stdout
    assert "DIFFERENT" not in stdout
    code, stdout, err = cli("reproduce", str(out), "-q")  # a local result folder
    assert code == 0 and "files identical" in stdout, err + stdout

    # a newer commit of an input: the pinned rebuild is still identical, --latest shows the difference
    newer = zoo.diffusers("sd1", 9) / "unet" / "diffusion_pytorch_model.safetensors"
    moved = hub.commit("org/moving", {"unet/diffusion_pytorch_model.safetensors": newer}, message="retrain")
    code, stdout, _ = cli("reproduce", "user/repro", "-q")
    assert code == 0
    code, stdout, err = cli("reproduce", "user/repro", "--latest", "-q")
    assert code == 1, err + stdout
    assert "input a: org/moving" in stdout and moved[:12] in stdout and "revision changed" in stdout
    assert "DIFFERENT  unet/diffusion_pytorch_model.safetensors" in stdout
    assert stdout.strip().splitlines()[-1].endswith("input a (org/moving) now resolves to another revision")
    code, stdout, _ = cli("reproduce", "user/repro", "--latest", "--json", "-q")
    report = json.loads(stdout)
    assert not report["identical"] and [i["changed"] for i in report["inputs"]] == [True, False, False]


def test_reproduce_needs_local_inputs(hub, token, cli, tmp_path, zoo):
    local = zoo.single("sd1", 2)
    code, _, err = cli("merge", "org/a", local, "-m", "weighted_sum", "--out", tmp_path / "mixed", "--push",
                       "user/mixed", "-q")
    assert code == 0, err
    code, _, err = cli("reproduce", "user/mixed", "-q")
    assert_one_line_error(code, err, "user/mixed", f"b ({local.name})", "--model")
    code, stdout, err = cli("reproduce", "user/mixed", "--model", f"b={local}", "-q")
    assert code == 0 and "files identical" in stdout, err + stdout


def test_a_hub_merge_on_spans_pushes_the_eager_bytes(hub, token, cli, tmp_path, monkeypatch):
    """Hub inputs merged with native kernels (on spans: no torch tensor) push the bytes the eager torch path
    writes, recipe included."""
    from hubmix.engine import native, pipeline

    if native.Native.library() is None:
        pytest.skip(f"no native kernels here: {native.Native.error()}")
    calls = []
    real = pipeline.compute_span
    monkeypatch.setattr(pipeline, "compute_span", lambda *a, **k: calls.append(1) or real(*a, **k))
    outs = {}
    for kind in ("native", "eager"):
        outs[kind] = tmp_path / kind
        args = ["merge", *INPUTS, "--method", "lossless", "--out", outs[kind], "-q", "--kernels", kind]
        code, _, err = cli(*args, *(["--push", "user/spans"] if kind == "native" else []))
        assert code == 0, err
        assert bool(calls) == (kind == "native"), kind  # the native merge ran on spans, the eager one did not
        calls.clear()
    weights = sorted(p.relative_to(outs["eager"]) for p in outs["eager"].rglob("*.safetensors"))
    assert weights
    pushed = hub.files("user/spans")
    for rel in weights:
        assert (outs["native"] / rel).read_bytes() == (outs["eager"] / rel).read_bytes(), rel
        assert pushed[rel.as_posix()] == (outs["native"] / rel).read_bytes(), rel
    assert yaml.safe_load(pushed["recipe.yaml"]) == yaml.safe_load((outs["eager"] / "recipe.yaml").read_text())
