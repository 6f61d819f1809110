"""`hubmix ui`: a Gradio page over the library, a client of it like the CLI (hubmix.ui.app builds the page,
hubmix.ui.actions holds what its buttons and named API endpoints do, hubmix.ui.form the form <-> recipe round trip,
hubmix.ui.space the Hugging Face Space files). Gradio is imported only when the page is built: `pip install
'hubmix[ui]'`."""

from __future__ import annotations

from hubmix.errors import HubmixError


class UIError(HubmixError):
    """The web UI cannot start (Gradio missing) or a Space cannot be written."""


def require_gradio():
    """Import gradio, or a one-line UIError that says how to install it."""
    try:
        import gradio
    except ImportError:
        raise UIError("the web UI needs Gradio: pip install 'hubmix[ui]' (or pip install 'gradio>=5')") from None
    return gradio


__all__ = ["UIError", "require_gradio"]
