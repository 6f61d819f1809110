"""Torch pickles (`.ckpt`, `.bin`, `.pt`, `.pth`) read with torch's weights-only unpickler, so a pickle never
runs code; whatever a damaged file makes the unpickler raise becomes one InputError line naming the file.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from hubmix.errors import InputError
from hubmix.formats.io.span import dtype_name
from hubmix.formats.io.weightfile import TensorInfo, WeightFile, open_regular

if TYPE_CHECKING:
    import torch

class TorchPickleFile(WeightFile):
    """`.ckpt` / `.bin` / `.pt`: loaded with weights_only=True, so a pickle never runs code; mmap where possible."""

    format = "pickle"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        os.close(open_regular(self.path))
        import torch

        obj = self._load()
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise InputError(f"{self.path}: the pickle holds a {type(obj).__name__}, not a dict of tensors")
        self._tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        self._info = {k: TensorInfo(dtype_name(v.dtype), tuple(v.shape)) for k, v in self._tensors.items()}

    def _load(self):
        how = ("Convert it with the tool that made it (for example with safetensors in an environment you trust) "
               "and pass the .safetensors file instead.")
        import torch

        for use_mmap in (True, False):
            try:
                with warnings.catch_warnings():  # a damaged file's random "protocol 122": the error says enough
                    warnings.filterwarnings("ignore", message="Detected pickle protocol")
                    return torch.load(self.path, map_location="cpu", weights_only=True, mmap=use_mmap)
            except pickle.UnpicklingError as e:
                reason = _refusal_reason(str(e))
                if not _is_pickle(self.path):  # not a pickle at all, or a damaged one
                    raise InputError(f"{self.path}: not a readable torch checkpoint, corrupt or truncated "
                                     f"({reason})") from None
                raise InputError(
                    f"{self.path}: refused to unpickle: it needs more than plain tensors to load ({reason}); "
                    f"hubmix never executes pickled code. {how}"
                ) from None
            except RuntimeError as e:
                if use_mmap and "mmap" in str(e):
                    continue  # legacy (non-zip) format cannot be memory-mapped: load it normally
                raise InputError(f"{self.path}: not a readable torch checkpoint ({str(e).splitlines()[0]})") from None
            except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
                raise InputError(f"{self.path}: not a readable torch checkpoint, corrupt or truncated ({e})") from None
            except Exception as e:  # noqa: BLE001 - damaged bytes reach the unpickler's internals (KeyError, ...)
                why = (str(e).splitlines() or [""])[0][:120]
                raise InputError(f"{self.path}: not a readable torch checkpoint, corrupt or truncated "
                                 f"({type(e).__name__}{': ' + why if why else ''})") from None
        raise AssertionError("unreachable")

    def tensor(self, key: str) -> torch.Tensor:
        return self._tensors[key]


def _refusal_reason(message: str) -> str:
    """What a pickle refused by weights_only tried to do, from torch's message: the global it names (the function
    it would call, e.g. posix.system) rather than torch's advice to turn weights_only off."""
    m = re.search(r"GLOBAL ([\w.]+)", message)
    if m:
        return f"it would call {m.group(1)}"
    lines = [ln.strip() for ln in message.splitlines() if ln.strip() and "weights_only" not in ln]
    return next((ln for ln in lines if ln.startswith(("Unsupported", "Trying"))), lines[0] if lines else "")


PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")


def _is_pickle(path: Path) -> bool:
    """Whether the file holds a well-formed pickle stream (a torch zip's data.pkl, or the file itself), checked
    by reading its opcodes with pickletools, which never executes anything."""
    import pickletools

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                name = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                if name is None:
                    return False
                data = z.read(name)
        else:
            with open(path, "rb") as f:
                data = f.read(64 << 20)  # the pickle comes first; tensor bytes follow it in the legacy format
        for _ in pickletools.genops(data):
            pass
        return True
    except Exception:  # noqa: BLE001 - any parse failure means: not a pickle
        return False
