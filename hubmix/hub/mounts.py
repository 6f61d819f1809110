"""Hub inputs mounted read-only in a Hugging Face Job: `HUBMIX_MOUNTS` maps `repo@commit` to the folder where the
job sees that repo at that commit (a model Volume). `hub.resolve` reads inputs from there instead of downloading
them; the pinned identity (repo, commit) is the same, so the canonical recipe and the output bytes are those of a
local merge."""

from __future__ import annotations

import json
import os
from pathlib import Path

ENV = "HUBMIX_MOUNTS"


def mounts() -> dict[str, Path]:
    raw = os.environ.get(ENV)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        from hubmix.errors import HubError

        raise HubError(f"{ENV}: not a JSON object of repo@commit -> folder") from None
    return {str(k): Path(v) for k, v in data.items()} if isinstance(data, dict) else {}


def mounted(repo: str, revision: str | None) -> Path | None:
    """The folder holding `repo` at commit `revision`, when it is mounted."""
    return mounts().get(f"{repo}@{revision}") if revision else None


def listing(root: Path) -> list[str]:
    """The repo's file names, as the Hub lists them (siblings), from its mount."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()
                  and ".git" not in p.relative_to(root).parts[:1])


def card_license(root: Path) -> str | None:
    """The license in the mounted repo's model card metadata, as `model_info().card_data` gives it."""
    readme = root / "README.md"
    if not readme.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        lic = ModelCard(readme.read_text(encoding="utf-8")).data.to_dict().get("license")
    except Exception:  # noqa: BLE001 - an unparsable card declares no license
        return None
    return lic if isinstance(lic, str) else None
