"""`hubmix extract-lora` and `hubmix merge-loras`: LoRA files out of models and out of other LoRAs."""

from __future__ import annotations

import json
from pathlib import Path

import click

from hubmix.cli.app import cli
from hubmix.errors import RecipeError


def _rank(text: str, allowed: tuple[str, ...]) -> int | str:
    if text in allowed:
        return text
    try:
        return int(text)
    except ValueError:
        raise RecipeError(f"--rank: a number or {' / '.join(allowed)}, not {text!r}") from None


@cli.command(name="extract-lora")
@click.argument("tuned")
@click.argument("base")
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True, help="The LoRA file (.safetensors).")
@click.option("--rank", "rank", default="32", show_default=True, help="Rank per layer, or 'auto' with --energy.")
@click.option("--energy", type=float, help="--rank auto: keep per layer the smallest rank holding this share of "
                                           "the delta's squared singular values (e.g. 0.9).")
@click.option("--max-rank", type=int, default=128, show_default=True, help="Cap for --rank auto.")
@click.option("--conv-rank", type=int, help="Rank of 3x3 conv layers (default: --rank).")
@click.option("--alpha", type=float, help="kohya alpha, one for the file (default: --rank, or --max-rank with auto); "
                                          "the weights are scaled to keep the same delta.")
@click.option("--clamp-quantile", type=float, help="Clamp up/down at this quantile of their values, as kohya's "
                                                   "script does (e.g. 0.99; default: no clamping).")
@click.option("--components", help="Comma-separated components (default: the denoiser and the text encoders).")
@click.option("--format", "fmt", type=click.Choice(["kohya", "diffusers"]), default="kohya", show_default=True,
              help="kohya (A1111/ComfyUI names) or diffusers (PEFT names for load_lora_weights).")
@click.option("--with-diffs", is_flag=True, help="Write changed biases and norms as kohya diff / diff_b entries.")
@click.option("--dtype", type=click.Choice(["fp16", "bf16", "fp32"]), default="fp16", show_default=True)
@click.option("--exact", is_flag=True, help="Exact SVD on every layer (default: randomized where as accurate).")
@click.option("--push", "push_to", metavar="ORG/NAME", help="Upload the LoRA with a model card to this Hub repo.")
@click.option("--private", is_flag=True, help="With --push: create the repo private.")
@click.option("--samples", is_flag=True, help="Render a sample grid: base, base + LoRA at 0.5 and 1, tuned.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def extract_lora(tuned, base, out, rank, energy, max_rank, conv_rank, alpha, clamp_quantile, components, fmt,
                 with_diffs, dtype, exact, push_to, private, samples, overwrite, quiet, as_json):
    """Extract TUNED - BASE as a LoRA (truncated SVD of every Linear and Conv weight's delta)."""
    from hubmix.lora.extract import ExtractOptions
    from hubmix.lora.publish import extract_and_publish

    r = _rank(rank, ("auto",))
    opts = ExtractOptions(rank=None if r == "auto" else r, energy=energy, max_rank=max_rank, conv_rank=conv_rank,
                          alpha=alpha, clamp_quantile=clamp_quantile, fmt=fmt, with_diffs=with_diffs, dtype=dtype,
                          components=[c.strip() for c in components.split(",")] if components else None,
                          method="exact" if exact else "auto")
    done = extract_and_publish(tuned, base, out, opts, overwrite=overwrite, quiet=quiet or as_json, push=push_to,
                               private=private, samples=samples)
    if as_json:
        click.echo(json.dumps(done.summary(), indent=2, sort_keys=True))
    elif not quiet:
        click.echo(done.render(), err=True)


@cli.command(name="merge-loras")
@click.argument("loras", nargs=-1, required=True, metavar="LORA[:STRENGTH]...")
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True, help="The merged LoRA (.safetensors).")
@click.option("--rank", "rank", default="concat", show_default=True,
              help="Rank of the merged modules (SVD of the summed update), or 'concat' (exact, ranks add up).")
@click.option("--base", help="A model of the LoRAs' family (headers only): maps kohya and PEFT names onto its keys; "
                             "needed to mix them and for --block-alpha.")
@click.option("--format", "fmt", type=click.Choice(["kohya", "diffusers"]),
              help="Names of the output (with --base; default kohya; without --base the inputs' own).")
@click.option("--block-alpha", help="A1111 block list or preset: each block's factor on every strength.")
@click.option("--dtype", type=click.Choice(["fp16", "bf16", "fp32"]), default="fp16", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--quiet", "-q", is_flag=True, help="No summary.")
def merge_loras(loras, out, rank, base, fmt, block_alpha, dtype, overwrite, quiet):
    """Merge LoRAs: the strength-weighted sum of their updates, concatenated exactly or re-compressed to --rank."""
    from hubmix.lora.merge import merge_loras as run, parse_entry

    done = run([parse_entry(x) for x in loras], out, rank=_rank(rank, ("concat",)), base=base, fmt=fmt,
               block_alpha=block_alpha, dtype=dtype, overwrite=overwrite)
    if not quiet:
        click.echo(f"wrote {done.output}: {done.modules} modules, rank {done.rank}, {done.names} names", err=True)
