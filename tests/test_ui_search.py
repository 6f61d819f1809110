"""Hub model search for the Models box, at the function level: huggingface_hub's own client (HfApi.list_models)
parses the loopback Hub's `GET /api/models` answer; only the Hub's diffusers models whose id holds the typed text
come back, private ones only to their owner, and only a line that may still become a Hub id is searched."""

from __future__ import annotations

import pytest

from hubserver import configure_hf_client, start_hub_server

TOKEN, OTHER = "hf_test_token_user", "hf_other"
DIFFUSERS = b"---\nlibrary_name: diffusers\npipeline_tag: text-to-image\n---\n"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    server = start_hub_server(tokens={TOKEN: "user", OTHER: "other"})
    configure_hf_client(monkeypatch, server.url, tmp_path / "hf_home")
    for repo, card, private in [("org/sdxl-base", DIFFUSERS, False), ("org/sdxl-turbo", DIFFUSERS, False),
                                ("org/sdxl-tagger", b"---\nlibrary_name: transformers\n---\n", False),
                                ("org/flux-dev", DIFFUSERS, False), ("user/sdxl-mine", DIFFUSERS, True)]:
        server.create_repo(repo, private=private)
        server.commit(repo, {"README.md": card})
    for i in range(12):  # more matches than one page of suggestions
        server.create_repo(f"many/sdxl-{i:02d}")
        server.commit(f"many/sdxl-{i:02d}", {"README.md": DIFFUSERS})
    yield server
    server.stop()
    assert server.errors == []


def test_the_hub_client_parses_the_loopback_search(hub, monkeypatch):
    from huggingface_hub import HfApi

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    found = list(HfApi(endpoint=hub.url).list_models(search="SDXL-", filter="diffusers", sort="downloads", limit=30))
    ids = [m.id for m in found]
    assert set(ids) == {"org/sdxl-base", "org/sdxl-turbo", "user/sdxl-mine"} | {f"many/sdxl-{i:02d}" for i in range(12)}
    first = next(m for m in found if m.id == "org/sdxl-base")
    assert first.library_name == "diffusers" and first.pipeline_tag == "text-to-image" and "diffusers" in first.tags
    assert first.downloads == 0 and first.private is False and first.siblings is None  # the short entry
    req = [r for r in hub.requests if r.route == "list_models"][-1]
    assert req.query["search"] == ["SDXL-"] and req.query["filter"] == ["diffusers"]
    unfiltered = [m.id for m in HfApi(endpoint=hub.url).list_models(search="sdxl-", limit=5)]
    assert unfiltered == sorted(ids + ["org/sdxl-tagger"])[:5]  # equal downloads: by id


def test_suggestions_are_diffusers_models_the_visitor_may_see(hub, monkeypatch):
    from hubmix.ui.search import LIMIT, search_models, suggest

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    got = suggest("org/a\norg/sdxl")
    assert got == ["org/sdxl-base", "org/sdxl-turbo"]  # not the transformers tagger
    assert suggest("sdxl-mi") == ["user/sdxl-mine"]  # the owner sees their private repo
    assert search_models("sdxl-mi", token=False) == [] and search_models("sdxl-mi", token=OTHER) == []
    assert len(suggest("many/sdxl")) == LIMIT
    calls = [r for r in hub.requests if r.route == "list_models"]
    assert calls[-2].headers["authorization"] == f"Bearer {OTHER}"
    assert "authorization" not in calls[-3].headers  # token=False: anonymous, not the local token
    assert calls[-1].headers["authorization"] == f"Bearer {TOKEN}"  # None: the usual sources
    assert suggest("org/sdxl-base") == []  # typed in full already


@pytest.mark.parametrize("text,query", [
    ("", None), ("s", None), ("sd", "sd"), ("org/a\nstabilityai/sd", "stabilityai/sd"),
    ("org/a\n", None), ("org/a@v1", None), ("org/c/checkpoints/c.safetensors", None), ("./models/x", None),
    ("/abs/path", None), ("# a comment", None), ("C:\\models", None), ("a.safetensors", None),
])
def test_only_a_line_that_may_become_a_hub_id_is_searched(text, query):
    from hubmix.ui.search import query_of

    assert query_of(text) == query


def test_picking_a_suggestion_replaces_the_typed_line():
    from hubmix.ui.search import pick

    assert pick("org/a\norg/sd", "org/sdxl-base") == "org/a\norg/sdxl-base\n"
    assert pick("", "org/x") == "org/x\n"


def test_a_search_the_hub_refuses_is_one_line(hub, monkeypatch):
    from hubmix.errors import HubmixError
    from hubmix.ui.search import suggest

    hub.fail("list_models", 400)
    with pytest.raises(HubmixError) as e:
        suggest("sdxl", token=False)
    assert "\n" not in str(e.value) and "sdxl" in str(e.value)
