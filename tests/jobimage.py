"""The job image of tests/test_jobs.py: what a container of `pytorch/pytorch:...` holds, as far as a hubmix job sees it.

- `pip`: this interpreter's real pip, installing into the job's own folder (`$HOME/site`, `--no-deps`: the image
  already has hubmix's dependencies, which are this interpreter's). Its index is `PIP_INDEX_URL` when the job sets
  one, else a "PyPI" with nothing on it (`--no-index`, no config files): as on the real PyPI today, `hubmix==0.1.0`
  is not found and pip fails with its own message. A wheel path (the mounted wheel) installs for real. Two
  conventions of the older tests stay: a spec containing `broken` fails at once, one containing `slow` sleeps first.
- `hubmix`: `python -m hubmix` with only `$HOME/site` on PYTHONPATH, so the job runs the hubmix pip installed there
  (from the wheel), never this worktree; "command not found" when pip installed none. It records the imported
  package's file in `$HOME/hubmix-imported-from` for the tests.
"""

from __future__ import annotations

import stat
import sys
from pathlib import Path

PIP = """#!{python}
import os, subprocess, sys, time
args = sys.argv[1:]
with open({log!r}, "a") as f:
    f.write(" ".join(args) + "\\n")
text = " ".join(args)
if "broken" in text:
    print("ERROR: No matching distribution found for " + os.environ.get("HUBMIX_INSTALL", text))
    sys.exit(1)
if "slow" in text:
    time.sleep(60)
if args[:1] != ["install"]:
    sys.exit("pip: only `pip install` in this image")
index = os.environ.get("PIP_INDEX_URL")
cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", "--no-input",
       "--target", os.path.join(os.environ["HOME"], "site")]
cmd += ["--index-url", index] if index else ["--no-index"]
env = {{k: v for k, v in os.environ.items() if not k.startswith("PIP_")}}
env["PIP_CONFIG_FILE"] = os.devnull  # the host's pip.conf (find-links, extra indexes) is not the image's
sys.exit(subprocess.call(cmd + args[1:], env=env))
"""

HUBMIX = """#!/bin/sh
site="$HOME/site"
if [ ! -f "$site/hubmix/__init__.py" ]; then echo "bash: hubmix: command not found" >&2; exit 127; fi
PYTHONPATH="$site" {python} -c 'import hubmix; print(hubmix.__file__)' > "$HOME/hubmix-imported-from"
PYTHONPATH="$site" exec {python} -m hubmix "$@"
"""


def image(root: Path) -> dict[str, str]:
    """Write the image's `pip` and `hubmix` under `root`; the environment a container of it starts with."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "pip").write_text(PIP.format(python=sys.executable, log=str(root / "pip.log")))
    (root / "hubmix").write_text(HUBMIX.format(python=sys.executable))
    for f in ("pip", "hubmix"):
        (root / f).chmod(stat.S_IRWXU)
    return {"PATH": f"{root}:/usr/bin:/bin", "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
            "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def imported_from(runner, job_id: str) -> str | None:
    """The hubmix package file job `job_id` ran (None when it ran none)."""
    path = Path(runner.root) / job_id / "hubmix-imported-from"
    return path.read_text().strip() if path.is_file() else None


def site(runner, job_id: str) -> Path:
    return Path(runner.root) / job_id / "site"
