"""A Space visitor's work, under the visitor's token only: the action runs in a child process whose environment
holds the visitor's OAuth token as HF_TOKEN and none of the Space owner's (HF_TOKEN, HUGGING_FACE_HUB_TOKEN and the
stored login are out of its reach), so nothing the owner can do is done for a visitor, and no token reaches the
page (the child answers with the action's JSON result or its one-line error)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from hubmix.errors import HubmixError
from hubmix.ui import UIError

TOKEN_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_API_TOKEN", "HF_TOKEN_PATH", "HF_STORED_TOKENS_PATH")
# action -> the module that holds it; READ_ONLY ones also run for a visitor who has not signed in (with no token)
ACTIONS = {**dict.fromkeys(("dry_run", "samples", "sweep", "card", "push", "remote", "recipe", "flavors"),
                           "hubmix.ui.actions"), "describe_models": "hubmix.ui.form"}
LOCAL = {**ACTIONS, "merge": "hubmix.ui.actions"}  # locally also a merge here (in a Space: a Job, "remote")
READ_ONLY = ("describe_models", "flavors", "recipe")
RESULTS = ("card", "push")  # their first argument is a result path: only the page's own results may be pushed


def visitor_env(token: str | None) -> dict[str, str]:
    """The child's environment: the owner's tokens removed, the visitor's set (None: no token at all), no stored
    login to fall back on."""
    env = {k: v for k, v in os.environ.items() if k not in TOKEN_VARS}
    empty = tempfile.mkdtemp(prefix="hubmix-visitor-")
    env.update(HF_TOKEN_PATH=str(Path(empty) / "token"), HF_STORED_TOKENS_PATH=str(Path(empty) / "stored_tokens"))
    if token:
        env["HF_TOKEN"] = token
    return env


def token_of(oauth: Any) -> str | None:
    """The visitor's access token from the `gr.OAuthToken` Gradio injects (None: not signed in)."""
    return getattr(oauth, "token", None) or None


def act(space: bool, oauth: Any, action: str, *args: Any) -> Any:
    """What a button or endpoint runs: locally in this process (the local token, as the CLI); in a Space in a
    child process under the visitor's OAuth token alone (`oauth`: the gr.OAuthToken Gradio injects)."""
    if space:
        return as_visitor(token_of(oauth), action, *args)
    import importlib

    return getattr(importlib.import_module(LOCAL[action]), action)(*args)


def _inside_work(action: str, args: tuple) -> None:
    from hubmix.ui.actions import work_root

    path = Path(str(args[0] if args else "")).resolve()
    if not path.is_relative_to(work_root().resolve()):
        raise UIError(f"{args[0] if args else 'result'}: not a result of this page ({action} takes the page's own "
                      "merges only)")


def as_visitor(token: str | None, action: str, *args: Any) -> Any:
    """<action>(*args) (ACTIONS) run under `token` alone; its HubmixError comes back as a UIError line."""
    if action not in ACTIONS:
        raise UIError(f"{action}: not an action a visitor can run")
    if not token and action not in READ_ONLY:
        raise UIError("sign in with your Hugging Face account first (the button at the top of the page)")
    if action in RESULTS:
        _inside_work(action, args)
    proc = subprocess.run([sys.executable, "-m", "hubmix.ui.visitor", action], input=json.dumps(list(args)),
                          capture_output=True, text=True, env=visitor_env(token))
    lines = proc.stdout.strip().splitlines()
    try:
        answer = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UIError(f"{action}: the visitor's process failed ({tail[:200]})") from None
    if "error" in answer:
        raise UIError(answer["error"])
    return answer["ok"]


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def main(action: str) -> None:
    import importlib

    args = json.loads(sys.stdin.read() or "[]")
    try:
        result = getattr(importlib.import_module(ACTIONS[action]), action)(*args)
        print(json.dumps({"ok": _plain(result)}))
    except HubmixError as e:
        print(json.dumps({"error": str(e)}))


if __name__ == "__main__":
    main(sys.argv[1])
