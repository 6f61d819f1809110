"""`hubmix ui`: serve the web UI (Gradio, `pip install 'hubmix[ui]'`), or write it to a Hugging Face Space."""

from __future__ import annotations

import click

from hubmix.cli.app import cli


@cli.command(help="Serve the web UI: the whole flow (models, method, recipe, dry run, samples, sweep, merge, push, "
                  "remote) in a browser page, with named API endpoints for gradio_client. Needs "
                  "`pip install 'hubmix[ui]'`.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every one).")
@click.option("--port", type=int, help="Port (default: Gradio's, 7860 or the next free one).")
@click.option("--share", is_flag=True, help="Also open a temporary public gradio.live link.")
@click.option("--space", metavar="ORG/NAME", help="Instead of serving: create or update this Gradio Space running "
                                                  "the same UI (visitors sign in; their merges run as Jobs under "
                                                  "their own token).")
@click.option("--private", is_flag=True, help="With --space: create the Space private.")
def ui(host, port, share, space, private):
    from hubmix.ui import require_gradio

    if space:
        from hubmix.ui.space import deploy_space

        click.echo(deploy_space(space, private=private))
        return
    require_gradio()
    from hubmix.ui.app import launch

    launch(host, port, share)
