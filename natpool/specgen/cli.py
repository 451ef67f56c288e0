"""``natpool spec generate [--check]``: regenerate (or verify) everything derived from spec/."""

from __future__ import annotations

import argparse
from pathlib import Path

from natpool.specgen.generate import generate
from natpool.specgen.load import default_spec_dir
from natpool.specgen.model import SpecError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="spec_command", required=True)
    gen = sub.add_parser("generate", help="write generated files (or verify them with --check)")
    gen.add_argument("--check", action="store_true", help="exit 1 if any generated file is stale; write nothing")
    gen.add_argument("--root", type=Path, default=default_spec_dir().parent, help="project root (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    root: Path = args.root
    if not (root / "spec").is_dir():
        print(f"error: {root / 'spec'} not found; run from a source checkout or pass --root")
        return 2
    try:
        changed = generate(root, check=args.check)
    except SpecError as exc:
        print(f"error: invalid spec: {exc}")
        return 2
    if args.check:
        if changed:
            for path in changed:
                print(f"stale: {path.relative_to(root)}")
            print("generated files are stale: run `natpool spec generate` and commit the result")
            return 1
        print("generated files are up to date")
        return 0
    for path in changed:
        print(f"wrote {path.relative_to(root)}")
    if not changed:
        print("nothing to do: generated files are up to date")
    return 0
