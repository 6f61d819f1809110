"""The `hubmix` command: click argument parsing only; every command calls one library function."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import click

from . import __version__
from .errors import HubmixError, RecipeError
from .methods import methods
from .recipe import DTYPES, LAYOUTS, ComponentRecipe, Recipe, letter, model_entry
from .refs import REF_RULE


def _param_options():
    """One option per parameter name across the registry, with help assembled from every method that has it."""
    by_name: dict[str, list[str]] = {}
    for m in methods().values():
        for p in m.params:
            by_name.setdefault(p.name, []).append(f"{m.name}: {p.help} (default {p.default:g})")
    opts = []
    for name, helps in by_name.items():
        opts.append(click.option(f"--{name.replace('_', '-')}", name, type=float, default=None,
                                 help="; ".join(helps)))
    return opts


def _apply(options):
    def deco(f):
        for o in reversed(options):
            f = o(f)
        return f
    return deco


def _methods_help() -> str:
    return "; ".join(f"{m.name} ({'/'.join(map(str, m.models))} models): {m.formula}" for m in methods().values())


class _Ctx:
    debug = False


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="hubmix")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def cli(debug: bool) -> None:
    """Merge diffusion models (SD1.x, SD2.x, SDXL) from the Hub or local files, component by component."""
    _Ctx.debug = debug


@cli.command(help=f"Merge MODELS (a, b, c, ... in order) with --method.\n\nModel references: {REF_RULE}\n\n"
                  f"Methods: {_methods_help()}")
@click.argument("models", nargs=-1)
@click.option("--method", "-m", type=click.Choice(sorted(methods())), help="Merge method.")
@_apply(_param_options())
@click.option("--components", help="Comma-separated components to merge (default: all of unet, text_encoder(s), "
                                   "vae); the others are copied from model a.")
@click.option("--dtype", type=click.Choice(DTYPES), help="Output dtype (default: model a's).")
@click.option("--out", "-o", type=click.Path(path_type=Path), help="Output folder, or a .safetensors file.")
@click.option("--layout", type=click.Choice(LAYOUTS),
              help="Output layout (default: single-file when --out ends in .safetensors, else diffusers).")
@click.option("--variant", help="Read this weight variant of diffusers inputs (e.g. fp16) and name outputs so.")
@click.option("--ema", is_flag=True, help="Use the EMA weights of single-file inputs that have them.")
@click.option("--config-from", help="Diffusers folder or Hub repo for configs and tokenizers of single-file inputs.")
@click.option("--prediction-type", type=click.Choice(["epsilon", "v_prediction"]),
              help="Prediction type of the output's scheduler (SD2.x single files cannot tell).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--dry", is_flag=True, help="Write nothing: report similarity per component and block.")
@click.option("--json", "as_json", is_flag=True, help="With --dry, print the report as JSON; else the summary.")
@click.option("--recipe", "recipe_file", type=click.Path(path_type=Path), help="Read the whole merge from a YAML "
                                                                                "recipe.")
@click.option("--save-recipe", type=click.Path(path_type=Path), help="Also write this merge's recipe to a file.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary.")
@click.option("--workers", type=click.IntRange(1, 64), help="Worker threads (default: CPU count, at most 4; "
                                                              "1 on a GPU).")
@click.option("--device", default="auto", show_default=True,
              help="Where the arithmetic runs: auto (a GPU when present), cpu, cuda, cuda:N or mps.")
@click.option("--max-memory", "max_memory", default="512M", show_default=True, callback=lambda c, p, v: _size(v),
              help="Budget for chunk buffers in flight (e.g. 256M, 2G); bounds chunk sizes for huge tensors.")
@click.option("--kernels", type=click.Choice(["auto", "native", "compile", "eager"]), default="auto",
              show_default=True, help="Fused native kernels, torch.compile, or plain torch; auto fuses large "
                                      "merges (all give the same bytes).")
@click.option("--push", is_flag=False, flag_value="", default=None, metavar="[ORG/NAME]",
              help="Upload the result with its model card in one commit to ORG/NAME (alone: your namespace, under "
                   "the --out folder's name, or a name made from the inputs and the method; without --out the "
                   "result is built in a temporary folder).")
@click.option("--private", is_flag=True, help="With --push: create the repo private.")
@click.option("--branch", help="With --push: commit to this branch (created if missing).")
@click.option("--create-pr", is_flag=True, help="With --push: open a pull request instead of committing to main.")
@click.option("--commit-message", help="With --push: the commit message.")
@click.option("--license", "license_", metavar="ID", help="The model card's license (default: the one every input "
                                                         "shares, else none and a warning).")
def merge(models, method, components, dtype, out, layout, variant, ema, config_from, prediction_type, overwrite,
          dry, as_json, recipe_file, save_recipe, quiet, workers, device, max_memory, kernels, push, private, branch,
          create_pr, commit_message, license_, **params):
    from .merging import merge as run_merge

    params = {k: v for k, v in params.items() if v is not None}
    if recipe_file is not None:
        given = [n for n, v in (("MODELS", models), ("--method", method), ("--components", components),
                                ("--dtype", dtype), ("--variant", variant), ("--ema", ema),
                                ("--config-from", config_from), ("--prediction-type", prediction_type)) if v]
        given += [f"--{k.replace('_', '-')}" for k in params]
        if given:
            raise RecipeError(f"{recipe_file}: the recipe says the whole merge; drop {', '.join(given)} "
                              "(--out, --layout and --overwrite may still be given)")
        recipe = Recipe.load(recipe_file)
        if layout:
            recipe.layout = layout
    else:
        if not models or not method:
            raise click.UsageError("give MODELS and --method, or --recipe FILE")
        comps: dict[str, ComponentRecipe] = {}
        if components:
            from .families import all_component_names

            wanted = [c.strip() for c in components.split(",") if c.strip()]
            known = list(all_component_names())
            bad = [c for c in wanted if c not in known]
            if bad:
                raise RecipeError(f"--components: unknown {', '.join(bad)} (known: {', '.join(known)})")
            comps = {c: ComponentRecipe(from_="a") for c in known if c not in wanted}
        recipe = Recipe(models=list(models), method=method, params=params, components=comps, dtype=dtype,
                        layout=layout, variant=variant, ema=ema, config_from=config_from,
                        prediction_type=prediction_type, output=str(out) if out else None)
        recipe.validate()
    if push is None:
        given = [n for n, v in (("--private", private), ("--branch", branch), ("--create-pr", create_pr),
                                ("--commit-message", commit_message), ("--license", license_)) if v]
        if given:
            raise click.UsageError(f"{', '.join(given)} only go with --push")
    else:
        if dry:
            raise click.UsageError("--push uploads a result; --dry writes none")
        if branch and create_pr:
            raise click.UsageError("--branch and --create-pr exclude each other")
        from .hub import default_repo_name, push_target

        target = out if out is not None else (Path(recipe.output) if recipe.output else None)
        name = default_repo_name(recipe) if target is None else (target.stem if target.suffix == ".safetensors"
                                                                 else target.name)
        push = push_target(push or None, name)  # a token and the account, before any long work
        if target is None:
            import tempfile

            tmpdir = tempfile.TemporaryDirectory(prefix="hubmix-push-")
            click.get_current_context().call_on_close(tmpdir.cleanup)
            out = Path(tmpdir.name) / name
    if quiet:
        _quiet_downloads()
    from .engine import Settings

    settings = Settings(workers=workers, max_memory=max_memory, device=device, kernels=kernels, quiet=quiet)
    result = run_merge(recipe, out=out, overwrite=overwrite, dry=dry, settings=settings)
    if save_recipe:  # only for a merge that ran
        try:
            save_recipe.write_text(recipe.to_yaml())
        except OSError as e:
            raise RecipeError(f"{save_recipe}: cannot write the recipe ({e.strerror})") from None
    if dry:
        from .analysis import render

        if as_json:
            click.echo(json.dumps({"family": result.family.id, "models": _legend(recipe), "report": result.report,
                                   "summary": result.summary.to_dict()}, indent=2))
        else:
            click.echo("\n".join(f"{k}: {v}" for k, v in _legend(recipe).items()))
            click.echo(render(result.report or {}))
            if not quiet:
                click.echo(result.summary.render(), err=True)
        return
    pushed = None
    if push is not None:
        from .hub import push as run_push

        if not quiet and not as_json:
            click.echo(result.summary.render(), err=True)
            click.echo(f"wrote {result.output} ({result.layout}, {result.family.name}); pushing to {push}", err=True)
        pushed = run_push(result.output, push, private=private, branch=branch, create_pr=create_pr,
                          commit_message=commit_message, license=license_)
        for w in pushed.warnings:
            click.echo(f"warning: {w}", err=True)
    if as_json:
        info = {"output": str(result.output), "layout": result.layout, "recipe_sha256": result.recipe_sha256,
                "files": [str(f) for f in result.files], "summary": result.summary.to_dict(),
                "engine": result.engine}
        if pushed is not None:
            info["push"] = {"repo_id": pushed.repo_id, "commit_url": pushed.commit_url, "revision": pushed.revision,
                            "pr_url": pushed.pr_url, "files": pushed.files}
        click.echo(json.dumps(info, indent=2))
    elif pushed is not None:
        if pushed.pr_url:
            click.echo(f"opened {pushed.pr_url}", err=True)
        click.echo(pushed.commit_url)
    elif not quiet:
        click.echo(result.summary.render(), err=True)
        click.echo(f"wrote {result.output} ({result.layout}, {result.family.name})", err=True)


def _quiet_downloads() -> None:
    """--quiet: no huggingface_hub download bars either."""
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    else:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"


def _size(text: str) -> int:
    """'512M', '2G', '1.5G' or plain bytes -> bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = str(text).strip().upper().removesuffix("B")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a size such as 512M or 2G") from None


