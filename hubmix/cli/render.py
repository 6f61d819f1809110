"""`hubmix samples` and `hubmix sweep`, and the sampling options `hubmix merge --samples` shares with them."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from hubmix.cli.app import cli, parse_components, quiet_downloads
from hubmix.cli.jobs import JOB_OPTIONS, check_remote, finish_remote, remote_options
from hubmix.hub.refs import REF_RULE

_KEYS = ("prompts", "seeds", "negative_prompt", "steps", "size", "guidance")


def sampling_options(f):
    """--prompt, --seed, --negative-prompt, --steps, --size, --guidance, gathered into one `sampling` dict."""
    @functools.wraps(f)
    def wrapper(*args, **kw):
        kw["sampling"] = {k: kw.pop(k) for k in _KEYS}
        return f(*args, **kw)

    opts = [
        click.option("--prompt", "prompts", multiple=True, help="A prompt (repeat for several; merge --samples "
                                                                "defaults to 'a photo of a cat')."),
        click.option("--seed", "seeds", multiple=True, type=int, help="A seed (repeat for several; merge --samples "
                                                                      "defaults to 0)."),
        click.option("--negative-prompt", help="The negative prompt of every image."),
        click.option("--steps", type=int, default=20, show_default=True, help="Denoising steps."),
        click.option("--size", metavar="WxH", help="Image size, multiples of 8 (default: the model's own: 512 "
                                                   "SD1, 768 SD2, 1024 SDXL)."),
        click.option("--guidance", type=float, help="Guidance scale (default: 7.5; 5.0 for SDXL)."),
    ]
    for o in reversed(opts):
        wrapper = o(wrapper)
    return wrapper


def render_spec(sampling: dict, *, device: str = "auto", dtype: str | None = None, quiet: bool = False,
                defaults: bool = True):
    """The RenderSpec of the sampling options; an explicitly empty list stays empty (and is refused)."""
    from hubmix.render.spec import RenderSpec, parse_size

    spec = RenderSpec(steps=sampling["steps"], size=parse_size(sampling["size"]), guidance=sampling["guidance"],
                      negative_prompt=sampling["negative_prompt"], device=device, dtype=dtype, quiet=quiet)
    if sampling["prompts"] or not defaults:
        spec.prompts = list(sampling["prompts"])
    if sampling["seeds"] or not defaults:
        spec.seeds = list(sampling["seeds"])
    return spec


def _remote(f):
    """merge's --remote options but --vary: a sweep's own --vary is what its jobs vary."""
    for o in reversed(JOB_OPTIONS):
        f = o(f)
    return f


_DEVICE = click.option("--device", default="auto", show_default=True, help="auto (a GPU when present), cpu, cuda, "
                                                                           "cuda:N or mps.")
_DTYPE = click.option("--dtype", type=click.Choice(["fp16", "bf16", "fp32"]),
                      help="Pipeline dtype (default: fp16 on a GPU, fp32 on a CPU).")


@cli.command(help="Render every MODEL on every --prompt x --seed with diffusers: DIR/grid.png (rows: models, columns: "
                  "prompt x seed), one PNG per image and DIR/samples.json. Conventions (docs/samples.md): the "
                  "model's own scheduler, torch.Generator('cpu').manual_seed(seed), PNG without post-processing."
                  f"\n\nModel references: {REF_RULE}")
@click.argument("models", nargs=-1, required=True)
@sampling_options
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--config-from", help="Diffusers folder or Hub repo giving tokenizers and scheduler to single files.")
@_DEVICE
@_DTYPE
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def samples(models, sampling, out, config_from, device, dtype, overwrite, quiet):
    from hubmix.render.samples import render_samples

    if quiet:
        quiet_downloads()
    spec = render_spec(sampling, device=device, dtype=dtype, quiet=quiet, defaults=False)
    render_samples(list(models), spec, out, overwrite=overwrite, config_from=config_from)
    click.echo(str(out / "grid.png"))


@cli.command(help="Merge at every point of a parameter grid and render each point, writing no merged model: "
                  "DIR/grid.png (rows: points), one PNG per image and DIR/sweep.json (each point's parameters, "
                  "images and dry-run selection shares).\n\n--vary NAME=V1,V2,...: NAME is a method parameter "
                  "(alpha), a UNet block's (OUT00.beta), a component's (text_encoder.alpha) or both "
                  "(unet.IN04.alpha); several --vary make every combination.\n\n--remote --push ORG/NAME: each "
                  "point is merged by its own Hugging Face Job instead and pushed to branch NAME-VALUE of ORG/NAME, "
                  "with a summary card on main (as merge --vary --remote); nothing is rendered (run `hubmix "
                  "samples ORG/NAME@BRANCH` on a point).")
@click.argument("models", nargs=-1)
@click.option("--method", "-m", help="Merge method (as for merge).")
@click.option("--vary", multiple=True, metavar="NAME=V1,V2,...", help="A parameter and its values (repeatable).")
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE", help="A fixed method parameter "
                                                                            "(repeatable), e.g. --param beta=1.1.")
@click.option("--components", help="Comma-separated components to merge; the others are copied from model a.")
@click.option("--merge-dtype", type=click.Choice(["fp16", "bf16", "fp32"]), help="The merge's output dtype (as "
                                                                                  "merge --dtype).")
@click.option("--recipe", "recipe_file", type=click.Path(path_type=Path), help="Take the base merge from a recipe.")
@sampling_options
@click.option("--out", "-o", type=click.Path(path_type=Path), help="Output folder (not with --remote).")
@_DEVICE
@_DTYPE
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@click.option("--push", metavar="ORG/NAME", help="With --remote: the repo whose branches get the points.")
@click.option("--private", is_flag=True, help="With --remote: create the repo private.")
@_remote
def sweep(models, method, vary, params, components, merge_dtype, recipe_file, sampling, out, device, dtype,
          overwrite, quiet, push, private, **remote):
    from hubmix.engine.pipeline import Settings
    from hubmix.errors import RecipeError
    from hubmix.recipe import Recipe
    from hubmix.render.sweep import sweep as run_sweep

    fixed = {}
    for p in params:
        k, sep, v = p.partition("=")
        try:
            fixed[k.strip()] = float(v)
        except ValueError:
            raise RecipeError(f"--param {p}: expected NAME=NUMBER") from None
    if recipe_file is not None:
        if models or method:
            raise click.UsageError("--recipe says the whole merge; drop MODELS and --method")
        recipe = Recipe.load(recipe_file)
        recipe.params.update(fixed)
    else:
        if not models or not method:
            raise click.UsageError("give MODELS and --method, or --recipe FILE")
        recipe = Recipe(models=list(models), method=method, params=fixed, components=parse_components(components),
                        dtype=merge_dtype)
    recipe.validate()
    if check_remote(remote):
        if out is not None or not push:
            raise click.UsageError("--remote pushes each point to a branch of --push ORG/NAME; drop --out")
        if not vary:
            raise click.UsageError("--vary NAME=V1,V2,... says what the sweep varies")
        from hubmix.flow.run import RunOptions, run

        options = RunOptions(push=push, private=private, quiet=quiet,
                             remote=remote_options({**remote, "vary": list(vary)}))
        return finish_remote(lambda: run(recipe, options, log=lambda _, text: click.echo(text, err=True)), quiet)
    if push or private:
        raise click.UsageError("--push and --private only go with --remote (a local sweep writes no model)")
    if out is None:
        raise click.UsageError("give --out DIR (or --remote --push ORG/NAME)")
    if quiet:
        quiet_downloads()
    spec = render_spec(sampling, device=device, dtype=dtype, quiet=quiet, defaults=False)
    run_sweep(recipe, list(vary), spec, out, overwrite=overwrite, settings=Settings(device=device, quiet=True))
    click.echo(str(out / "grid.png"))
