"""The page: the form (models and what each is, method and its parameters, components, dtype, layout, block
weights, LoRAs), the recipe YAML it makes (live, downloadable, uploadable), and one tab per action. Every button
hands the recipe YAML to hubmix.ui.actions; the same functions are the named API endpoints (`api_name`), so
gradio_client callers and the page run the same code. Element ids are stable for tests and scripts."""

# no `from __future__ import annotations`: Gradio reads gr.Request and gr.Progress from real annotations

import functools
import json
import threading
import time
from pathlib import Path
from typing import Any

from hubmix.errors import Cancelled, HubmixError
from hubmix.methods import methods
from hubmix.ui import actions, require_gradio, search
from hubmix.ui.api import endpoints, errors as _errors
from hubmix.ui.visitor import act, token_of
from hubmix.ui.form import (CHOICES, DEFAULT_METHOD, block_list_text, block_values, component_names, first_family, build_recipe, describe_models, form_values,
                            method_info, preset_names, recipe_from_yaml, sliders)

CANCELS: "dict[str, threading.Event]" = {}  # session -> the running merge's stop switch
TITLE = "hubmix: merge diffusion models"
DEBOUNCE = 0.3  # seconds a search waits: keystrokes meanwhile collapse into one pending search (always_last)


def _form_recipe(models, method, components, dtype, layout, block_alpha, loras, *values) -> Any:
    params = {s.name: v for s, v in zip(sliders(), values)}
    return build_recipe(models, method, params, components=list(components or []), dtype=dtype or None,
                        layout=layout or None, block_alpha=block_alpha, loras_text=loras)


def form_to_yaml(*args) -> tuple[str, str]:
    """The form -> (recipe YAML, status line); an incomplete form keeps nothing and says why."""
    try:
        return _form_recipe(*args).to_yaml(), ""
    except HubmixError as e:
        return "", f"⚠ {e}"


def _merge_with_progress(recipe_yaml: str, out: str, session: str, progress: Any) -> "dict[str, Any]":
    """Run the merge in a thread and report its bytes to the page's progress bar; Stop sets `cancel`."""
    cancel = CANCELS[session] = threading.Event()
    seen = {"done": 0, "total": 0}
    box: "dict[str, Any]" = {}

    def work() -> None:
        try:
            box["ok"] = actions.merge(recipe_yaml, out or None, cancel=cancel,
                                      progress=lambda d, t, stage: seen.update(done=d, total=t) if t else None)
        except BaseException as e:  # noqa: BLE001 - handed to the request's thread
            box["err"] = e

    worker = threading.Thread(target=work, daemon=True, name="hubmix-ui-merge")
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.2)
            if progress is not None and seen["total"]:
                progress((seen["done"], seen["total"]), desc="merging", unit="bytes")
    finally:
        if CANCELS.get(session) is cancel:
            del CANCELS[session]
    if "err" in box:
        raise box["err"]
    return box["ok"]


