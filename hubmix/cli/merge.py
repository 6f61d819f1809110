"""`hubmix merge`: options for every registered method parameter, recipes, dry run and push."""

from __future__ import annotations

import json
from pathlib import Path

import click

from hubmix.cli.app import cli, parse_components, parse_size, quiet_downloads
from hubmix.cli.jobs import REMOTE_OPTIONS, check_remote, finish_remote, remote_options, take_remote
from hubmix.cli.render import render_spec, sampling_options
from hubmix.errors import RecipeError
from hubmix.formats.lora import parse_lora_option
from hubmix.hub.refs import REF_RULE
from hubmix.methods import methods
from hubmix.recipe import DTYPES, LAYOUTS, Recipe, letter, model_entry


def _param_options():
    """One option per parameter name across the registry, with help assembled from every method that has it. A
    name shared by several methods must have one kind (number, integer, choice) and one CLI spelling; a parameter
    may spell its option otherwise (dare's seed is --dare-seed, the recipe key stays seed)."""
    by_name: dict[str, list] = {}
    for m in methods().values():
        for p in m.params:
            by_name.setdefault(p.name, []).append((m, p))
    opts = []
    for name, entries in by_name.items():
        first = entries[0][1]
        for _, p in entries[1:]:
            if (p.option, p.integer, p.choices) != (first.option, first.integer, first.choices):
                raise AssertionError(f"parameter {name!r} means different things in {entries[0][0].name} and "
                                     f"{_.name}: give one of them another name")
        kind = click.Choice(first.choices) if first.choices else int if first.integer else float
        helps = "; ".join(f"{m.name}: {p.help} (default {p.default:g})" if not p.choices else
                          f"{m.name}: {p.help} (default {p.default})" for m, p in entries)
        opts.append(click.option(first.option, name, type=kind, default=None, help=helps))
    return opts


def option_names() -> dict[str, str]:
    """Recipe key -> CLI option, for messages."""
    return {p.name: p.option for m in methods().values() for p in m.params}


def _apply(options):
    def deco(f):
        for o in reversed(options):
            f = o(f)
        return f
    return deco


def _methods_help() -> str:
    return "; ".join(f"{m.name} ({m.models_text} models): {m.formula}" for m in methods().values())


@cli.command(help=f"Merge MODELS (a, b, c, ... in order) with --method.\n\nModel references: {REF_RULE}\n\n"
                  f"Methods: {_methods_help()}")
@click.argument("models", nargs=-1)
@click.option("--method", "-m", type=click.Choice(sorted(methods())), help="Merge method.")
@_apply(_param_options())
@click.option("--block-alpha", metavar="LIST|PRESET|LABEL=V,...",
              help="alpha per block as A1111/supermerger write it: 26 comma-separated values for SD1.x/SD2.x (BASE, "
                   "IN00..IN11, M00, OUT00..OUT11), 20 for SDXL (BASE, IN00..IN08, M00, OUT00..OUT08), or a "
                   "supermerger preset name (hubmix methods --presets); BASE is the text encoders. Any family: "
                   "LABEL=VALUE pairs with ranges and globs, \"T00-T29=0.3,D*=0.4,BASE=0,*=0.5\" (the most "
                   "specific pattern wins; --dry lists the labels).")
@click.option("--block-beta", metavar="LIST|PRESET", help="beta per block, as --block-alpha.")
@click.option("--lora", "loras", multiple=True, metavar="REF[:STRENGTH]",
              help="Bake a LoRA (kohya/A1111 or diffusers/PEFT file; a path or Hub reference) into the result with "
                   "this strength (default 1); repeatable. With --method copy, into a single model.")
