"""The public API is importable by name and typed for users (PEP 561)."""

from __future__ import annotations

from pathlib import Path

import natpool


def test_package_ships_the_pep561_marker() -> None:
    """Without ``py.typed`` mypy treats every natpool name in user code as Any."""
    assert (Path(natpool.__file__).parent / "py.typed").is_file()


def test_every_public_name_resolves_and_is_listed_once() -> None:
    assert len(set(natpool.__all__)) == len(natpool.__all__)
    assert sorted(natpool.__all__) == natpool.__all__
    missing = [name for name in natpool.__all__ if getattr(natpool, name, None) is None]
    assert missing == []
