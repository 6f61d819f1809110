"""Model references: a local path, or a Hub repo id with optional revision and file.

The rule (also in the README and `--help`): an existing local path wins; `./x`, `../x`, `/x` and `~/x` are always
local; otherwise `org/name`, `org/name@revision` and `org/name/path/in/repo.safetensors` name Hub repos.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from hubmix.errors import InputError

_REPO_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_HUB = re.compile(rf"^(?P<repo>{_REPO_PART}/{_REPO_PART})(?:@(?P<rev>[^/]+))?(?:/(?P<file>.+))?$")
REF_RULE = ("An existing local path wins; ./x, ../x, /x and ~/x are always local; otherwise org/name, "
            "org/name@revision and org/name/path/in/repo.safetensors name Hugging Face Hub repos.")


@dataclass(frozen=True)
class ModelRef:
    text: str
    local: Path | None = None
    repo_id: str | None = None
    revision: str | None = None
    filename: str | None = None

    @property
    def is_hub(self) -> bool:
        return self.repo_id is not None

    def __str__(self) -> str:
        return self.text


def parse_ref(text: str) -> ModelRef:
    text = str(text).strip()
    if not text:
        raise InputError("empty model reference")
    p = Path(os.path.expanduser(text))
    explicit_local = text.startswith(("./", "../", "/", "~", ".\\")) or text in (".", "..")
    if p.exists() or explicit_local:
        return ModelRef(text, local=p)
    return parse_hub_ref(text)


def parse_hub_ref(text: str) -> ModelRef:
    """`text` as a Hub reference, whatever exists locally (a recipe's Hub inputs name repos, not paths)."""
    text = str(text).strip()
    m = _HUB.match(text)
    if not m:
        raise InputError(f"{text}: no such file or folder, and not a Hub reference (org/name[@revision][/file])")
    rev, file = m.group("rev"), m.group("file")
    # org/name/file@rev is accepted too (the revision after the file)
    if file and "@" in file and rev is None:
        file, rev = file.rsplit("@", 1)
    return ModelRef(text, repo_id=m.group("repo"), revision=rev, filename=file)