@click.option("--lora-skip-unknown", is_flag=True,
              help="LoRA keys that match no tensor are listed in the summary instead of failing the merge.")
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
@click.option("--max-memory", "max_memory", default="512M", show_default=True, callback=lambda c, p, v: parse_size(v),
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
@click.option("--samples", is_flag=True, help="Render the inputs and the result into the result's samples/ (with "
                                              "--prompt, --seed, ... or their defaults); the card shows them.")
@click.option("--plot", is_flag=False, flag_value="", default=None,
              metavar="[FILE.png]", help="With --dry: draw the report into FILE.png. Else: put it in the result's "
                                         "samples/similarity.png (--samples does too).")
@sampling_options
@_apply(REMOTE_OPTIONS)
def merge(models, method, block_alpha, block_beta, loras, lora_skip_unknown, components, dtype, out, layout, variant,
          ema, config_from, prediction_type, overwrite,
          dry, as_json, recipe_file, save_recipe, quiet, workers, device, max_memory, kernels, push, private, branch,
          create_pr, commit_message, license_, samples, plot, sampling, **params):
    from hubmix.hub import hashing

    remote = take_remote(params)
    ahead = models if models and not dry and not remote.get("remote") and recipe_file is None else ()
    with hashing.ahead(ahead):  # local single files hash on the idle core while the merge's imports run
        from hubmix.flow.run import OptionsError, RunOptions, run

        params = {k: v for k, v in params.items() if v is not None}
        if recipe_file is not None:
            given = [n for n, v in (("MODELS", models), ("--method", method), ("--components", components),
                                    ("--dtype", dtype), ("--variant", variant), ("--ema", ema),
                                    ("--config-from", config_from), ("--prediction-type", prediction_type),
                                    ("--block-alpha", block_alpha), ("--block-beta", block_beta), ("--lora", loras),
                                    ("--lora-skip-unknown", lora_skip_unknown)) if v]
            given += [option_names()[k] for k in params]
            if given:
                raise RecipeError(f"{recipe_file}: the recipe says the whole merge; drop {', '.join(given)} "
                                  "(--out, --layout and --overwrite may still be given)")
            recipe = Recipe.load(recipe_file)
            if layout:
                recipe.layout = layout
        else:
            if not models or not method:
                raise click.UsageError("give MODELS and --method, or --recipe FILE")
            recipe = Recipe(models=list(models), method=method, params=params, components=parse_components(components),
                            dtype=dtype,
                            layout=layout, variant=variant, ema=ema, config_from=config_from,
                            prediction_type=prediction_type, output=str(out) if out else None,
                            block_lists={k: v for k, v in (("alpha", block_alpha), ("beta", block_beta)) if v},
                            loras=[parse_lora_option(x) for x in loras], lora_skip_unknown=lora_skip_unknown)
            recipe.validate()
        remote_on = check_remote(remote)
        options = RunOptions(out=out, overwrite=overwrite, dry=dry, workers=workers, max_memory=max_memory,
                             device=device, kernels=kernels, quiet=quiet, push=push, private=private, branch=branch,
                             create_pr=create_pr, commit_message=commit_message, license=license_,
                             samples=render_spec(sampling, device=device, quiet=quiet) if samples else None,
                             plot=plot, save_recipe=save_recipe, remote=remote_options(remote) if remote_on else None)
        try:
            options.check()
        except OptionsError as e:
            raise click.UsageError(str(e)) from None
        if quiet:
            quiet_downloads()
        if remote_on:
            return finish_remote(lambda: run(recipe, options, log=_log(quiet, False)), quiet)
        flow = run(recipe, options, log=_log(quiet, as_json))
        _print(flow, recipe, quiet=quiet, as_json=as_json)


def _log(quiet: bool, as_json: bool):
    """The flow's messages on stderr: warnings always, the rest unless -q (or --json, for what precedes a push)."""
    def log(level: str, text: str) -> None:
        if level == "warning":
            click.echo(f"warning: {text}", err=True)
        elif level == "line" or not (quiet or as_json):
            click.echo(text, err=True)
    return log


def _print(flow, recipe: Recipe, *, quiet: bool, as_json: bool) -> None:
    """What `merge` prints once the flow is done: the dry run's report, or the result (and where it was pushed)."""
    result, pushed = flow.merge, flow.push
    if result.output is None:  # a dry run
        from hubmix.engine.analysis import render

        if as_json:
            click.echo(json.dumps({"family": result.family.id, "models": _legend(recipe), "report": result.report,
                                   "summary": result.summary.to_dict()}, indent=2))
        else:
            click.echo("\n".join(f"{k}: {v}" for k, v in _legend(recipe).items()))
            click.echo(render(result.report or {}))
            if not quiet:
                click.echo(result.summary.render(), err=True)
        return
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


def _legend(recipe: Recipe) -> dict[str, str]:
    return {letter(i): model_entry(m)["ref"] for i, m in enumerate(recipe.models)}
