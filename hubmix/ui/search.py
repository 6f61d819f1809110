"""Hub model search for the Models box: the line being typed (the box's last line) is looked up with the Hub's model
search (HfApi.list_models), restricted to the Hub's `diffusers` tag (the library the Hub gives repos with a
model_index.json or a card naming it) and ordered by downloads; picking a suggestion replaces the typed line with
the full id. Only a line that can still become a Hub id is searched (not a path, a revision or a file in a repo)."""

from __future__ import annotations

MIN_CHARS = 2  # one character matches half the Hub
LIMIT = 8
TAG = "diffusers"


def query_of(text: str | None) -> str | None:
    """The reference being typed when it may be a partial Hub id (`stabilityai/sdxl`, `sdxl`), else None."""
    line = (text or "").split("\n")[-1].strip()
    if len(line) < MIN_CHARS or line.startswith(("#", "/", ".", "~")) or line.count("/") > 1:
        return None
    if any(c in line for c in "@:\\ ") or line.endswith((".safetensors", ".ckpt", ".gguf", ".bin")):
        return None
    return line


def search_models(query: str, *, limit: int = LIMIT, token: str | bool | None = None) -> list[str]:
    """Ids of the Hub's diffusers models whose id contains `query`, most downloaded first (`token`: None the usual
    sources, False none at all, a string that token)."""
    from hubmix.hub.client import api, hub_error

    try:
        return [m.id for m in api().list_models(search=query, filter=TAG, sort="downloads", limit=limit,
                                                token=token)]
    except Exception as e:  # noqa: BLE001 - the client's errors, as one line
        raise hub_error(e, query, action="searching the Hub") from None


def suggest(text: str | None, *, limit: int = LIMIT, token: str | bool | None = None) -> list[str]:
    """Suggestions for the Models box's current line (none when it is not a partial Hub id, or is one already)."""
    query = query_of(text)
    if query is None:
        return []
    found = search_models(query, limit=limit, token=token)
    return [] if found == [query] else found


def pick(text: str | None, ref: str) -> str:
    """The Models box after picking `ref`: the typed line replaced by it, and a fresh line to type the next."""
    lines = (text or "").split("\n")
    lines[-1] = ref
    return "\n".join(lines) + "\n"


__all__ = ["query_of", "search_models", "suggest", "pick", "TAG", "LIMIT"]
