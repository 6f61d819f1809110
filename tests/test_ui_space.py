"""`hubmix ui --space`: the Space files pushed to the loopback Hub (front matter with sdk gradio and the OAuth scopes,
the wheel of this hubmix pinned by URL at the commit that holds it, an app that builds the page with sign-in), and
a visitor's work done under the visitor's token alone."""

from __future__ import annotations

import io
import json
import zipfile

import pytest
import yaml

from conftest import run_cli
from hubserver import configure_hf_client, start_hub_server

TOKEN, OTHER = "hf_test_token_user", "hf_other"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    server = start_hub_server(tokens={TOKEN: "user", OTHER: "other"})
    configure_hf_client(monkeypatch, server.url, tmp_path / "hf_home")
    yield server
    server.stop()
    assert server.errors == []


def test_space_files_pinned_wheel_and_app(hub, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    code, out, err = run_cli("ui", "--space", "user/hubmix-ui")
    assert code == 0, err
    assert "user/hubmix-ui" in out and "/commit/" in out
    files = hub.files("user/hubmix-ui")
    front = yaml.safe_load(files["README.md"].decode().split("---")[1])
    assert front["sdk"] == "gradio" and front["hf_oauth"] is True and front["app_file"] == "app.py"
    assert set(front["hf_oauth_scopes"]) >= {"read-repos", "write-repos", "jobs"}
    req = files["requirements.txt"].decode().splitlines()
    pinned = [r for r in req if r.startswith("hubmix @ ")]
    assert len(pinned) == 1
    url = pinned[0].split(" @ ", 1)[1]
    prefix = f"{hub.url}/spaces/user/hubmix-ui/resolve/"
    assert url.startswith(prefix)
    commit, name = url[len(prefix):].split("/", 1)
    assert len(commit) == 40 and name.endswith("-py3-none-any.whl")
    wheel = hub.files("user/hubmix-ui", commit)[name]  # the wheel is in the commit the requirement pins
    assert files[name] == wheel
    import urllib.request

    with urllib.request.urlopen(url) as r:  # and the pinned URL serves it
        assert r.read() == wheel
    with zipfile.ZipFile(io.BytesIO(wheel)) as z:
        names = z.namelist()
        assert "hubmix/ui/app.py" in names and "hubmix/formats/families/sd1.yaml" in names
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        assert "Name: hubmix" in z.read(meta).decode()
    import subprocess
    import sys

    (tmp_path / "req.txt").write_text(pinned[0] + "\n")  # pip installs exactly that wheel from the pinned URL
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--no-cache-dir",
                           "--target", str(tmp_path / "site"), "-r", str(tmp_path / "req.txt")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    from hubmix import __version__

    record = next((tmp_path / "site").glob("hubmix-*.dist-info"))
    assert record.name == f"hubmix-{__version__}.dist-info"
    with zipfile.ZipFile(io.BytesIO(wheel)) as z:
        assert (tmp_path / "site/hubmix/ui/search.py").read_bytes() == z.read("hubmix/ui/search.py")
    from hubmix.ui.space import wheel as build_wheel

    assert build_wheel()[1] == wheel  # reproducible: the same bytes again
    # the app builds the page with the sign-in button
    pytest.importorskip("gradio")
    scope: dict = {"__name__": "space_app"}
    exec(compile(files["app.py"].decode(), "app.py", "exec"), scope)
    demo = scope["demo"]
    assert any(type(b).__name__ == "LoginButton" for b in demo.blocks.values())


def test_a_visitor_works_under_their_own_token_only(hub, monkeypatch, zoo, tmp_path):
    """The Space owner's token is in the environment; the visitor's push lands in the visitor's namespace."""
    from hubmix.ui import actions
    from hubmix.ui.visitor import as_visitor, visitor_env
    from hubmix.ui import UIError

    monkeypatch.setenv("HF_TOKEN", TOKEN)  # the owner's
    monkeypatch.setenv("HUBMIX_UI_DIR", str(tmp_path / "work"))
    env = visitor_env(OTHER)
    assert env["HF_TOKEN"] == OTHER and TOKEN not in json.dumps(env)
    with pytest.raises(UIError, match="sign in"):
        as_visitor(None, "push", "x", "y", False)
    text = yaml.safe_dump({"models": [str(zoo.diffusers("sd1", 1)), str(zoo.diffusers("sd1", 2))],
                           "method": "weighted_sum"})
    out = actions.merge(text)["output"]  # a fresh folder of the page's own
    url = as_visitor(OTHER, "push", out, "", False)  # no repo named: the visitor's namespace
    assert "/other/merged/commit/" in url
    assert "README.md" in hub.files("other/merged")
    with pytest.raises(UIError, match="user/m"):  # the visitor cannot write where only the owner can
        as_visitor(OTHER, "push", out, "user/m", False)
    elsewhere = actions.merge(text, str(tmp_path / "m"))["output"]  # not the page's: a visitor cannot push it
    with pytest.raises(UIError, match="not a result of this page"):
        as_visitor(OTHER, "push", elsewhere, "", False)
