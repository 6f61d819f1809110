"""The web UI served in this process on a free loopback port, against the seeded loopback Hub (tests/hubserver.py),
for the gradio_client and browser tests."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

TOKEN = "hf_test_token_user"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ui_server(zoo, tmp_path_factory):
    """(url, hub server, work folder): the page served with HF_TOKEN for the loopback Hub, seeded like test_hub."""
    pytest.importorskip("gradio", reason="the web UI needs gradio: pip install -e '.[ui]'")
    from hubserver import configure_hf_client, start_hub_server
    from test_hub import seed_repos

    mp = pytest.MonkeyPatch()
    hub = start_hub_server(tokens={TOKEN: "user"})
    hub.shas = seed_repos(hub, zoo)
    root = tmp_path_factory.mktemp("ui")
    configure_hf_client(mp, hub.url, root / "hf_home")
    mp.setenv("HF_TOKEN", TOKEN)
    mp.setenv("HUBMIX_CACHE", str(root / "hubmix-cache"))
    mp.setenv("HUBMIX_UI_DIR", str(root / "work"))
    mp.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    mp.setenv("NO_PROXY", "127.0.0.1,localhost")
    from hubmix.ui.app import launch

    port = free_port()
    demo = launch("127.0.0.1", port, block=False)
    try:
        yield f"http://127.0.0.1:{port}/", hub, root
    finally:
        demo.close()
        hub.stop()
        mp.undo()


def recipe_yaml(zoo, method: str = "weighted_sum", **params) -> str:
    import yaml

    models = [str(zoo.diffusers("sd1", 1)), str(zoo.diffusers("sd1", 2))]
    return yaml.safe_dump({"models": models, "method": method, **({"params": params} if params else {})},
                          sort_keys=False)


def tree_bytes(path: Path) -> dict[str, bytes]:
    path = Path(path)
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


__all__ = ["ui_server", "recipe_yaml", "tree_bytes", "free_port", "TOKEN", "os"]
