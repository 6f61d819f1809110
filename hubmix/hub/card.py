"""The model card (README.md) of a result, built from its canonical recipe with huggingface_hub's ModelCard so the
Hub parses its metadata: library, pipeline, base models (the Hub inputs), `base_model_relation: merge`, tags and
license. The body states each method with its formula and reference, the inputs (Hub inputs with their pinned
commit, local inputs by file name only) with the sha256 of every file read, the per-component parameters, the
canonical recipe verbatim, how to load the result with diffusers, and the one command that reproduces it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from hubmix.formats.families import get_family
from hubmix.formats.quant import QUANT_DTYPES, codec
from hubmix.methods import get_method
from hubmix.recipe import model_entry, recipe_hash
from hubmix.flow.result import RECIPE_MARK, Result, load_result, samples_dir

TORCH_DTYPE = {"fp16": "torch.float16", "bf16": "torch.bfloat16", "fp32": "torch.float32"}


@dataclass
class Card:
    path: Path
    text: str
    license: str | None
    warnings: list[str] = field(default_factory=list)
    summary: str = ""  # one line: "lossless merge of org/a, org/b, c.safetensors"
    recipe_sha256: str = ""


def _models(canonical: dict[str, Any]) -> list[dict[str, Any]]:
    return [model_entry(m) for m in canonical.get("models", [])]


def _params(p: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items()) or "-"


def resolve_license(canonical: dict[str, Any], chosen: str | None) -> tuple[str | None, list[str]]:
    """The card's license: `chosen`, else the one every input shares; otherwise none and a warning listing them."""
    models = _models(canonical)
    licenses: dict[str, str | None] = {}
    if any(m.get("repo") for m in models):
        from hubmix.hub.pinning import input_licenses

        licenses = input_licenses(models)
    per_input = []
    for m in models:
        key = m.get("name") or m.get("repo") or m["ref"]
        lic = licenses.get(key) if m.get("repo") else None
        per_input.append((f"{m.get('name', '?')}: {m['ref']}", lic if m.get("repo") else None, bool(m.get("repo"))))
    if chosen:
        return chosen, []
    found = {lic for _, lic, _ in per_input}
    if len(found) == 1 and None not in found:
        return found.pop(), []
    listed = "; ".join(f"{who} {lic or ('none declared' if hub else 'unknown (local file)')}"
                       for who, lic, hub in per_input)
    return None, [f"no license set: the inputs do not share one ({listed}); choose one with --license"]


def build_card(result: Result, *, repo_id: str | None = None, license: str | None = None,
               revision: str | None = None) -> Card:
    """The model card of `result` (for `repo_id`, and its branch `revision`, when they are known)."""
    from huggingface_hub import ModelCard, ModelCardData

    c = result.canonical
    models = _models(c)
    family = get_family(c["family"])
    lic, warnings = resolve_license(c, license)
    base = list(dict.fromkeys(m["repo"] for m in models if m.get("repo")))
    samples = _samples(result)
    widget = [{"text": im["prompt"], "output": {"url": f"samples/{im['file']}"}}
              for im in samples.get("images", []) if im.get("result")]
    data = ModelCardData(library_name="diffusers", pipeline_tag="text-to-image", base_model=base or None,
                         license=lic, tags=["hubmix", "merge", *family.tags],
                         **({"base_model_relation": "merge"} if base else {}), **({"widget": widget} if widget else {}))
    title = repo_id.split("/")[-1] if repo_id else result.name
    where = (f"{repo_id}@{revision}" if revision else repo_id) if repo_id else f"./{result.name}"
    refs = ", ".join(m["ref"] for m in models)
    summary = f"{c['method']} merge of {refs}"
    lines = [f"# {title}", "",
             f"A merge of {len(models)} {family.name} models made with hubmix: "
             f"**{c['method']}** of {refs}.", ""]
    lines += _samples_section(samples)
    lines += _method_section(c)
    lines += _inputs_section(models)
    lines += _loras_section(c.get("loras") or [])
    lines += _components_section(c)
    lines += ["## Recipe", "",
              "The canonical recipe: every default filled in, Hub inputs pinned to a commit, local inputs by name "
              f"and sha256 (recipe sha256 `{recipe_hash(c)}`). It is also stored as `recipe.yaml` and in the "
              "`hubmix.recipe` metadata of every weight file.", "", RECIPE_MARK, "```yaml",
              result.recipe_text.rstrip("\n"), "```", ""]
    lines += _usage_section(result, family, repo_id, revision)
    local = [m for m in models if not m.get("repo")]
    cmd = f"hubmix reproduce {where}" + "".join(f" --model {m.get('name')}=PATH/TO/{m['ref']}" for m in local)
    lines += ["## Reproduce", "",
              "Rebuild it from the pinned inputs and check every file's sha256:", "", "```", cmd, "```", ""]
    if local:
        lines += ["Local inputs are not on the Hub: pass each one with `--model NAME=PATH` (the sha256 above tells "
                  "whether it is the same file).", ""]
    lines += _job_section()
    lines += ["## License", ""]
    if lic and license:
        lines += [f"`{lic}`, chosen when the merge was pushed.", ""]
    elif lic:
        lines += [f"`{lic}`, the license every input shares.", ""]
    else:
        lines += ["None set: " + warnings[0].split(": ", 1)[1].rsplit(";", 1)[0] + ". Check each input's terms.", ""]
    text = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines).rstrip("\n") + "\n"
    card = ModelCard(text)  # parses the front matter as the Hub does
    return Card(result.card_path, str(card), lic, warnings, summary, recipe_hash(c))


