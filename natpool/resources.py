"""Where ``natpool check`` and ``natpool spec`` find the spec and the models.

The repository's top-level ``spec/`` and ``models/`` are the single source.
A wheel carries a build-time copy of both as package data under
``natpool/_data/`` (pyproject's ``force-include``; nothing there is kept in
git), read through :mod:`importlib.resources`. So there are two places, tried
in this order:

1. the source checkout this package was imported from (a plain clone or an
   editable install, ``pip install -e .``): its ``spec/`` and ``models/`` are
   read, and ``natpool spec generate`` writes into that tree;
2. the package data of an installed wheel: readable, but read-only — there is
   no project tree to regenerate code into.

The checkout wins so that an editable install never reads a stale copy (an
editable wheel also drops one into site-packages, which this package does not
import from). Neither found raises :class:`SpecNotFound`; a command-line
``--spec-dir`` / ``--models-dir`` bypasses the search.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Literal

from natpool.errors import LocalError

Origin = Literal["checkout", "package", "given"]


class SpecNotFound(LocalError, FileNotFoundError):
    """The spec (or the models) directory is not where it must be: a broken install or a wrong ``--spec-dir``."""


@dataclass(frozen=True)
class DataDir:
    """A directory of spec or model files and where it came from (the origin decides whether it is writable)."""

    path: Path
    origin: Origin


def source_root() -> Path | None:
    """The checkout this package was imported from, or ``None`` for an installed wheel.

    A checkout is recognised by its ``pyproject.toml`` and ``spec/entry.toml``
    next to the ``natpool`` package directory, so a wheel in site-packages
    (where neither exists) never mistakes its neighbours for a project.
    """
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file() and (root / "spec" / "entry.toml").is_file():
        return root
    return None


def package_data_root() -> Traversable:
    """``natpool/_data`` of the imported package (present in a wheel, absent in a checkout)."""
    return resources.files("natpool") / "_data"


def _packaged(name: str) -> Path | None:
    data = package_data_root() / name
    # The checker globs and reads many files: it needs a real directory, which every pip install provides.
    if isinstance(data, Path) and data.is_dir():
        return data
    return None


def _find(name: str, marker: str) -> DataDir:
    root = source_root()
    if root is not None and (root / name).is_dir():
        return DataDir(root / name, "checkout")
    packaged = _packaged(name)
    if packaged is not None and any(packaged.glob(marker)):
        return DataDir(packaged, "package")
    raise SpecNotFound(
        f"natpool's {name}/ was found neither in a source checkout nor in the installed package data "
        f"(natpool/_data/{name}); reinstall natpool, or pass --{name}-dir DIR")


def spec_dir() -> DataDir:
    """The spec directory: the checkout's ``spec/`` or the wheel's packaged copy."""
    return _find("spec", "entry.toml")


def models_dir() -> DataDir:
    """The models directory: the checkout's ``models/`` or the wheel's packaged copy."""
    return _find("models", "*.toml")


def given_dir(path: Path, kind: Literal["spec", "models"]) -> DataDir:
    """A directory named on the command line; it must exist (and, for a spec, hold the machine files)."""
    if not path.is_dir():
        raise SpecNotFound(f"--{kind}-dir {path}: no such directory")
    if kind == "spec" and not (path / "entry.toml").is_file():
        raise SpecNotFound(f"--spec-dir {path}: no entry.toml there; a spec directory holds entry.toml, "
                           f"initiator.toml, responder.toml, system.toml and properties.toml")
    return DataDir(path, "given")
