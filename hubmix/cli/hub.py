"""`hubmix card` and `hubmix reproduce`: a result's model card, and rebuilding a result from its recipe."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from hubmix.cli.app import cli, quiet_downloads


@cli.command()
@click.argument("result", type=click.Path(path_type=Path, exists=True))
@click.option("--repo-id", metavar="ORG/NAME", help="The repo the card is for (its name, load snippet, reproduce "
                                                   "command); default: the folder's name.")
@click.option("--license", "license_", metavar="ID", help="License (default: the one every input shares).")
def card(result, repo_id, license_):
    """(Re)write RESULT's model card (README.md in a folder, <name>.README.md beside a single file) from its
    recipe."""
    from hubmix.hub.card import write_card

    written = write_card(result, repo_id=repo_id, license=license_)
    for w in written.warnings:
        click.echo(f"warning: {w}", err=True)
    click.echo(str(written.path))


def _model_override(ctx, param, values):
    out = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"{v!r}: expected NAME=PATH, e.g. c=./models/c.safetensors")
        out[name.strip()] = path.strip()
    return out


@cli.command()
@click.argument("source")
@click.option("--latest", is_flag=True, help="Resolve Hub inputs as originally given (branch, tag) instead of at "
                                            "their pinned commits: shows whether a newer input changes the result.")
@click.option("--model", "models", multiple=True, callback=_model_override, metavar="NAME=PATH",
              help="A local file for input NAME (a, b, ...): inputs that were local files are not on the Hub.")
@click.option("--keep", type=click.Path(path_type=Path), help="Keep the rebuild in this folder, under the "
                                                              "original's name (default: a temporary one, removed).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--workers", type=click.IntRange(1, 64), help="Worker threads.")
def reproduce(source, latest, models, keep, as_json, quiet, workers):
    """Rebuild SOURCE (a Hub repo ORG/NAME[@REVISION], a result folder or file) from its recipe and report, per
    file, whether the sha256 is identical. Exits 1 when any file differs."""
    from hubmix.hub.reproduce import reproduce as run_reproduce

    if quiet:
        quiet_downloads()
    report = run_reproduce(source, latest=latest, models=models, keep=keep, quiet=quiet, workers=workers)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.render())
    if not report.identical:
        sys.exit(1)
