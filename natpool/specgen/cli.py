"""natpool spec generate [--check]: regenerate (or verify) everything derived from spec/.

The generated files (natpool/machines/, the README's and spec/diagrams.md's
mermaid diagrams, spec/tla/) live in the project tree, so this command needs
a source checkout: run it from a clone (an editable install, pip install -e .,
finds its own tree) or name the tree with --root. An installed wheel's spec
is read-only package data; the command refuses to write there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from natpool import resources
from natpool.resources import SpecNotFound
from natpool.spec.model import SpecError
from natpool.specgen.generate import generate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0].split(": ", 1)[1] if __doc__ else None
    parser.epilog = __doc__.split("\n\n", 1)[1] if __doc__ else None
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = parser.add_subparsers(dest="spec_command", required=True)
    gen = sub.add_parser("generate", help="write generated files (or verify them with --check)",
                         description="Write the files generated from spec/ (or verify them with --check).",
                         epilog=parser.epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    gen.add_argument("--check", action="store_true", help="exit 1 if any generated file is stale; write nothing")
    gen.add_argument("--root", type=Path, metavar="DIR",
                     help="project root holding spec/ and natpool/ (default: the checkout natpool runs from)")


def _err(msg: str) -> int:
    print(f"natpool spec: error: {msg}", file=sys.stderr)
    return 2


def _default_root() -> Path:
    root = resources.source_root()
    if root is not None:
        return root
    try:
        where = resources.spec_dir().path
    except SpecNotFound as exc:
        raise SpecNotFound(f"no source checkout and no installed spec ({exc}); pass --root DIR") from exc
    raise SpecNotFound(f"natpool runs from an installed package: its spec ({where}) is read-only package data and "
                       f"there is no project tree to write generated code into; run this from a source checkout "
                       f"(pip install -e .) or pass --root DIR")


def run(args: argparse.Namespace) -> int:
    try:
        root: Path = args.root if args.root is not None else _default_root()
    except SpecNotFound as exc:
        return _err(str(exc))
    if not (root / "spec" / "entry.toml").is_file():
        return _err(f"{root / 'spec'} holds no spec (entry.toml ...); pass --root with a source checkout")
    try:
        changed = generate(root, check=args.check)
    except SpecNotFound as exc:
        return _err(str(exc))
    except SpecError as exc:
        return _err(f"invalid spec: {exc}")
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
