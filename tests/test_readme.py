"""README's Python examples run as written (docs that drift are bugs).

From a checkout the README file is read; against an installed wheel (CI runs
these tests outside the checkout) the README that the package index shows,
i.e. the long description in the installed metadata.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import re

from natpool.resources import source_root


def readme_text() -> str:
    root = source_root()
    if root is not None:
        return (root / "README.md").read_text()
    body = importlib.metadata.metadata("natpool").json.get("description")
    assert isinstance(body, str) and body, "the installed metadata has no long description"
    return body


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", readme_text(), flags=re.S)


def test_readme_has_a_quick_start() -> None:
    assert python_blocks(), "README.md lost its runnable quick start"


def test_quick_start_runs_and_hands_the_pair_over_on_both_sides() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(python_blocks()[0], "README.md", "exec"), {"__name__": "readme"})
    assert out.getvalue().strip() == "initiator InUse | responder InUse"
