"""`hubmix convert`, `hubmix inspect` and `hubmix methods`: models and methods, no merge."""

from __future__ import annotations

import json
from pathlib import Path

import click

from hubmix.cli.app import cli
from hubmix.methods import methods
from hubmix.recipe import DTYPES, LAYOUTS


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
    from hubmix.flow.convert import convert as run_convert

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
    from hubmix.flow.inspection import inspect_model, render

    info = inspect_model(src, variant=variant)
    click.echo(json.dumps(info, indent=2) if as_json else render(info))


@cli.command(name="methods")
@click.option("--presets", "show_presets", is_flag=True,
              help="List supermerger's block-weight presets for --block-alpha/--block-beta instead.")
def list_methods(show_presets: bool) -> None:
    """List the merge methods with their parameters, formula and reference."""
    if show_presets:
        from hubmix.methods.presets import SD_LABELS, presets

        click.echo("supermerger's block-weight presets (values for " + ",".join(SD_LABELS) + "; for SDXL the "
                   "values of BASE, IN00..IN08, M00, OUT00..OUT08):")
        for name, values in presets().items():
            click.echo(f"{name}: {','.join(f'{v:.10g}' for v in values)}")
        return
    for m in methods().values():
        click.echo(f"{m.name} ({m.models_text} models): {m.summary}")
        click.echo(f"  formula:   {m.formula}")
        for p in m.params:
            rng = f", {p.range_text}" if p.range_text else ""
            only = f", only with {'/'.join(map(str, p.only_with))} models" if p.only_with else ""
            key = f"; recipe key {p.name}" if p.cli else ""
            default = f"{p.default:g}" if not p.choices else p.default
            click.echo(f"  {p.option}: {p.help} (default {default}{rng}{only}{key})")
        click.echo(f"  reference: {m.reference}")
