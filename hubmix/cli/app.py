"""The `hubmix` click group and what every command shares: one-line errors, sizes, quiet downloads. Commands live
in the modules beside this one (one per area), each calling one library function; none imports torch at load."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import click

from hubmix import __version__
from hubmix.errors import HubmixError, RecipeError


class _Ctx:
    debug = False


def cli_help() -> str:
    """The program's one-line description, naming every family in hubmix/formats/families/ (a new YAML file there
    appears here)."""
    from hubmix.formats.families import family_names

    return (f"Merge diffusion models ({', '.join(family_names())}) from the Hub or local files, component by "
            "component.")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110}, help=cli_help())
@click.version_option(__version__, prog_name="hubmix")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def cli(debug: bool) -> None:
    _Ctx.debug = debug


def quiet_downloads() -> None:
    """--quiet: no huggingface_hub download bars, and none of its warnings (retries); errors still end in one line."""
    import logging

    os.environ["HF_HUB_VERBOSITY"] = "error"  # read when huggingface_hub is imported, which resets its level
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    else:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"


def parse_size(text: str) -> int:
    """'512M', '2G', '1.5G' or plain bytes -> bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = str(text).strip().upper().removesuffix("B")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a size such as 512M or 2G") from None


def parse_components(components: str | None) -> dict:
    """--components unet,vae -> the other components copied from model a."""
    if not components:
        return {}
    from hubmix.formats.families import all_component_names
    from hubmix.recipe import ComponentRecipe

    wanted = [c.strip() for c in components.split(",") if c.strip()]
    known = list(all_component_names())
    bad = [c for c in wanted if c not in known]
    if bad:
        raise RecipeError(f"--components: unknown {', '.join(bad)} (known: {', '.join(known)})")
    return {c: ComponentRecipe(from_="a") for c in known if c not in wanted}


def main(argv: list[str] | None = None) -> Any:
    """Entry point: one-line errors and a non-zero exit for every HubmixError (tracebacks with --debug)."""
    def _term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    try:
        return cli.main(args=argv, prog_name="hubmix", standalone_mode=False)
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("error: interrupted; the target was left as it was", err=True)
        sys.exit(130)
    except HubmixError as e:
        if _Ctx.debug:
            raise
        click.echo(f"error: {e}", err=True)
        sys.exit(1)


def run() -> None:
    """The `hubmix` program: main(), then exit without the interpreter's teardown. By then every file hubmix wrote
    is closed and fsynced and its temporaries are removed (they are cleaned in the commands, never at exit); the
    teardown would only unload torch's operator libraries, 0.6 s after a merge on a small machine. A traceback
    (an unexpected error, --debug) takes the ordinary way out."""
    try:
        code = main()
    except SystemExit as e:
        code = e.code
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    elif not isinstance(code, int):
        code = 0
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass
    os._exit(code)
