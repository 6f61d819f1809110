"""Print a pip constraints file pinning every direct dependency of hubmix to its lowest allowed version.

    python tools/lowest_constraints.py [--extra test] [--skip torch] > lowest.txt
    pip install -c lowest.txt -e '.[test]'
    python tools/lowest_constraints.py --extra test --skip torch --check   # in that environment: all at the pins?

Reads pyproject.toml's [project] dependencies (and the named extras): each `name>=X` (or `~=X`, `==X`) becomes
`name==X`; a requirement without a lower bound is left free. The transitive dependencies then resolve as pip
chooses: this is uv's `--resolution lowest-direct`. `--skip NAME` leaves NAME free (torch: its lowest CPU build is
not on this machine's disk). Standard library only (tomllib: Python 3.11+)."""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*([^;]*)(;.*)?$")


def lowest(req: str) -> tuple[str, str | None]:
    """(name, lowest allowed version or None) of one requirement string."""
    m = REQ.match(req)
    if not m:
        raise SystemExit(f"pyproject.toml: cannot read the requirement {req!r}")
    name, spec = m.group(1), m.group(3)
    low = re.search(r"(?:>=|~=|===?)\s*([0-9][^,\s]*)", spec)
    return re.sub(r"[-_.]+", "-", name).lower(), (low.group(1) if low else None)


def constraints(pyproject: Path, extras: list[str], skip: set[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    reqs = list(project.get("dependencies", []))
    for extra in extras:
        reqs += project.get("optional-dependencies", {}).get(extra, [])
    pins: dict[str, str] = {}
    for req in reqs:
        name, low = lowest(req)
        if low and name not in skip:
            pins[name] = max(pins.get(name, low), low, key=lambda v: [int(x) if x.isdigit() else 0
                                                                      for x in re.split(r"[.+-]", v)])
    return [f"{name}=={version}" for name, version in sorted(pins.items())]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pyproject", type=Path, default=Path(__file__).resolve().parents[1] / "pyproject.toml")
    ap.add_argument("--extra", action="append", default=[], help="also pin this extra's requirements")
    ap.add_argument("--skip", action="append", default=[], help="leave this dependency free")
    ap.add_argument("--check", action="store_true", help="check the running environment has exactly these versions")
    args = ap.parse_args(argv)
    pins = constraints(args.pyproject, args.extra, {s.lower() for s in args.skip})
    if not args.check:
        sys.stdout.write("".join(f"{line}\n" for line in pins))
        return
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    wrong = []
    for pin in pins:
        name, want = pin.split("==")
        try:
            have = version(name)
        except PackageNotFoundError:
            have = "missing"
        if have == "missing" or Version(have) != Version(want):
            wrong.append(f"{name} {have} (want {want})")
    print("lowest direct dependencies: " + ("; ".join(wrong) if wrong else ", ".join(pins)))
    sys.exit(1 if wrong else 0)


if __name__ == "__main__":
    main()
