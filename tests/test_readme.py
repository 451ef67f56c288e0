"""README's Python examples run as written (docs that drift are bugs)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_a_quick_start() -> None:
    assert python_blocks(), "README.md lost its runnable quick start"


def test_quick_start_runs_and_hands_the_pair_over_on_both_sides() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(python_blocks()[0], "README.md", "exec"), {"__name__": "readme"})
    assert out.getvalue().strip() == "initiator InUse | responder InUse"
