"""Push a result that is already written (a merge from earlier, the web UI's Push after its Merge): the card
previewed, then written and pushed in one commit, as `hubmix merge --push` does right after a merge."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def push_name(path: str | Path) -> str:
    """The repo name a result at `path` is pushed under when no name is given (as `merge --push`: the output's)."""
    p = Path(path)
    return p.stem if p.suffix == ".safetensors" else p.name


def card_preview(path: str | Path, repo_id: str | None = None, *, license: str | None = None,
                 branch: str | None = None) -> str:
    """The model card (markdown) a push of the result at `path` would upload; writes nothing."""
    from hubmix.hub.card import build_card, load_result

    return build_card(load_result(path), repo_id=repo_id or None, license=license, revision=branch).text


def push_result(path: str | Path, repo_id: str | None = None, *, private: bool = False, branch: str | None = None,
                create_pr: bool = False, license: str | None = None, commit_message: str | None = None) -> Any:
    """Write the card of the result at `path` and push both in one commit to `repo_id` (`org/name`, a bare name in
    the token owner's namespace, or None: the result's own name there); returns hub.push.PushResult."""
    from hubmix.errors import InputError
    from hubmix.hub.card import write_card
    from hubmix.hub.push import push, push_target

    p = Path(path)
    if not str(path).strip() or not p.exists():
        raise InputError(f"{path}: no such result to push (merge first)")
    target = push_target(repo_id or None, push_name(p))
    card = write_card(p, repo_id=target, license=license, revision=branch)
    return push(p, target, card, private=private, branch=branch or None, create_pr=create_pr,
                commit_message=commit_message)


__all__ = ["card_preview", "push_result", "push_name"]
