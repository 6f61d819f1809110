"""hubmix: merge diffusion models from the Hugging Face Hub or local files, component by component.

Library first: `hubmix.run(Recipe(...), RunOptions(...))` (the whole flow: merge, samples, card, push, or a remote
job), `hubmix.merge(Recipe(...))`, `hubmix.flow.convert.convert(...)`,
`hubmix.flow.inspection.inspect_model(...)`; the `hubmix` command is a thin layer over these. The public names are
loaded on first use, so `import hubmix` (and `hubmix --help`) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from hubmix.errors import (Cancelled, FamilyError, HubError, HubmixError, InputError, OutputError,  # noqa: E402
                           RecipeError)

_LAZY = {"merge": "hubmix.flow.merging", "MergeResult": "hubmix.flow.merging", "Recipe": "hubmix.recipe",
         "run": "hubmix.flow.run", "RunOptions": "hubmix.flow.run", "FlowResult": "hubmix.flow.run",
         "get_method": "hubmix.methods", "methods": "hubmix.methods", "register": "hubmix.methods"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hubmix' has no attribute {name!r}")


__all__ = [
    "__version__", "merge", "MergeResult", "Recipe", "run", "RunOptions", "FlowResult", "get_method", "methods",
    "register", "HubmixError", "InputError", "FamilyError", "RecipeError", "OutputError", "HubError", "Cancelled",
]
