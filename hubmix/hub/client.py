"""The Hub client hubmix uses everywhere, and the translation of huggingface_hub's exceptions into one-line
HubErrors that name the repo. huggingface_hub is imported inside the functions, so importing hubmix costs nothing."""

from __future__ import annotations

from typing import Any

from hubmix import __version__
from hubmix.errors import HubError

LOGIN_HINT = "log in with `hf auth login` or set HF_TOKEN"


def api():
    from huggingface_hub import HfApi

    return HfApi(library_name="hubmix", library_version=__version__)  # endpoint and token: the usual sources


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def has_token() -> bool:
    from huggingface_hub import get_token

    return get_token() is not None


def one_line(text: Any, limit: int = 200) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[:limit - 3] + "..."


def is_offline(e: BaseException) -> bool:
    from huggingface_hub.errors import OfflineModeIsEnabled

    return isinstance(e, OfflineModeIsEnabled)


def is_network(e: BaseException) -> bool:
    """A connection that failed (DNS, refused, timeout, proxy), as opposed to an answer from the Hub."""
    from huggingface_hub.errors import HfHubHTTPError

    if is_offline(e):
        return False  # HF_HUB_OFFLINE: no connection was tried
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, HfHubHTTPError):
            return False
        names = {c.__name__ for c in type(e).__mro__}
        if names & {"TransportError", "NetworkError", "TimeoutException", "ConnectionError", "TimeoutError"}:
            return True
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return False


def http_answer(e: BaseException) -> tuple[Any, str] | None:
    """(status, message) of the HTTP error behind `e` (itself or a cause), or None when no answer came."""
    from huggingface_hub.errors import HfHubHTTPError

    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, HfHubHTTPError):
            status = e.response.status_code if e.response is not None else "?"
            return status, getattr(e, "server_message", None) or str(e).splitlines()[0]
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return None


def hub_error(e: BaseException, repo: str, *, revision: str | None = None, filename: str | None = None,
              action: str = "") -> HubError:
    """The one-line HubError for a huggingface_hub exception about `repo`."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = f" ({action})" if action else ""
    at = f" at revision '{revision}'" if revision else ""
    if isinstance(e, GatedRepoError):
        if has_token():
            return HubError(f"{repo}: gated repository, and your account has not been granted access; request it at "
                            f"{endpoint()}/{repo}")
        return HubError(f"{repo}: gated repository: accept its conditions at {endpoint()}/{repo}, then "
                        f"{LOGIN_HINT}")
    if isinstance(e, RepositoryNotFoundError):
        if has_token():
            return HubError(f"{repo}: repository not found on {endpoint()} (or private and not visible to your "
                            "account)")
        return HubError(f"{repo}: repository not found on {endpoint()} (if it is private or gated: {LOGIN_HINT})")
    if isinstance(e, RevisionNotFoundError):
        return HubError(f"{repo}: revision '{revision or 'main'}' not found (give a branch, a tag or a commit sha)")
    answer = http_answer(e)
    if isinstance(e, LocalEntryNotFoundError) and answer is not None and not offline_mode():
        status, msg = answer  # the Hub answered (a 5xx after huggingface_hub's retries): say what it said
        return HubError(f"{repo}: the Hub at {endpoint()} answered HTTP {status} for {filename or 'the repo'}{at}: "
                        f"{one_line(msg, 120)} (not in the local cache either; try again later)")
    if isinstance(e, LocalEntryNotFoundError) or is_offline(e):
        mode = "HF_HUB_OFFLINE is set" if offline_mode() else f"the Hub at {endpoint()} cannot be reached"
        return HubError(f"{repo}: {filename or 'the repo'}{at} is not in the local cache and {mode}; run once with "
                        "network access")
    if isinstance(e, EntryNotFoundError):
        return HubError(f"{repo}: file '{filename}' not found{at}")
    if is_network(e):
        return HubError(f"{repo}: cannot reach the Hub at {endpoint()} (network down?){what}: {one_line(e, 120)}")
    if isinstance(e, HfHubHTTPError):
        status = e.response.status_code if e.response is not None else "?"
        msg = getattr(e, "server_message", None) or str(e).splitlines()[0]
        if status == 401:
            return HubError(f"{repo}: the Hub refused the token (HTTP 401: {one_line(msg, 120)}); {LOGIN_HINT}")
        if status == 403:
            return HubError(f"{repo}: no permission{what} (HTTP 403: {one_line(msg, 120)})")
        return HubError(f"{repo}: the Hub answered HTTP {status}{what}: {one_line(msg, 160)}")
    return HubError(f"{repo}: {type(e).__name__}{what}: {one_line(e, 160)}")


def offline_mode() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)