def _legend(recipe: Recipe) -> dict[str, str]:
    return {letter(i): model_entry(m)["ref"] for i, m in enumerate(recipe.models)}


@cli.command()
@click.argument("src")
@click.option("--to", "to", type=click.Choice(LAYOUTS), required=True, help="Output layout.")
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True, help="Output folder or .safetensors.")
@click.option("--config-from", help="Diffusers folder or Hub repo for configs and tokenizers (single file -> "
                                    "diffusers).")
@click.option("--dtype", type=click.Choice(DTYPES), help="Output dtype (default: unchanged).")
@click.option("--variant", help="Read this weight variant of a diffusers input and name the output so.")
@click.option("--ema", is_flag=True, help="Use the EMA weights of a single file that has them.")
@click.option("--prediction-type", type=click.Choice(["epsilon", "v_prediction"]),
              help="Prediction type for the scheduler (SD2.x single files cannot tell).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary.")
def convert(src, to, out, config_from, dtype, variant, ema, prediction_type, overwrite, quiet):
    """Change SRC's layout (diffusers folder <-> original single file) or dtype, tensors unchanged."""
    from .convert import convert as run_convert

    result = run_convert(src, out, to=to, dtype=dtype, config_from=config_from, ema=ema, variant=variant,
                         prediction_type=prediction_type, overwrite=overwrite, quiet=quiet)
    if not quiet:
        click.echo(result.summary.render(), err=True)
        click.echo(f"wrote {result.output} ({result.layout}, {result.family.name})", err=True)


