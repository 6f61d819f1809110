"""The main job on an embedded default, offline: `python -m hubmix.demo [--out demo-output]`.

Builds three small SD1.5-architecture models with random weights (a shared base plus different seeds of noise, like
three fine-tunes of one model), writes b as an original-layout single file to show a mixed-layout merge, prints the
dry-run similarity report, merges them with `lossless`, and renders the inputs and the result with diffusers on the
same prompt and seeds into a labelled grid (`grid.png`) beside the result's `samples/`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hubmix.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("demo-output"), help="working folder (replaced)")
    ap.add_argument("--steps", type=int, default=6, help="denoising steps of the sample images")
    args = ap.parse_args(argv)

    import hubmix
    from hubmix.engine.analysis import render
    from hubmix.flow.convert import convert
    from hubmix.formats.tiny import save_tiny

    t0 = time.time()
    root = args.out
    shutil.rmtree(root, ignore_errors=True)
    models = root / "models"
    print(f"1. building three small SD1.5-architecture models with random weights in {models}/")
    for letter, seed in zip("abc", (1, 2, 3)):
        save_tiny(models / letter, "sd1", seed)
    single_b = models / "b.safetensors"
    convert(models / "b", single_b, to="single-file", quiet=True)
    print(f"   b also as an original-layout single file: {single_b}")

    recipe = hubmix.Recipe(models=[str(models / "a"), str(single_b), str(models / "c")], method="lossless")
    print("2. dry run: how similar are b and c to a, and which share each would supply")
    dry = hubmix.merge(recipe, dry=True, quiet=True)
    print(render(dry.report or {}))

    out = root / "merged"
    print(f"3. lossless merge -> {out}")
    result = hubmix.merge(recipe, out=out)
    print(result.summary.render())

    print("4. rendering the inputs and the result on the same prompt and seeds (hubmix's sample conventions)")
    from hubmix.render.samples import add_samples
    from hubmix.render.spec import RenderSpec

    spec = RenderSpec(prompts=["a photo of a cat"], seeds=[0, 1], steps=args.steps, size=(32, 32), device="cpu",
                      quiet=True)
    samples = add_samples(result, recipe, spec)
    shutil.copyfile(samples / "grid.png", root / "grid.png")
    shutil.copyfile(samples / "merged-p0-s0.png", root / "sample.png")
    print(f"   saved {root / 'grid.png'} (rows a, b, c, merged; columns seeds 0 and 1; random weights draw noise, "
          f"as they should), the images and {samples / 'similarity.png'} in {samples}")
    print(f"done in {time.time() - t0:.1f}s; recipe: {out / 'recipe.yaml'} (sha256 {result.recipe_sha256[:12]}...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
