"""The wheel ships every package and config, and the CLI stays light."""

from __future__ import annotations

import subprocess
import sys
import tomllib

from tests.conftest import REPO


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_every_python_package_is_in_the_wheel():
    setuptools = _pyproject()["tool"]["setuptools"]
    declared = set(setuptools["packages"])
    found = set()
    for name, root in setuptools["package-dir"].items():
        base = REPO / root
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base)
            found.add(".".join([name, *rel.parts]))
    assert found == declared


def test_eye_plugin_entry_point_and_extra():
    project = _pyproject()["project"]
    assert project["entry-points"]["distillkit"]["eye_fundus"] == "eye_fundus.plugin"
    eye = " ".join(project["optional-dependencies"]["eye"])
    for dependency in ("torchvision", "Pillow", "nltk"):
        assert dependency in eye
    # the torch range admits the pinned install (Makefile) and nothing newer
    assert "torch>=2.2,<=2.14.1" in project["dependencies"]


def test_help_does_not_import_torch():
    code = ("import sys; from distillkit.cli import cli; "
            "assert 'torch' not in sys.modules, 'torch imported by the CLI module'")
    subprocess.run([sys.executable, "-c", code], check=True)
