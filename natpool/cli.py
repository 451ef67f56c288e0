"""natpool command line: spec generation, model checking, demo and benchmarks.

Each subcommand lives in the module that owns its subject and exposes
``add_arguments(parser)`` and ``run(args) -> int``; this file only routes.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from natpool import __version__

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "spec": ("natpool.specgen.cli", "generate code, diagrams and TLA+ from spec/"),
    "check": ("natpool.check.cli", "model-check the protocol over models/*.toml"),
    "demo": ("natpool.demo", "two pools on loopback UDP + TCP signalling, with live stats"),
    "bench": ("natpool.bench.cli", "benchmarks against same-run baselines"),
}


def build_parser() -> argparse.ArgumentParser:
    # The module docstring's first sentence, plain text (argparse prints it verbatim).
    description = __doc__.split("\n\n")[0].replace("\n", " ") if __doc__ else None
    parser = argparse.ArgumentParser(prog="natpool", description=description)
    parser.add_argument("--version", action="version", version=f"natpool {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is None or not module_name.startswith(exc.name):
                raise
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args._run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
