"""diffusers' single-file converters for Lumina 2 and Chroma with their hard-coded full-size widths read from the
checkpoint instead (Lumina 2: q 2304, k = v 768; Chroma: inner 3072), so they load tiny models; everything else is
diffusers' own code, as tests/test_flux.py does for Flux.1. Z-Image's converter needs no patch."""

from __future__ import annotations

import inspect

PATCHES = {
    "Lumina2Transformer2DModel": ("convert_lumina2_to_diffusers",
                                  {"q_dim = 2304": "q_dim = tensor.shape[1]",
                                   "k_dim = v_dim = 768": "k_dim = v_dim = (tensor.shape[0] - q_dim) // 2"}),
    "ChromaTransformer2DModel": ("convert_chroma_transformer_checkpoint_to_diffusers",
                                 {"inner_dim = 3072": "inner_dim = checkpoint['img_in.weight'].shape[0]"}),
}


def patch_loaders(monkeypatch) -> None:
    import diffusers.loaders.single_file_model as sfm
    import diffusers.loaders.single_file_utils as sfu

    for cls, (fn, edits) in PATCHES.items():
        src = inspect.getsource(getattr(sfu, fn))
        for old, new in edits.items():
            assert old in src, (fn, old)
            src = src.replace(old, new)
        namespace = dict(vars(sfu))
        exec(src, namespace)  # noqa: S102 - diffusers' own source, constants read from the checkpoint
        entry = dict(sfm.SINGLE_FILE_LOADABLE_CLASSES[cls])
        entry["checkpoint_mapping_fn"] = namespace[fn]
        monkeypatch.setitem(sfm.SINGLE_FILE_LOADABLE_CLASSES, cls, entry)
