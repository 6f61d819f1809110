"""One diffusers pipeline, loaded once and reused: each model to render swaps its weights in, component by
component, and a component is rebuilt only when its config differs (so a sweep or a grid of models that share a
structure costs one pipeline in memory). A component's weights come from hubmix's own readers (canonical keys, any
layout), copied into the module's tensors with the same dtype conversion `from_pretrained(torch_dtype=...)` does.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from hubmix.formats.model import LocalModel, read_json
from hubmix.recipe import canonical_json
from hubmix.render.spec import RenderError

_NOT_CONFIG = {"torch_dtype", "dtype", "architectures", "transformers_version", "name_or_path"}


def config_signature(config: dict[str, Any]) -> str:
    """What makes two configs build the same module: everything but bookkeeping (versions, dtype, names)."""
    return canonical_json({k: v for k, v in config.items() if not k.startswith("_") and k not in _NOT_CONFIG})


def _folder_signature(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


@dataclass
class Subject:
    """A model to render: its opened weights, and the diffusers folder giving configs, tokenizers and scheduler."""

    name: str
    model: LocalModel
    folder: Path  # the model itself (diffusers layout) or its config source (single files)
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)  # per component, as the module is built

    @property
    def family(self) -> str:
        return self.model.family.id

    def scheduler_config(self) -> dict[str, Any]:
        cfg = read_json(self.folder / "scheduler" / "scheduler_config.json") or dict(
            self.model.family.defaults.get("scheduler", {}))
        if self.model.prediction_type:
            cfg["prediction_type"] = self.model.prediction_type
        return cfg

    def default_size(self) -> tuple[int, int]:
        """The pipeline's own default: UNet sample_size times the VAE's scale factor."""
        unet, vae = self.configs.get("unet", {}), self.configs.get("vae", {})
        side = int(unet.get("sample_size", 64)) * 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
        return side, side


@dataclass
class _Loaded:
    signature: str
    weights: tuple | None  # identity of the weights now in the module; None: unknown (written in place)


class Renderer:
    """Holds one pipeline; `load(subject)` makes it render that subject, `render(...)` draws one image."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self.modules: dict[str, Any] = {}
        self.loaded: dict[str, _Loaded] = {}
        self.tokenizers: dict[str, tuple[str, Any]] = {}
        self.pipe = None
        self.family: str | None = None
        self.last_clip: list | None = None  # a video pipeline's frames of the last render (its first is the image)

    # ---- loading ----------------------------------------------------------------------------------------------
    def load(self, subject: Subject) -> Any:
        import diffusers

        model, family = subject.model, subject.model.family
        if self.family != family.id:  # another family shares nothing
            self.modules, self.loaded, self.tokenizers, self.family = {}, {}, {}, family.id
        for cname, spec in family.components.items():
            comp = model.components.get(cname)
            if comp is None:  # an optional part this model lacks (Wan 2.1's second expert): None in the pipeline
                self.modules.pop(cname, None)
                self.loaded.pop(cname, None)
                continue
            sig = config_signature(subject.configs[cname])
            ident = ("file", cname, tuple(sorted({(str(r.file.path), r.file.path.stat().st_mtime_ns)
                                                  for r in comp.tensors.values()})))
            state = self.loaded.get(cname)
            if state is None or state.signature != sig:
                self.modules[cname] = self._build(spec, subject.configs[cname])
                self._copy(cname, _weights(comp), fresh=True)
            elif state.weights != ident:
                self._copy(cname, _weights(comp))
            self.loaded[cname] = _Loaded(sig, ident)
        for tok, cls in family.tokenizers.items():
            folder = subject.folder / tok
            if not folder.is_dir():
                raise RenderError(f"{subject.folder}: has no {tok}/ folder to take the tokenizer from")
            sig = _folder_signature(folder)
            if self.tokenizers.get(tok, ("",))[0] != sig:
                import transformers

                self.tokenizers[tok] = (sig, getattr(transformers, cls).from_pretrained(str(folder)))
        sched = subject.scheduler_config()
        scheduler = getattr(diffusers, sched["_class_name"]).from_config(sched)
        index = read_json(subject.folder / "model_index.json")
        extra = {k: v for k, v in index.items() if not k.startswith("_") and not isinstance(v, (list, dict))}
        parts = {**self.modules, **{k: v[1] for k, v in self.tokenizers.items()}, "scheduler": scheduler}
        own = index.get("_class_name")  # the model's own pipeline where it is one of the family's (FLUX.2 Klein)
        cls = getattr(diffusers, own if own in family.pipelines else family.pipeline)
        parts.update({c: None for c in family.components if c not in parts and c in _init_args(cls)})
        if "safety_checker" in cls._optional_components:  # no safety checker: an image it flags would be black
            parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
            extra.pop("requires_safety_checker", None)
        if "add_watermarker" in _init_args(cls):
            parts["add_watermarker"] = False
        self.pipe = cls(**parts, **{k: v for k, v in extra.items() if k in _init_args(cls)})
        self.pipe.set_progress_bar_config(disable=True)
        return self.pipe

    def _build(self, spec: Any, config: dict[str, Any]) -> Any:
        """The module from its config with empty weights (they are all assigned right after)."""
        from accelerate import init_empty_weights

        if spec.library == "diffusers":
            import diffusers

            cls = getattr(diffusers, spec.cls)
            with init_empty_weights():
                module = cls.from_config(config)
        else:
            import transformers

            cls = getattr(transformers, spec.cls)
            conf = cls.config_class.from_dict({k: v for k, v in config.items() if k not in ("torch_dtype", "dtype")})
            with init_empty_weights():
                module = cls(conf)
        return module.eval().requires_grad_(False)

    def _copy(self, cname: str, tensors: dict[str, torch.Tensor], *, fresh: bool = False) -> None:
        """Put canonical tensors into a module: assigned (a fresh module's parameters are empty) or copied in."""
        module = self.modules[cname]
        own = module.state_dict()
        names = {key_in_module(k, own): k for k in tensors}
        tied = getattr(module, "_tied_weights_keys", None)  # UMT5's encoder.embed_tokens is shared.weight
        for target, source in (tied.items() if isinstance(tied, dict) else ()):
            if target in own and target not in names and source in names:
                names[target] = names[source]
        missing = [k for k in own if k not in names and _persistent(module, k)]
        if None in names or missing:
            bad = ", ".join([k for m, k in names.items() if m is None][:3] + missing[:3])
            raise RenderError(f"{cname}: the weights do not fit the {type(module).__name__} their config builds "
                              f"({bad})")
        with torch.no_grad():
            if fresh:
                sd = {m: tensors[k].to(device=self.device, dtype=self._dtype_of(own[m]), copy=True)
                      for m, k in names.items()}
                module.load_state_dict(sd, strict=False, assign=True)
                module.to(self.device)  # buffers built on the CPU
            else:
                for m, k in names.items():
                    own[m].copy_(tensors[k])

    def _dtype_of(self, t: torch.Tensor) -> torch.dtype:
        return self.dtype if t.dtype.is_floating_point else t.dtype

    def targets(self, cname: str) -> Callable[[str], torch.Tensor]:
        """Where a canonical key of `cname` lives in the loaded module, for merges written straight into it."""
        own = self.modules[cname].state_dict()
        self.loaded[cname].weights = None  # written in place: the next load copies its weights again

        def target(key: str) -> torch.Tensor:
            name = key_in_module(key, own)
            if name is None:
                raise RenderError(f"{cname}/{key}: no such tensor in the pipeline's {cname}")
            return own[name]
        return target

    # ---- rendering --------------------------------------------------------------------------------------------
    def render(self, prompt: str, seed: int, *, negative: str | None, steps: int, size: tuple[int, int],
               guidance: float, on_step: Callable[[int], None] | None = None):
        """One image as a PIL image, exactly as `pipe(...)` returns it under the documented conventions.
        `on_step(total)` runs after every denoising step (some schedulers take more steps than asked)."""
        def step_end(pipe, i, t, kwargs):
            if on_step:
                on_step(len(pipe.scheduler.timesteps))
            return kwargs

        generator = torch.Generator("cpu").manual_seed(seed)
        kwargs = dict(prompt=prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
                      width=size[0], height=size[1], generator=generator, callback_on_step_end=step_end)
        accepted = _call_args(type(self.pipe))  # FLUX.2 Klein takes no negative prompt
        if "negative_prompt" not in accepted and negative is None:
            kwargs.pop("negative_prompt")
        if hasattr(self.pipe, "video_processor"):  # a video pipeline (Wan): the clip as PIL frames
            kwargs["output_type"] = "pil"
        out = self.pipe(**kwargs)
        frames = getattr(out, "frames", None)
        self.last_clip = list(frames[0]) if frames is not None else None
        return self.last_clip[0] if self.last_clip else out.images[0]