@cli.command()
@click.argument("src")
@click.option("--variant", help="Inspect this weight variant of a diffusers folder.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def inspect(src, variant, as_json):
    """Family, layout, components, dtypes, sizes and the recipe a model was made with."""
    from .inspection import inspect_model, render

    info = inspect_model(src, variant=variant)
    click.echo(json.dumps(info, indent=2) if as_json else render(info))


@cli.command()
@click.argument("result", type=click.Path(path_type=Path, exists=True))
@click.option("--repo-id", metavar="ORG/NAME", help="The repo the card is for (its name, load snippet, reproduce "
                                                   "command); default: the folder's name.")
@click.option("--license", "license_", metavar="ID", help="License (default: the one every input shares).")
def card(result, repo_id, license_):
    """(Re)write RESULT's model card (README.md in a folder, <name>.README.md beside a single file) from its
    recipe."""
    from .card import write_card

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
    from .reproduce import reproduce as run_reproduce

    if quiet:
        _quiet_downloads()
    report = run_reproduce(source, latest=latest, models=models, keep=keep, quiet=quiet, workers=workers)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.render())
    if not report.identical:
        sys.exit(1)


@cli.command(name="methods")
def list_methods() -> None:
    """List the merge methods with their parameters, formula and reference."""
    for m in methods().values():
        click.echo(f"{m.name} ({' or '.join(map(str, m.models))} models): {m.summary}")
        click.echo(f"  formula:   {m.formula}")
        for p in m.params:
            rng = "" if p.min is None and p.max is None else f", range [{p.min}, {p.max}]"
            only = f", only with {'/'.join(map(str, p.only_with))} models" if p.only_with else ""
            click.echo(f"  --{p.name.replace('_', '-')}: {p.help} (default {p.default:g}{rng}{only})")
        click.echo(f"  reference: {m.reference}")


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


if __name__ == "__main__":
    main()
