"""hubmix: merge diffusion models from the Hugging Face Hub or local files, component by component.

Library first: `hubmix.merge(Recipe(...))`, `hubmix.convert(...)`, `hubmix.inspect(...)`; the `hubmix` command is a
thin layer over these.
"""

__version__ = "0.1.0"

from .errors import FamilyError, HubError, HubmixError, InputError, OutputError, RecipeError  # noqa: E402
from .methods import get_method, methods, register  # noqa: E402
from .recipe import Recipe  # noqa: E402
from .merging import MergeResult, merge  # noqa: E402

__all__ = [
    "__version__", "merge", "MergeResult", "Recipe", "get_method", "methods", "register",
    "HubmixError", "InputError", "FamilyError", "RecipeError", "OutputError", "HubError",
]
