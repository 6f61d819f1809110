"""The page's named API endpoints (gradio_client: `Client(url).predict(..., api_name="/merge")`), each taking the
recipe YAML first, on hidden components. In a Space they run as the signed-in visitor (hubmix.ui.visitor.act with the
gr.OAuthToken Gradio injects; a caller without a session gets the one-line sign-in error), never as the owner."""

# no `from __future__ import annotations`: Gradio reads gr.OAuthToken from real annotations

import functools
from typing import Any

from hubmix.errors import HubmixError
from hubmix.ui.visitor import act


def errors(fn):
    """HubmixErrors -> gr.Error with the CLI's one-line message (the page shows it; API callers get it)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import gradio as gr

        try:
            return fn(*args, **kwargs)
        except HubmixError as e:
            raise gr.Error(str(e), print_exception=False) from None
    return wrapper


def endpoints(gr: Any, space: bool) -> None:
    """The named endpoints: dry_run, merge (in a Space: a Job under the visitor's account), samples, sweep, push,
    recipe."""
    with gr.Column(visible=False):
        y, o, j = gr.Textbox(), gr.Textbox(), gr.JSON()
        p, s, n, z, v, img = gr.Textbox(), gr.Textbox(), gr.Number(precision=0), gr.Textbox(), gr.Textbox(), \
            gr.Image(type="filepath")
        repo, priv, url, m, meth, pj = gr.Textbox(), gr.Checkbox(), gr.Textbox(), gr.Textbox(), gr.Textbox(), \
            gr.Textbox()
        b = gr.Button()
    Token = gr.OAuthToken | None  # noqa: N806

    def dry_run(t, oauth: Token):
        if space:
            return act(space, oauth, "dry_run", t)[0]
        from hubmix.ui import actions

        return actions.dry_run(t, plot=False)[0]

    def merge(t, out, oauth: Token):  # in a Space the merge is a Job of the visitor's, pushed to their namespace
        return act(space, oauth, "remote", t, "", None) if space else act(False, None, "merge", t, out or None)

    def samples(t, pr, sd, st, sz, oauth: Token):
        return str(act(space, oauth, "samples", t, pr, sd, st, sz)[0])

    def sweep(t, va, pr, sd, st, sz, oauth: Token):
        return str(act(space, oauth, "sweep", t, va, pr, sd, st, sz))

    def push(path, r, pv, oauth: Token):
        return act(space, oauth, "push", path, r, pv)

    def recipe(ms, me, ps):
        return act(False, None, "recipe", ms, me, ps)  # text only: nothing read from the Hub

    b.click(errors(dry_run), y, j, api_name="dry_run")
    b.click(errors(merge), [y, o], j, api_name="merge", concurrency_id="merge")
    b.click(errors(samples), [y, p, s, n, z], img, api_name="samples")
    b.click(errors(sweep), [y, v, p, s, n, z], img, api_name="sweep")
    b.click(errors(push), [o, repo, priv], url, api_name="push")
    b.click(errors(recipe), [m, meth, pj], y, api_name="recipe")


__all__ = ["endpoints", "errors"]
