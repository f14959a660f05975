#!/usr/bin/env python3
"""Print the pins of the named packages from pyproject.toml, one a line (the one list of versions).

    python scripts/pins.py [--pyproject FILE] torch torchvision sam2
    python scripts/pins.py --all [--extra ray]      (every dependency: a requirements file)

setup.sh and deploy/Containerfile install torch and torchvision first and then sam2 without build
isolation (its build must see that torch instead of downloading another); both read the pins here.
Standard library only: it runs before anything is installed.
"""

import argparse
import re
import sys
import tomllib
from pathlib import Path


def dependencies(pyproject: Path, extras: list[str] = ()) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    return project["dependencies"] + [d for e in extras for d in project["optional-dependencies"][e]]


def pins(pyproject: Path, names: list[str]) -> list[str]:
    deps = dependencies(pyproject)
    out = []
    for name in names:
        found = [d for d in deps if re.match(rf"{re.escape(name)}\s*[=<>!~]", d)]
        if not found:
            raise SystemExit(f"{pyproject}: no pinned dependency named {name}")
        out.append(found[0])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pyproject", type=Path, default=Path(__file__).resolve().parents[1] / "pyproject.toml")
    ap.add_argument("--all", action="store_true", help="every dependency (with --extra: and those extras')")
    ap.add_argument("--extra", action="append", default=[], help="an optional-dependencies group (with --all)")
    ap.add_argument("names", nargs="*")
    args = ap.parse_args()
    if args.all == bool(args.names):
        ap.error("name packages or give --all")
    print("\n".join(dependencies(args.pyproject, args.extra) if args.all else pins(args.pyproject, args.names)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
