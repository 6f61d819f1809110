"""Space sign-in without a real Space: the page built as a Space (`build(space=True)`) with the owner's token in the
environment, its handlers given the visitor's token the way Gradio injects it (`gradio.helpers.special_args` reads
the session's oauth_info into the `gr.OAuthToken` parameter), and the loopback Hub recording the Authorization
header of every request. The visitor's token does the work; the owner's never does, not even to read; a visitor
who has not signed in gets the one-line sign-in error and nothing reaches the Hub. Then the same over HTTP with
Gradio's own mocked sign-in (/login/callback outside a Space) and gradio_client."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import yaml

from hubserver import configure_hf_client, start_hub_server

pytest.importorskip("gradio")

OWNER, VISITOR = "hf_test_token_user", "hf_visitor"
MOCK = "mock-oauth-token-for-local-dev"  # the token Gradio's mocked sign-in puts in the session


@pytest.fixture
def space(monkeypatch, tmp_path, zoo):
    """(hub, demo, handlers by name, a merged result of the page's own) with the owner signed in on the machine."""
    server = start_hub_server(tokens={OWNER: "user", VISITOR: "visitor", MOCK: "mockvisitor"})
    configure_hf_client(monkeypatch, server.url, tmp_path / "hf_home")
    monkeypatch.setenv("HF_TOKEN", OWNER)
    monkeypatch.setenv("HUBMIX_UI_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("HUBMIX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    server.create_repo("user/secret", private=True)  # the owner's private model: no visitor may read it
    single = zoo.single("sd1", 1)
    server.commit("user/secret", {"model.safetensors": single.read_bytes()})
    from hubmix.ui import actions
    from hubmix.ui.app import build

    text = yaml.safe_dump({"models": [str(zoo.diffusers("sd1", 1)), str(zoo.diffusers("sd1", 2))],
                           "method": "weighted_sum"})
    result = actions.merge(text)["output"]  # merged on the machine: the fixture's, not a visitor's, work
    demo = build(space=True)
    handlers = {f.name: f.fn for f in demo.fns.values()}
    server.clear_log()
    yield server, demo, handlers, result
    server.stop()
    assert server.errors == []


def _as(fn, inputs: list, token: str | None):
    """Call a handler as Gradio does: special_args fills its gr.OAuthToken from the request's session."""
    from gradio.helpers import special_args

    session = {"oauth_info": {"access_token": token, "scope": "openid profile read-repos write-repos jobs",
                              "expires_at": int(time.time()) + 3600}} if token else {}
    args, *_ = special_args(fn, list(inputs), SimpleNamespace(session=session, session_hash="s"))
    return fn(*args)


def _auth(hub) -> list[str | None]:
    """The Authorization header of each request (LFS uploads go to presigned URLs without one, as on the Hub)."""
    return [r.headers.get("authorization") for r in hub.requests if r.route not in ("lfs_upload", "lfs_verify")]


def test_the_visitor_token_does_the_work_and_the_owner_token_never(space):
    hub, _, h, result = space
    card = _as(h["on_card"], [result, ""], VISITOR)
    assert "weighted_sum" in card
    url = _as(h["on_push"], [result, "", False, ""], VISITOR)  # no repo named: the visitor's namespace
    assert f"{hub.url}/visitor/merged/commit/" in url and "README.md" in hub.files("visitor/merged")
    url = _as(h["push"], [result, "visitor/by-api", False], VISITOR)  # the named endpoint, the same way
    assert "/visitor/by-api/commit/" in url
    rows = _as(h["on_check"], ["user/secret"], VISITOR)[0]  # reading, too, is the visitor's
    assert rows[0][0] == "user/secret" and rows[0][1].startswith("error:")
    _as(h["on_suggest"], ["visitor/by"], VISITOR)  # the Hub search as well
    auth = _auth(hub)
    assert set(auth) == {f"Bearer {VISITOR}"}
    routes = {r.route for r in hub.requests}
    assert {"commit", "list_models", "whoami"} <= routes


def test_a_visitor_who_has_not_signed_in_gets_one_line_and_no_owner_token(space):
    import gradio as gr

    hub, _, h, result = space
    for name, inputs in [("on_push", [result, "user/x", False, ""]), ("on_card", [result, ""]),
                         ("on_dry", ["models: [org/a, org/b]\nmethod: weighted_sum\n"]),
                         ("push", [result, "", False]), ("merge", ["models: [a, b]\nmethod: weighted_sum\n", ""])]:
        with pytest.raises(gr.Error) as e:
            _as(h[name], inputs, None)
        assert e.value.message == ("sign in with your Hugging Face account first (the button at the top of the "
                                   "page)"), name
    assert hub.requests == []  # nothing was tried with anyone's token
    rows = _as(h["on_check"], ["user/secret"], None)[0]  # reading public models needs no sign-in: no token at all
    assert rows[0][1].startswith("error:")
    _as(h["on_suggest"], ["user/sec"], None)
    assert hub.requests and _auth(hub) == [None] * len(hub.requests)
    assert f"Bearer {OWNER}" not in _auth(hub)


def test_signed_in_over_http_with_gradios_mocked_login(space, monkeypatch):
    """The page served as a Space: Gradio's mocked /login/callback puts an OAuth token in the session cookie;
    gradio_client with that cookie pushes as that visitor, without it gets the sign-in error."""
    import httpx
    from gradio_client import Client
    from gradio_client.exceptions import AppError
    from ui_helpers import free_port

    import gradio.oauth

    hub, demo, _, result = space
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    # Gradio's mocked sign-in hands out a fixed mock token from 6.x-late on, but the local machine's own token (here
    # the owner's) in 6.1: make every version's mock a distinct visitor, so the test tells the two tokens apart
    mocked = gradio.oauth._get_mocked_oauth_info
    monkeypatch.setattr(gradio.oauth, "_get_mocked_oauth_info", lambda: {**mocked(), "access_token": MOCK})
    demo.queue(default_concurrency_limit=1)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False)
    try:
        url = f"http://127.0.0.1:{port}/"
        r = httpx.get(url + "login/callback", follow_redirects=False)
        cookie = r.headers["set-cookie"].split(";")[0]  # Secure: httpx would not send it over http by itself
        assert cookie.startswith("session=")
        hub.clear_log()
        signed = Client(url, headers={"Cookie": cookie}, verbose=False)
        commit = signed.predict(result, "mockvisitor/over-http", False, api_name="/push")
        assert "/mockvisitor/over-http/commit/" in commit
        assert set(_auth(hub)) == {f"Bearer {MOCK}"}
        hub.clear_log()
        with pytest.raises(AppError, match="sign in with your Hugging Face account first"):
            Client(url, verbose=False).predict(result, "", False, api_name="/push")
        assert hub.requests == []
    finally:
        demo.close()
