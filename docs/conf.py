"""Sphinx configuration for natpool's documentation (built in CI with ``-W``).

Pages are MyST markdown so ``spec/handover.md`` and the generated
``spec/diagrams.md`` are included as they are (one source, nothing copied by
hand); their mermaid fences become ``sphinxcontrib-mermaid`` directives, which
the HTML renders client-side with mermaid.js. The checker output on the
"checker" page is produced by running ``natpool check`` at build time, so it
always matches the code being documented.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
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
    "sphinx.ext.viewcode",
    "sphinxcontrib.mermaid",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "_generated"]
myst_fence_as_directive = ["mermaid"]
# mermaid.js names each SVG after Date.now() unless ids are deterministic: two diagrams rendered in the same
# millisecond (spec/diagrams.md has three) then share an id and the second draws into the first one's SVG.
mermaid_init_config = {"startOnLoad": False, "deterministicIds": True}
mermaid_height = "auto"  # the diagram's own height (the default box is 500 px: wide LR diagrams shrink in it)
myst_heading_anchors = 3
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
html_theme = "alabaster"  # ships with Sphinx: nothing more to install
html_theme_options = {"page_width": "1140px"}  # room for the counterexample tables
html_title = f"natpool {release}"


GENERATED = DOCS / "_generated"  # written at every build, never committed (see .gitignore)


def _one_line(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _spec_tables() -> None:
    """The property and mutant tables, straight from spec/properties.toml and spec/mutants.toml."""
    props = tomllib.loads((ROOT / "spec" / "properties.toml").read_text())["property"]
    rows = ["| property | kind | formula | why |", "|---|---|---|---|"]
    for prop in props:
        kinds = [k for k in ("invariant", "action", "stuck") if k in prop]
        formula = " ; ".join(f"`{prop[k]}`" for k in kinds)
        label = " + ".join({"stuck": "liveness (never stuck in)"}.get(k, k) for k in kinds)
        rows.append(f"| {prop['name']} | {label} | {_one_line(formula)} | {_one_line(prop['why'])} |")
    (GENERATED / "properties.md").write_text("\n".join(rows) + "\n")
    mutants = tomllib.loads((ROOT / "spec" / "mutants.toml").read_text())["mutant"]
    rows = ["| mutant | must be caught by | the seeded bug |", "|---|---|---|"]
    rows += [f"| `{m['name']}` | {', '.join(m['expect'])} | {_one_line(m['doc'])} |" for m in mutants]
    (GENERATED / "mutants.md").write_text("\n".join(rows) + "\n")


def _checker_output() -> None:
    """Write what ``natpool check --mutant no-drain`` prints (it exits 1: the seeded bug is caught).

    checker.md walks through this trace step by step, so the build checks the
    facts that walk-through relies on and fails if the checker's output drifts.
    """
    check = [sys.executable, "-m", "natpool", "check"]
    helptext = subprocess.run([*check, "--help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout  # noqa: S603
    verbose = ["-v"] if re.search(r"(^|\s)-v[\s,]", helptext) else []  # a CLI that folds expected traces unless -v
    cmd = [*check, *verbose, "--mutant", "no-drain", str(ROOT / "models" / "fast-race.toml")]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)  # noqa: S603
    trace = result.stdout
    facts = (r"CleanHandover violated", r"ini_finish_lock\(s=0\)\s+p0:Locked\|InLocking\s",
             r"resp_settle\(s=0\)\s+p0:Locked\|InUse\s+\S+\s+p0:1>0< o1")
    missing = [fact for fact in facts if not re.search(fact, trace)]
    if result.returncode not in (0, 1) or missing:
        raise RuntimeError(f"docs/checker.md explains a no-drain trace with {missing}; `{' '.join(cmd)}` exited "
                           f"{result.returncode} and printed:\n{trace}{result.stderr}")
    (GENERATED / "no-drain.txt").write_text(trace)


def _api_leftovers() -> None:
    """api.md lists the public names by hand, in groups; other names of ``natpool.__all__`` land in its last section.

    So a new export is never missing from the reference, even before someone files it under its group.
    """
    directive = re.compile(r"^\.\. auto(?:class|exception|data):: natpool\.(\w+)$", re.M)
    listed = set(directive.findall((DOCS / "api.md").read_text()))
    rows = ["Names exported since the groups above were written; each still awaits its group.", "", "```{eval-rst}"]
    for name in sorted(set(natpool.__all__) - listed):
        obj = getattr(natpool, name)
        kind = "exception" if isinstance(obj, type) and issubclass(obj, BaseException) else \
            "class" if isinstance(obj, type) else "data"
        rows += [f".. auto{kind}:: natpool.{name}", ""]
    text = "\n".join([*rows, "```", ""]) if len(rows) > 3 else "None: every exported name is in its group.\n"
    (GENERATED / "api-leftovers.md").write_text(text)


GENERATED.mkdir(exist_ok=True)
_api_leftovers()
_spec_tables()
_checker_output()