def _weights(comp: Any) -> dict[str, torch.Tensor]:
    """A component's canonical tensors, plus the names the layout repeats (T5's encoder.embed_tokens = shared,
    a separate parameter in transformers 5's T5EncoderModel)."""
    tensors = {k: r.load() for k, r in comp.tensors.items()}
    for name, canon in (comp.keymap.copies if comp.keymap else {}).items():
        if canon in tensors and name not in tensors:
            tensors[name] = tensors[canon]
    return tensors


def key_in_module(key: str, own: dict[str, Any]) -> str | None:
    """A canonical key's name in a module: the same, or without transformers 5's dropped `text_model.` prefix."""
    if key in own:
        return key
    # transformers 5 drops CLIP's `text_model.` and nests a vision-language model's parts (Qwen2.5-VL: files say
    # `model.layers.*`, `visual.*`; the module `model.language_model.layers.*`, `model.visual.*`)
    nested = "model.language_model." + key.removeprefix("model.") if key.startswith("model.") else "model." + key
    return next((k for k in (key.removeprefix("text_model."), nested) if k in own), None)


def _persistent(module: Any, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    sub = module.get_submodule(owner) if owner else module
    return leaf not in getattr(sub, "_non_persistent_buffers_set", set())


def _call_args(cls: type) -> set[str]:
    import inspect

    return set(inspect.signature(cls.__call__).parameters)


def _init_args(cls: type) -> set[str]:
    import inspect

    return set(inspect.signature(cls.__init__).parameters)
