"""Every error hubmix raises on purpose is a HubmixError whose message names the file, key or repo at fault.

The CLI prints these as one line and exits non-zero; anything else is a bug and shows a traceback with --debug.
"""


class HubmixError(Exception):
    """Base class: a problem with the user's inputs or environment, explained in the message."""


class InputError(HubmixError):
    """A model reference, file or folder that cannot be used (missing, truncated, not a model, unsafe)."""


class FamilyError(HubmixError):
    """A model whose family or layout cannot be determined, or inputs of different families."""


class RecipeError(HubmixError):
    """A recipe (YAML or CLI arguments) that does not validate."""


class OutputError(HubmixError):
    """The output path cannot be written (exists without --overwrite, not writable)."""


class HubError(HubmixError):
    """A Hub operation failed: repo, revision or file not found, gated, offline, upload refused."""


class Cancelled(HubmixError):
    """The caller asked a running merge to stop (`hubmix.flow.run.run(cancel=...)`); nothing was written."""


def recipe_number(value: object, message: str) -> float:
    """`value` as a float, or a RecipeError: `message` with `{got}` replaced by the value's repr (NaN for a NaN),
    for a value that is not a number or is NaN (one check for every number a recipe or LoRA entry holds)."""
    try:
        f = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise RecipeError(message.replace("{got}", repr(value))) from None
    if f != f:
        raise RecipeError(message.replace("{got}", "NaN"))
    return f
