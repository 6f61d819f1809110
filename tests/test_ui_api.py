"""The web UI's named API endpoints, called with gradio_client against the page served on loopback: each takes the
recipe YAML (the form's contract) and gives what the CLI gives for the same recipe (the merge byte for byte)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import run_cli
from ui_helpers import recipe_yaml, tree_bytes, ui_server  # noqa: F401  (fixture)

pytest.importorskip("gradio_client")


@pytest.fixture(scope="module")
def client(ui_server):  # noqa: F811
    from gradio_client import Client

    return Client(ui_server[0], verbose=False)


def test_recipe_endpoint_is_the_recipe_the_cli_would_save(client, zoo, tmp_path):
    a, b = zoo.single("sd1", 1), zoo.single("sd1", 2)
    text = client.predict(f"{a}\n{b}\n", "add_difference" if False else "weighted_sum", json.dumps({"alpha": 0.3}),
                          api_name="/recipe")
    code, _, err = run_cli("merge", a, b, "--method", "weighted_sum", "--alpha", "0.3", "--dry", "-q",
                           "--save-recipe", tmp_path / "r.yaml")
    assert yaml.safe_load(text) == {"models": [str(a), str(b)], "method": "weighted_sum", "params": {"alpha": 0.3}}
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="alpha=7.0 is outside"):
        client.predict(f"{a}\n{b}", "weighted_sum", '{"alpha": 7}', api_name="/recipe")


def test_dry_run_endpoint_equals_the_cli_json(client, zoo):
    text = recipe_yaml(zoo, alpha=0.25)
    got = client.predict(text, api_name="/dry_run")
    a, b = zoo.diffusers("sd1", 1), zoo.diffusers("sd1", 2)
    code, out, err = run_cli("merge", a, b, "--method", "weighted_sum", "--alpha", "0.25", "--dry", "--json")
    assert code == 0, err
    want = json.loads(out)
    assert _close(got["report"], want["report"]) and got["family"] == want["family"] == "sd1"
    assert got["models"] == want["models"]


def _close(x, y) -> bool:
    """Equal structure, numbers equal to 1e-6 (the statistics' float64 sums follow the threads' chunk order)."""
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(_close(x[k], y[k]) for k in x)
    if isinstance(x, float) and isinstance(y, float):
        return x == pytest.approx(y, rel=1e-6, abs=1e-9)
    return x == y


def test_merge_endpoint_gives_the_cli_bytes(client, zoo, tmp_path):
    text = recipe_yaml(zoo, alpha=0.4)
    (tmp_path / "r.yaml").write_text(text)
    code, _, err = run_cli("merge", "--recipe", tmp_path / "r.yaml", "--out", tmp_path / "cli", "-q")
    assert code == 0, err
    info = client.predict(text, str(tmp_path / "ui"), api_name="/merge")
    assert info["output"] == str(tmp_path / "ui") and info["layout"] == "diffusers"
    assert tree_bytes(tmp_path / "ui") == tree_bytes(tmp_path / "cli")
    jobs = [client.submit(text, "", api_name="/merge") for _ in range(2)]  # two at once, no output given: queued,
    blank, again = [j.result() for j in jobs]  # each into a fresh folder of its own
    assert blank["output"] != again["output"]
    assert tree_bytes(Path(blank["output"])) == tree_bytes(tmp_path / "cli")


def test_errors_are_the_cli_one_line_messages_and_nothing_is_written(client, zoo, tmp_path):
    from gradio_client.exceptions import AppError

    text = yaml.safe_dump({"models": [str(zoo.diffusers("sd1", 1)), str(tmp_path / "nope.safetensors")],
                           "method": "weighted_sum"})
    with pytest.raises(AppError, match="nope.safetensors: no such file or folder"):
        client.predict(text, str(tmp_path / "out"), api_name="/merge")
    assert not (tmp_path / "out").exists()
    with pytest.raises(AppError, match="'models' and 'method' are required"):
        client.predict("models: []", api_name="/dry_run")


def test_samples_and_sweep_endpoints_give_grids(client, zoo):
    from PIL import Image

    text = recipe_yaml(zoo, alpha=0.5)
    grid = client.predict(text, "a dog", "0", 1, "32x32", api_name="/samples")
    with Image.open(grid) as im:  # three rows (a, b, merged) of one 32px image each, with captions
        assert im.width >= 32 and im.height >= 3 * 32
    sweep = client.predict(recipe_yaml(zoo), "alpha=0.2,0.8", "a dog", "0", 1, "32x32", api_name="/sweep")
    with Image.open(sweep) as im:
        assert im.width >= 32 and im.height >= 2 * 32


def test_push_endpoint_commits_with_the_card(client, ui_server, zoo, tmp_path):  # noqa: F811
    _, hub, _ = ui_server
    info = client.predict(recipe_yaml(zoo, alpha=0.6), str(tmp_path / "m"), api_name="/merge")
    url = client.predict(info["output"], "user/ui-merge", False, api_name="/push")
    sha = url.rstrip("/").rsplit("/", 1)[-1]
    assert "user/ui-merge" in url and len(sha) == 40
    files = hub.files("user/ui-merge")
    assert "README.md" in files and "unet/diffusion_pytorch_model.safetensors" in files
    card = files["README.md"].decode()
    assert "weighted_sum" in card and info["recipe_sha256"] in card
