"""Everything that talks to the Hugging Face Hub: model references (`refs`), the client and its one-line errors
(`client`), resolving inputs to pinned local files (`resolve`), input sha256s (`hashing`), the model card (`card`),
the one-commit push (`push`), remote jobs (`jobs`, `remote`) and `reproduce`, which reruns a result's recipe. Only
`reproduce` imports the merge flow; `publish` writes a result's card and pushes it."""

from __future__ import annotations

from pathlib import Path


def publish(path: str | Path, repo_id: str | None = None, *, private: bool = False, branch: str | None = None,
            create_pr: bool = False, commit_message: str | None = None, license: str | None = None):
    """Write the model card of the hubmix result at `path` for its repo, then push both in one commit. `repo_id`
    None: the token owner's namespace, under the folder's (or file's) name. Returns a `push.PushResult`."""
    from hubmix.hub.card import write_card
    from hubmix.hub.push import push, push_target

    path = Path(path)
    target = push_target(repo_id, path.stem if path.is_file() else path.name)
    card = write_card(path, repo_id=target, license=license, revision=branch)
    return push(path, target, card, private=private, branch=branch, create_pr=create_pr,
                commit_message=commit_message)


__all__ = ["publish"]
