"""Prediction type (epsilon / v-prediction) and zero terminal SNR: how inputs say them, how outputs keep them.

Weights alone cannot tell an epsilon model from a v-prediction one, so the files say it:
- single files (ComfyUI's convention, which NoobAI-style SDXL v-prediction files follow): an empty `v_pred` tensor
  marks v-prediction and an empty `ztsnr` tensor zero terminal SNR; the metadata `modelspec.predict_key` ("v" or
  "epsilon", ComfyUI) or `modelspec.prediction_type` (hubmix < 0.2 and kohya's tools) say the type too. The marker
  keys win over metadata, as in ComfyUI, which reads only the keys.
- diffusers folders: the scheduler config's `prediction_type` and `rescale_betas_zero_snr`.
A family may state what an unmarked single file is (`unmarked_prediction`: SDXL files without `v_pred` are epsilon,
as every SDXL loader assumes); otherwise it stays unknown (SD2's 512 and 768 models share one layout).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Collection, Mapping

if TYPE_CHECKING:
    from hubmix.formats.io.span import Span

V_PRED_KEY = "v_pred"
ZTSNR_KEY = "ztsnr"
MARKER_KEYS = (V_PRED_KEY, ZTSNR_KEY)
_META_VALUES = {"v": "v_prediction", "v_prediction": "v_prediction", "epsilon": "epsilon", "eps": "epsilon"}


@dataclass(frozen=True)
class Prediction:
    type: str | None = None  # "epsilon", "v_prediction" or None (unknown)
    zero_snr: bool | None = None  # None: not stated
    source: str = ""  # what said so, for messages


def from_single_file(keys: Collection[str], metadata: Mapping[str, str], unmarked: str | None) -> Prediction:
    """What a single file's marker keys and metadata say (`unmarked`: the family's type for a file that says
    nothing)."""
    zero_snr = True if ZTSNR_KEY in keys else None
    if V_PRED_KEY in keys:
        return Prediction("v_prediction", zero_snr or False, f"its {V_PRED_KEY} key")
    for field in ("modelspec.predict_key", "modelspec.prediction_type"):
        kind = _META_VALUES.get(str(metadata.get(field, "")).strip().lower())
        if kind:
            return Prediction(kind, zero_snr, f"its {field} metadata")
    if zero_snr:
        return Prediction(unmarked, True, f"its {ZTSNR_KEY} key")
    return Prediction(unmarked, None, "the family default for unmarked files" if unmarked else "")


def from_scheduler(config: Mapping[str, Any]) -> Prediction:
    kind = config.get("prediction_type")
    zsnr = config.get("rescale_betas_zero_snr")
    return Prediction(kind if kind in ("epsilon", "v_prediction") else None,
                      bool(zsnr) if zsnr is not None else None, "its scheduler config")


def update_scheduler(config: dict[str, Any], pred: Prediction) -> dict[str, Any]:
    """A scheduler config that says `pred`: prediction_type, and rescale_betas_zero_snr when zero SNR is stated
    (or the config already names it)."""
    out = dict(config)
    if pred.type:
        out["prediction_type"] = pred.type
    if pred.zero_snr or (pred.zero_snr is not None and "rescale_betas_zero_snr" in out):
        out["rescale_betas_zero_snr"] = bool(pred.zero_snr)
    return out


def single_file_metadata(pred: Prediction) -> dict[str, str]:
    """Both spellings: ComfyUI's `predict_key` and the `prediction_type` older hubmix files carry."""
    if not pred.type:
        return {}
    short = "v" if pred.type == "v_prediction" else pred.type
    return {"modelspec.predict_key": short, "modelspec.prediction_type": short}


def marker_tensors(pred: Prediction, keys_family_writes: Collection[str]) -> dict[str, Span]:
    """The empty marker tensors a single file gets (ComfyUI writes them as `torch.tensor([])`, float32)."""
    from hubmix.formats.io.span import Span

    out = {}
    if pred.type == "v_prediction" and V_PRED_KEY in keys_family_writes:
        out[V_PRED_KEY] = Span.of_bytes(b"", "float32", (0,))
        if pred.zero_snr and ZTSNR_KEY in keys_family_writes:
            out[ZTSNR_KEY] = Span.of_bytes(b"", "float32", (0,))
    return out