def _job_section() -> list[str]:
    """Where the merge ran, when it ran as a hubmix job (`merge --remote`); the only difference to a local card."""
    from hubmix.hub.jobs import job_context

    ctx = job_context()
    if ctx is None:
        return []
    job = f"job `{ctx['job']}`" if ctx["job"] else "a job"
    return ["## Where it was merged", "",
            f"In a Hugging Face Job: {job} on flavor `{ctx['flavor']}`, image `{ctx['image']}`, hubmix installed from "
            f"{ctx['install']}. The inputs were mounted read-only at their pinned commits (nothing downloaded); "
            "the weights and recipe are the same bytes a local merge of this recipe writes.", ""]


def _samples(result: Result) -> dict[str, Any]:
    """The result's samples/samples.json (written by `hubmix merge --samples`), or {}."""
    import json

    try:
        data = json.loads((samples_dir(result.path) / "samples.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _samples_section(samples: dict[str, Any]) -> list[str]:
    if not samples:
        return []
    out = ["## Samples", ""]
    images = samples.get("images") or []
    if samples.get("grid") and images:
        first = images[0]
        out += ["The inputs and the merge on the same prompts and seeds (rows: models; columns: prompt x seed), "
                f"{first['width']}x{first['height']}, {first.get('steps')} steps, guidance {first.get('guidance')}, "
                f"{first.get('scheduler')}, {first.get('dtype')} on {first.get('device')}:", "",
                f"![samples](samples/{samples['grid']})", "",
                f"Conventions: {samples.get('conventions', '')}. Every image and its settings: "
                "`samples/samples.json`.", ""]
    if samples.get("plot"):
        out += ["How similar the inputs are (cosine to a) and which share of each tensor each candidate supplies, "
                "per component and UNet block (`hubmix merge --dry`):", "", f"![similarity](samples/{samples['plot']})",
                ""]
    return out


def _method_section(c: dict[str, Any]) -> list[str]:
    used = [c["method"]] + [p["method"] for p in c.get("components", {}).values() if "method" in p]
    out = ["## Method", ""]
    for name in dict.fromkeys(used):
        try:
            m = get_method(name)
        except Exception:  # noqa: BLE001 - a method this hubmix lacks: name it only
            out += [f"**{name}**", ""]
            continue
        out += [f"**{m.name}**: {m.summary}.", "", "```", m.formula, "```", "", f"Reference: {m.reference}", ""]
    return out


def _inputs_section(models: list[dict[str, Any]]) -> list[str]:
    out = ["## Inputs", "", "| model | reference | commit | file | sha256 |", "|---|---|---|---|---|"]
    for m in models:
        ref = f"[{m['ref']}](/{m['repo']})" if m.get("repo") else f"`{m['ref']}` (local)"
        commit = f"`{m['revision']}`" if m.get("revision") else "-"
        files = list((m.get("files") or {}).items()) or [("-", "-")]
        for i, (f, sha) in enumerate(files):
            head = (m.get("name", "?"), ref, commit) if i == 0 else ("", "", "")
            out.append(f"| {head[0]} | {head[1]} | {head[2]} | `{f}` | `{sha}` |")
    return out + [""]


def _loras_section(loras: list[dict[str, Any]]) -> list[str]:
    """The LoRAs baked into the result: W += strength * (alpha/rank) * up @ down, added after the merge."""
    if not loras:
        return []
    out = ["## LoRAs", "", "Baked into the merged weights after the merge: `W += strength * (alpha/rank) * up @ down`.",
           "", "| reference | commit | file | strength | sha256 |", "|---|---|---|---|---|"]
    for x in loras:
        ref = f"[{x['ref']}](/{x['repo']})" if x.get("repo") else f"`{x['ref']}` (local)"
        strength = ", ".join(f"{c} {v:g}" for c, v in x["components"].items()) if x.get("components") \
            else f"{x['strength']:g}"
        commit = f"`{x['revision']}`" if x.get("revision") else "-"
        out.append(f"| {ref} | {commit} | `{x.get('file') or '-'}` | {strength} | `{x['sha256']}` |")
    return out + [""]


def _components_section(c: dict[str, Any]) -> list[str]:
    out = ["## Components", "", "| component | method | models | parameters |", "|---|---|---|---|"]
    for name, p in c.get("components", {}).items():
        if "from" in p:
            out.append(f"| {name} | copied unchanged | {p['from']} | - |")
            continue
        blocks = "; per block below" if p.get("blocks") else ""
        out.append(f"| {name} | {p['method']} | {', '.join(p.get('models', []))} | "
                   f"{_params(p.get('params', {}))}{blocks} |")
    for name, p in c.get("components", {}).items():
        out += _blocks_table(name, p.get("blocks") or {})
    extra = [f"dtype: {c.get('dtype') or 'as model a'}"]
    for key in ("variant", "prediction_type"):
        if c.get(key):
            extra.append(f"{key}: {c[key]}")
    if c.get("ema"):
        extra.append("EMA weights of single-file inputs")
    return out + ["", "; ".join(extra) + ".", ""]


def _blocks_table(component: str, blocks: dict[str, dict[str, float]]) -> list[str]:
    """A component's per-block parameters (a block list expanded, or blocks: in the recipe) as one table."""
    if not blocks:
        return []
    names = list(dict.fromkeys(k for bp in blocks.values() for k in bp))
    out = ["", f"Per-block parameters of {component}:", "", "| block | " + " | ".join(names) + " |",
           "|---|" + "---|" * len(names)]
    for block, bp in blocks.items():
        out.append(f"| {block} | " + " | ".join(f"{bp[k]:g}" if k in bp else "-" for k in names) + " |")
    return out


def _usage_section(result: Result, family: Any, repo_id: str | None, revision: str | None) -> list[str]:
    c = result.canonical
    where = repo_id or f"./{result.name}"
    dtype = TORCH_DTYPE.get(c.get("dtype") or "")
    if c.get("dtype") in QUANT_DTYPES:  # a quantized file: its format's own loaders (formats.quant's codec)
        fmt = codec(c["dtype"])
        return ["## Use it", "", f"`{result.name}{fmt.extension}` is {fmt.loader}", ""]  # type: ignore[union-attr]
    if family.generic:  # no pipeline is known for it
        return ["## Use it", "", f"`{result.name}.safetensors` has the keys, shapes and dtypes of model a: load it "
                "as you load that model.", ""]
    out = ["## Use it", "", "```python", "import torch"]
    if result.layout in ("diffusers", "both"):
        args = [f'"{where}"'] + ([f'revision="{revision}"'] if revision and repo_id else []) + (
            [f'variant="{c["variant"]}"'] if c.get("variant") else []) + ([f"torch_dtype={dtype}"] if dtype else [])
        out += ["from diffusers import DiffusionPipeline", "",
                f"pipe = DiffusionPipeline.from_pretrained({', '.join(args)})"]
    elif family.single_file:  # transformer-only files: the transformer(s) from the file(s), the rest from the base
        out += _transformer_only_usage(result, family, repo_id, revision, dtype)
    else:
        file = f"{result.name}.safetensors"
        url = f"https://huggingface.co/{repo_id}/blob/{revision or 'main'}/{file}" if repo_id else f"./{file}"
        args = [f'"{url}"'] + ([f"torch_dtype={dtype}"] if dtype else [])
        out += [f"from diffusers import {family.pipeline}", "",
                f"pipe = {family.pipeline}.from_single_file({', '.join(args)})"]
    out += ['pipe.to("cuda" if torch.cuda.is_available() else "cpu")',
            'image = pipe("a photo of a cat", num_inference_steps=30).images[0]', "```", ""]
    if result.layout == "both":
        out += [f"The same weights as one original-layout file: `{result.name}.safetensors` (A1111, ComfyUI, "
                "`from_single_file`).", ""]
    return out


def _transformer_only_usage(result: Result, family: Any, repo_id: str | None, revision: str | None,
                            dtype: str | None) -> list[str]:
    """Usage of a transformer-only file (Qwen-Image, Wan, FLUX.2): diffusers loads the transformer from it and the
    text encoder and VAE from the family's base repo; Wan 2.2's two experts are two files."""
    main = family.components[family.main].cls
    files = {family.main: f"{result.name}.safetensors"}
    split = {c: f"{result.name}{suffix}.safetensors" for c, suffix in family.split_files.items()}
    folder = result.path.parent if result.layout == "single-file" else result.path
    if split and all((folder / f).is_file() for f in split.values()):
        files = split
    out = [f"from diffusers import {family.pipeline}, {main}", ""]
    for comp, file in files.items():
        url = f"https://huggingface.co/{repo_id}/blob/{revision or 'main'}/{file}" if repo_id else f"./{file}"
        args = [f'"{url}"'] + ([f"torch_dtype={dtype}"] if dtype else [])
        out.append(f"{comp} = {main}.from_single_file({', '.join(args)})")
    kw = ", ".join(f"{c}={c}" for c in files) + (f", torch_dtype={dtype}" if dtype else "")
    return out + [f'pipe = {family.pipeline}.from_pretrained("{family.default_config_repo}", {kw})']


def write_card(path: str | Path, *, repo_id: str | None = None, license: str | None = None,
               revision: str | None = None) -> Card:
    """(Re)write the model card of the local result at `path` from its recipe; returns it."""
    result = load_result(path)
    card = build_card(result, repo_id=repo_id, license=license, revision=revision)
    card.path.write_text(card.text, encoding="utf-8")
    return card


__all__ = ["write_card", "build_card", "load_result", "resolve_license", "Card",
           "RECIPE_MARK"]
