"""natpool works as an installed tool: spec and models from package data, typed errors, metadata, version.

An installed wheel is simulated by pointing :mod:`natpool.resources` at no
checkout and at a package-data directory laid out as the wheel lays it
(``_data/spec``, ``_data/models``); CI also builds the real wheel and runs
this file against it outside the checkout (``.ci/wheel-check``).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
import re
import shutil
from pathlib import Path

import pytest

import natpool
from natpool import resources
from natpool.check.system import list_models, load_mutants, load_system
from natpool.cli import main
from natpool.errors import LocalError
from natpool.resources import SpecNotFound

REAL_SPEC = resources.spec_dir().path
REAL_MODELS = resources.models_dir().path

MY_MODEL = """\
[model]
name = "my-model"
doc = "A user's own model: one pair, one taker, nothing fails."

[constants]
K = 1
T0 = 1
T1 = 0
B = 2
loss = false
duplicate = false
settle = false
early_timeouts = false
breaks = false
lock_timeouts = false
expiry = false
remove = false
"""


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No checkout; package data as a wheel carries it. Returns the ``_data`` directory."""
    data = tmp_path / "site-packages" / "natpool" / "_data"
    shutil.copytree(REAL_SPEC, data / "spec")
    shutil.copytree(REAL_MODELS, data / "models")
    monkeypatch.setattr(resources, "source_root", lambda: None)
    monkeypatch.setattr(resources, "package_data_root", lambda: data)
    return data


@pytest.fixture
def nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither a checkout nor package data: a broken install."""
    monkeypatch.setattr(resources, "source_root", lambda: None)
    monkeypatch.setattr(resources, "package_data_root", lambda: tmp_path / "no-data")


def test_the_spec_and_models_are_found_here() -> None:
    spec, models = resources.spec_dir(), resources.models_dir()
    assert spec.origin in ("checkout", "package") and models.origin == spec.origin
    assert (spec.path / "entry.toml").is_file() and (spec.path / "mutants.toml").is_file()
    assert {p.stem for p in models.path.glob("*.toml")} >= {"fast-race", "fast-reliable"}


@pytest.mark.needs_source
def test_a_checkout_reads_its_own_tree() -> None:
    """An editable install must read (and regenerate into) the repository, never a copy."""
    root = resources.source_root()
    assert root is not None
    assert Path(natpool.__file__).resolve().parent == root / "natpool"
    assert resources.spec_dir().path == root / "spec" and resources.models_dir().path == root / "models"
    assert not (root / "natpool" / "_data").exists(), "natpool/_data is build output: never in the tree"


def test_without_a_checkout_the_package_data_is_read(installed: Path) -> None:
    assert resources.spec_dir().origin == "package"
    assert resources.spec_dir().path == installed / "spec"
    assert list_models("fast")[0].parent == installed / "models"
    assert load_system().machines.keys() == {"Entry", "Initiator", "Responder"}
    assert "no-drain" in load_mutants()


def test_check_lists_mutants_and_runs_a_users_model_from_package_data(
        installed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--list-mutants"]) == 0
    assert re.search(r"^no-drain\s", capsys.readouterr().out, flags=re.M)
    mine = tmp_path / "elsewhere" / "my.toml"
    mine.parent.mkdir()
    mine.write_text(MY_MODEL)
    assert main(["check", str(mine), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "[1/1] my-model:" in out
    assert out.splitlines()[-1].startswith("verdict: OK: 1 model")


def test_a_missing_spec_is_a_typed_error_on_stderr(nothing: None, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SpecNotFound) as info:
        resources.spec_dir()
    assert isinstance(info.value, LocalError) and isinstance(info.value, FileNotFoundError)
    for argv in (["check"], ["check", "--list-mutants"], ["spec", "generate"]):
        assert main(argv) == 2, argv
        out, err = capsys.readouterr()
        assert out == "" and "error:" in err and "--" in err, (argv, err)


def test_spec_dir_and_models_dir_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "spec"
    shutil.copytree(REAL_SPEC, spec)
    (spec / "mutants.toml").unlink()
    assert main(["check", "--spec-dir", str(spec), "--list-mutants"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "no mutants found" in err
    assert main(["check", "--spec-dir", str(tmp_path / "absent")]) == 2
    assert "no such directory" in capsys.readouterr().err
    models = tmp_path / "models"
    models.mkdir()
    assert main(["check", "--models-dir", str(models)]) == 2
    assert "no models of profile 'fast'" in capsys.readouterr().err
    (models / "mine.toml").write_text(MY_MODEL.replace('doc = "', 'profile = "fast"\ndoc = "'))
    assert main(["check", "--spec-dir", str(spec), "--models-dir", str(models), "--quiet"]) == 0
    assert "my-model" in capsys.readouterr().out


def test_a_missing_model_file_is_an_error_not_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(tmp_path / "nope.toml")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "nope.toml" in err


def test_spec_generate_refuses_read_only_package_data(installed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = {p: p.read_bytes() for p in installed.rglob("*") if p.is_file()}
    assert main(["spec", "generate"]) == 2
    assert "read-only package data" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in installed.rglob("*") if p.is_file()} == before


@pytest.mark.needs_source
def test_spec_generate_writes_into_the_checkout_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Default root = the checkout; shown on a copy of it (the real tree is left alone) with one stale file."""
    root = resources.source_root()
    assert root is not None
    copy = tmp_path / "checkout"
    for part in ("spec", "models", "natpool/machines"):
        shutil.copytree(root / part, copy / part)
    shutil.copy(root / "README.md", copy / "README.md")
    (copy / "pyproject.toml").write_text("")
    stale = copy / "natpool" / "machines" / "tables.py"
    stale.write_text("# stale\n")
    monkeypatch.setattr(resources, "source_root", lambda: copy)
    assert main(["spec", "generate"]) == 0
    assert "wrote natpool/machines/tables.py" in capsys.readouterr().out
    assert stale.read_text() == (root / "natpool" / "machines" / "tables.py").read_text()


def test_one_version_everywhere(capsys: pytest.CaptureFixture[str]) -> None:
    assert importlib.metadata.version("natpool") == natpool.__version__
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"natpool {natpool.__version__}"


def test_metadata_names_license_and_classifiers() -> None:
    meta = importlib.metadata.metadata("natpool")
    assert meta["License-Expression"] == "MIT"
    assert "Typing :: Typed" in meta.get_all("Classifier", [])
    assert meta["Author"]
    files = importlib.metadata.files("natpool") or []
    assert any(f.name == "LICENSE" for f in files), "the LICENSE file ships in the dist-info"


def test_every_module_is_importable() -> None:
    """A module left out of the wheel (or importing a checkout-only file) fails here, not at a user's."""
    names = [m.name for m in pkgutil.walk_packages(natpool.__path__, "natpool.") if m.name != "natpool.__main__"]
    assert "natpool.resources" in names and "natpool.machines.tables" in names
    for name in names:
        importlib.import_module(name)


def test_readme_has_no_relative_links() -> None:
    """A package index shows the README without the repository around it: relative links would be dead."""
    from tests.test_readme import readme_text

    links = re.findall(r"\]\(([^)\s]+)", readme_text())
    relative = [u for u in links if not re.match(r"[a-z][a-z0-9+.-]*:|#", u)]
    assert relative == []
