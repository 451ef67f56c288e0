"""Sphinx configuration for natpool's documentation (built in CI with ``-W``).

Pages are MyST markdown so ``spec/handover.md`` and the generated
``spec/diagrams.md`` are included as they are (one source, nothing copied by
hand); their mermaid fences become ``sphinxcontrib-mermaid`` directives, which
the HTML renders client-side with mermaid.js. The checker output on the
"checker" page is produced by running ``natpool check`` at build time, so it
always matches the code being documented.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

import natpool  # noqa: E402  (after the path fix, so a checkout builds without installing)

project = "natpool"
author = "natpool contributors"
release = natpool.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinxcontrib.mermaid",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "_generated/*.txt"]
myst_fence_as_directive = ["mermaid"]
myst_heading_anchors = 3
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
html_theme = "alabaster"
html_title = f"natpool {release}"


def _checker_output() -> None:
    """Write what ``natpool check --mutant no-drain`` prints (it exits 1: the seeded bug is caught)."""
    out = DOCS / "_generated"
    out.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "natpool", "check", "--mutant", "no-drain", str(ROOT / "models" / "fast-race.toml")]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)  # noqa: S603
    if result.returncode != 1 or "violated" not in result.stdout:
        raise RuntimeError(f"natpool check --mutant no-drain did not report the violation:\n{result.stdout}"
                           f"{result.stderr}")
    (out / "no-drain.txt").write_text(result.stdout)


_checker_output()