def build(*, space: bool = False) -> Any:
    """The Gradio Blocks of the page (`space`: visitors sign in and work runs as Jobs under their token)."""
    gr = require_gradio()
    sl = sliders(DEFAULT_METHOD)
    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"# {TITLE}\nEnter models, pick a method, check the recipe, then dry run, sample, merge and "
                    "push. The recipe YAML on the right is what every button runs (`hubmix merge --recipe`).")
        if space:
            gr.LoginButton()
        with gr.Row():
            with gr.Column(scale=3):
                models = gr.Textbox(label="Models, one per line (org/name, org/name@rev, org/name/file.safetensors, "
                                          "local paths)", lines=4, elem_id="models")
                suggestions = gr.Dataset(components=["textbox"], samples=[], label="Hub models (click to add)",
                                         visible=False, elem_id="model-suggestions", samples_per_page=search.LIMIT)
                check = gr.Button("Check models", elem_id="check-models", size="sm")
                families = gr.Dataframe(headers=["model", "family", "layout", "components"], interactive=False,
                                        elem_id="families", wrap=True)
                method = gr.Dropdown(sorted(methods()),
                                     value=DEFAULT_METHOD, label="Method", elem_id="method")
                about = gr.Markdown(method_info(DEFAULT_METHOD), elem_id="method-info")
                widgets = []
                for s in sl:
                    shown = DEFAULT_METHOD in s.methods
                    if s.choices:
                        w = gr.Dropdown(list(s.choices), value=s.default, label=s.name, info=s.help, visible=shown,
                                        elem_id=f"param-{s.name}")
                    else:
                        w = gr.Slider(s.minimum, s.maximum, value=s.default, step=s.step, label=s.name, info=s.help,
                                      visible=shown, elem_id=f"param-{s.name}")
                    widgets.append(w)
                components = gr.CheckboxGroup(list(component_names()), value=list(component_names()),
                                              label="Components to merge (the others are copied from model a)",
                                              elem_id="components")
                with gr.Row():
                    dtype = gr.Dropdown(list(CHOICES["dtype"]), value="", label="Output dtype (blank: model a's)",
                                        elem_id="dtype")
                    layout = gr.Dropdown(list(CHOICES["layout"]), value="", label="Output layout (blank: diffusers)",
                                         elem_id="layout")
                with gr.Accordion("Block weights (alpha per UNet block)", open=False):
                    preset = gr.Dropdown([""] + preset_names(), value="", label="supermerger preset",
                                         elem_id="preset")
                    block_alpha = gr.Textbox(label="Block alpha: 26 (SD1/SD2) or 20 (SDXL) comma-separated values "
                                                   "BASE,IN00..,M00,OUT00.., or a preset name", elem_id="block-alpha")
                    gr.Markdown("One slider per block of the models' family (after *Check models*); moving one "
                                "writes the list above.")
                    with gr.Row():
                        blocks = [gr.Slider(0, 1, value=0.5, step=0.01, label=f"block {i}", visible=False,
                                            min_width=90, elem_id=f"block-{i}") for i in range(26)]
                    family_state = gr.State(None)
                loras = gr.Textbox(label="LoRAs baked in, one REF[:STRENGTH] per line", lines=2, elem_id="loras")
            with gr.Column(scale=2):
                recipe_yaml = gr.Textbox(label="Recipe (YAML)", lines=16, elem_id="recipe-yaml", interactive=True)
                status = gr.Markdown(elem_id="recipe-status")
                with gr.Row():
                    download = gr.DownloadButton("Download recipe", elem_id="recipe-download")
                    upload = gr.UploadButton("Upload recipe", file_types=[".yaml", ".yml"], elem_id="recipe-upload")
        form = [models, method, components, dtype, layout, block_alpha, loras, *widgets]

        with gr.Tabs():
            with gr.Tab("Dry run"):
                dry_btn = gr.Button("Dry run", variant="primary", elem_id="dry-run")
                dry_table = gr.Dataframe(headers=actions.ROW_HEADERS, interactive=False, elem_id="dry-run-table")
                dry_plot = gr.Image(label="similarity", type="filepath", elem_id="dry-run-plot")
            with gr.Tab("Samples"):
                with gr.Row():
                    prompts = gr.Textbox("a photo of a cat", label="Prompts, one per line", lines=2, elem_id="prompts")
                    seeds = gr.Textbox("0", label="Seeds", elem_id="seeds")
                    steps = gr.Number(20, label="Steps", precision=0, elem_id="steps")
                    size = gr.Textbox("", label="Size WxH (blank: the model's)", elem_id="size")
                samples_btn = gr.Button("Render samples", variant="primary", elem_id="samples")
                gallery = gr.Gallery(label="inputs and the merge", columns=4, elem_id="gallery")
                samples_grid = gr.Image(type="filepath", visible=False)
            with gr.Tab("Sweep"):
                vary = gr.Textbox(label="Vary (NAME=V1,V2,... ; several separated by spaces)", elem_id="vary",
                                  placeholder="alpha=0.2,0.5,0.8")
                sweep_btn = gr.Button("Sweep", variant="primary", elem_id="sweep")
                sweep_grid = gr.Image(type="filepath", label="grid", elem_id="sweep-grid")
            with gr.Tab("Merge"):
                out = gr.Textbox(label="Output (a folder, or a .safetensors file; blank: a fresh folder)",
                                 elem_id="out")
                with gr.Row():
                    merge_btn = gr.Button("Merge", variant="primary", elem_id="merge")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
                summary = gr.Textbox(label="Summary", lines=8, elem_id="summary")
                result_path = gr.Textbox(label="Result", interactive=False, elem_id="result-path")
            with gr.Tab("Push"):
                with gr.Row():
                    repo_id = gr.Textbox(label="Repo id (org/name; blank: yours, under the result's name)",
                                         elem_id="repo-id")
                    private = gr.Checkbox(label="Private", elem_id="private")
                    branch = gr.Textbox(label="Branch (blank: main)", elem_id="branch")
                preview_btn = gr.Button("Preview card", elem_id="preview-card")
                card_md = gr.Markdown(elem_id="card")
                push_btn = gr.Button("Push", variant="primary", elem_id="push")
                commit_url = gr.Textbox(label="Commit", elem_id="commit-url")
            with gr.Tab("Remote"):
                with gr.Row():
                    flavor = gr.Dropdown([], label="Flavor", allow_custom_value=True, elem_id="flavor")
                    remote_repo = gr.Textbox(label="Push to (org/name)", elem_id="remote-repo")
                remote_btn = gr.Button("Run as a Job", variant="primary", elem_id="remote")
                remote_log = gr.Textbox(label="Job log", lines=12, elem_id="remote-log")

        # ---- the form -> the recipe, live; an uploaded recipe -> the form -----------------------------------
        for w in form:
            w.input(form_to_yaml, form, [recipe_yaml, status], api_visibility="private", queue=False)

        def on_method(name, models_text, *rest):
            own = sliders(name)  # this method's defaults, ranges and help
            ups = [gr.update(visible=name in s.methods, value=s.default, info=s.help,
                             **({} if s.choices else {"minimum": s.minimum, "maximum": s.maximum})) for s in own]
            rest = list(rest[:5]) + [s.default for s in own]
            return [method_info(name), *ups, *form_to_yaml(models_text, name, *rest)]
        method.input(on_method, [method, models, *form[2:]], [about, *widgets, recipe_yaml, status],
                     api_visibility="private", queue=False)

        Token = gr.OAuthToken | None  # noqa: N806  Gradio injects the signed-in visitor's token (None: not signed in)

        def on_check(text, oauth: Token):  # in a Space read as the visitor (no token when not signed in)
            rows = act(space, oauth, "describe_models", text) if space else describe_models(text)
            fam = first_family(rows)
            vals = block_values(fam)
            ups = [gr.update(visible=i < len(vals), label=vals[i][0] if i < len(vals) else f"block {i}",
                             elem_id=f"block-{i}") for i in range(len(blocks))]
            return [rows, fam, *ups]
        check.click(_errors(on_check), models, [families, family_state, *blocks], api_visibility="private")
        models.blur(_errors(on_check), models, [families, family_state, *blocks], api_visibility="private")

        def on_suggest(text, oauth: Token):  # the Hub's model search for the line being typed
            if search.query_of(text) is None:
                return gr.Dataset(samples=[], visible=False)
            time.sleep(DEBOUNCE)
            try:  # in a Space: the visitor's token or none, never the owner's
                found = search.suggest(text, token=(token_of(oauth) or False) if space else None)
            except HubmixError:
                found = []
            return gr.Dataset(samples=[[f] for f in found], visible=bool(found))
        models.input(on_suggest, models, suggestions, trigger_mode="always_last", show_progress="hidden",
                     concurrency_limit=4, api_visibility="private")

        def on_pick(picked, text):
            return search.pick(text, picked[0]), gr.Dataset(samples=[], visible=False)
        suggestions.click(on_pick, [suggestions, models], [models, suggestions], api_visibility="private",
                          queue=False).then(
            _errors(on_check), models, [families, family_state, *blocks], api_visibility="private").then(
            form_to_yaml, form, [recipe_yaml, status], api_visibility="private", queue=False)

        def on_block(fam, *values):  # the visible sliders -> the list
            n = len(block_values(fam))
            return block_list_text(list(values[:n])) if n else gr.update()
        for b in blocks:
            b.input(on_block, [family_state, *blocks], block_alpha, api_visibility="private", queue=False).then(
                form_to_yaml, form, [recipe_yaml, status], api_visibility="private", queue=False)

        def on_preset(p, fam):  # a preset fills the sliders (the family's blocks) and the list
            vals = block_values(fam, p or None)
            return [p or "", *[gr.update(value=vals[i][1]) if i < len(vals) else gr.update()
                               for i in range(len(blocks))]]
        preset.input(on_preset, [preset, family_state], [block_alpha, *blocks], api_visibility="private",
                     queue=False).then(
            form_to_yaml, form, [recipe_yaml, status], api_visibility="private", queue=False)

        def on_upload(file):
            r = recipe_from_yaml(Path(file).read_text(), source=Path(file).name)
            v = form_values(r)
            vals = [gr.update(value=v["params"].get(s.name, s.default), visible=r.method in s.methods, info=s.help,
                              **({} if s.choices else {"minimum": s.minimum, "maximum": s.maximum}))
                    for s in sliders(r.method)]
            return [v["models"], r.method, v["components"], v["dtype"], v["layout"], v["block_alpha"] or "",
                    v["loras"], *vals, r.to_yaml(), "", method_info(r.method)]
        upload.upload(_errors(on_upload), upload, [*form, recipe_yaml, status, about], api_visibility="private")

        def on_download(text):
            recipe_from_yaml(text)  # only a valid recipe is offered
            path = actions.fresh_dir("recipe") / "recipe.yaml"
            path.write_text(text)
            return str(path)
        recipe_yaml.change(lambda t: _safe_download(on_download, t), recipe_yaml, download,
                           api_visibility="private")

        # ---- the actions: the page's buttons (in a Space: as the signed-in visitor, hubmix.ui.visitor) ------
        def on_dry(text, oauth: Token):
            report, png = act(space, oauth, "dry_run", text)
            return actions.report_rows(report["report"] or {}), str(png) if png else None
        dry_btn.click(_errors(on_dry), recipe_yaml, [dry_table, dry_plot], api_visibility="private")

        def on_samples(text, p, s, n, z, oauth: Token):
            grid, images, _ = act(space, oauth, "samples", text, p, s, n, z)
            return [tuple(x) for x in images]
        samples_btn.click(_errors(on_samples), [recipe_yaml, prompts, seeds, steps, size], gallery,
                          api_visibility="private")
        def on_sweep(t, v, p, s, n, z, oauth: Token):
            return str(act(space, oauth, "sweep", t, v, p, s, n, z))
        sweep_btn.click(_errors(on_sweep),
                        [recipe_yaml, vary, prompts, seeds, steps, size], sweep_grid, api_visibility="private")

        def on_merge(text, target, request: gr.Request, oauth: Token, progress=gr.Progress()):
            if space:  # a Job under the visitor's account, pushed to their namespace
                info = act(space, oauth, "remote", text, "", None)
                return json.dumps(info, indent=2), ""
            try:
                info = _merge_with_progress(text, target, request.session_hash, progress)
            except Cancelled as e:
                raise gr.Error(f"stopped: {e}", print_exception=False) from None
            return info["text"] + f"\nwrote {info['output']} ({info['layout']}, {info['family']})", info["output"]
        merge_btn.click(_errors(on_merge), [recipe_yaml, out], [summary, result_path], api_visibility="private",
                        concurrency_id="merge")

        def on_stop(request: gr.Request):
            ev = CANCELS.get(request.session_hash)
            if ev is not None:
                ev.set()
        stop_btn.click(on_stop, None, None, api_visibility="private", queue=False)
        def on_card(path, repo, oauth: Token):
            return act(space, oauth, "card", path, repo)

        def on_push(path, repo, priv, br, oauth: Token):
            return act(space, oauth, "push", path, repo, priv, br)
        preview_btn.click(_errors(on_card), [result_path, repo_id], card_md, api_visibility="private")
        push_btn.click(_errors(on_push), [result_path, repo_id, private, branch], commit_url,
                       api_visibility="private")

        def on_remote(text, fl, repo, priv, oauth: Token):
            if space:
                yield json.dumps(act(space, oauth, "remote", text, repo or "", (fl or "").split(" ")[0] or None),
                                 indent=2)
                return
            lines: "list[str]" = []
            done = threading.Event()
            box: "dict[str, Any]" = {}

            def work():
                try:
                    box["ok"] = actions.remote(text, repo, (fl or "").split(" ")[0] or None, private=priv,
                                               log=lambda level, t: lines.append(t))
                except BaseException as e:  # noqa: BLE001
                    box["err"] = e
                finally:
                    done.set()
            threading.Thread(target=work, daemon=True).start()
            while not done.wait(0.5):
                yield "\n".join(lines[-200:])
            if "err" in box:
                raise box["err"]
            yield "\n".join(lines[-200:] + [json.dumps(box["ok"])])
        remote_btn.click(_errors_gen(on_remote), [recipe_yaml, flavor, remote_repo, private], remote_log,
                         api_visibility="private")
        def on_load(oauth: Token):  # in a Space listed with no token of the owner's
            return gr.update(choices=act(space, oauth, "flavors"))
        demo.load(on_load, None, flavor, api_visibility="private")

        endpoints(gr, space)
    return demo


def _safe_download(fn, text):
    try:
        return fn(text)
    except HubmixError:
        return None


def _errors_gen(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import gradio as gr

        try:
            yield from fn(*args, **kwargs)
        except HubmixError as e:
            raise gr.Error(str(e), print_exception=False) from None
    return wrapper


def launch(host: str = "127.0.0.1", port: "int | None" = None, share: bool = False, *, space: bool = False,
           block: bool = True) -> Any:
    """Serve the page (queued: several tabs at once, each merge into its own folder); returns the Blocks."""
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    demo = build(space=space)
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block, quiet=not block,
                allowed_paths=[str(actions.work_root())], ssr_mode=False)
    return demo


__all__ = ["build", "launch", "form_to_yaml", "CANCELS"]
