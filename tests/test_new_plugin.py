"""``distillkit new-plugin``: the package it writes installs, is listed, and passes its own tests."""

from __future__ import annotations

import importlib
import os
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from click.testing import CliRunner

from distillkit.cli import cli
from distillkit.plugins import PluginManager
from tests.conftest import REPO
from tests.test_public_api import private_imports


def new_plugin(*args) -> object:
    return CliRunner().invoke(cli, ["new-plugin", *map(str, args)])


def test_new_plugin_writes_a_package_that_uses_only_the_public_api(tmp_path, monkeypatch):
    result = new_plugin("wine-grades", "--dir", tmp_path)
    assert result.exit_code == 0, result.output
    root = tmp_path / "wine-grades"
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == ["README.md", "config.yaml", "data.csv", "pyproject.toml", "tests/test_plugin.py",
                     "wine_grades/__init__.py", "wine_grades/data.py", "wine_grades/plugin.py", "wine_grades/task.py"]
    pyproject = (root / "pyproject.toml").read_text()
    assert '[project.entry-points.distillkit]\nwine_grades = "wine_grades.plugin"' in pyproject
    assert 'name = "wine-grades"' in pyproject
    assert [p for f in root.rglob("*.py") for p in private_imports(f)] == []
    # 120 labeled rows and 40 unlabeled ones, three classes
    rows = (root / "data.csv").read_text().splitlines()[1:]
    labels = [r.rsplit(",", 1)[1] for r in rows]
    assert len(rows) == 160 and labels.count("") == 40
    assert {label: labels.count(label) for label in set(labels) - {""}} == {"alpha": 40, "beta": 40, "gamma": 40}

    # registered explicitly (not installed), its components validate the config it ships
    monkeypatch.syspath_prepend(str(root))
    plugin = importlib.import_module("wine_grades.plugin")
    try:
        registries = PluginManager(autoload=False, plugins=[plugin]).registries
        from distillkit.config import load_config

        config = load_config(root / "config.yaml", registries)
        assert config.data.kind == "wine_grades_csv" and config.tasks["label"].kind == "wine_grades_label"
        source = registries.dataset.get("wine_grades_csv")
        from distillkit.data import DataContext

        data = source(config.data, DataContext(cache_dir=tmp_path, base_dir=root)).load()
        assert data.inputs.shape == (160, 3) and int(data.pool.sum()) == 40
        first = rows[0].split(",")
        assert data.inputs[0].tolist() == pytest.approx([float(v) for v in first[2:5]])
        assert data.labels["label"][0] == first[5] and data.groups[:3] == ["g0", "g0", "g1"]
    finally:
        for name in [m for m in sys.modules if m == "wine_grades" or m.startswith("wine_grades.")]:
            del sys.modules[name]


@pytest.mark.parametrize("name, message", [("9lives", "not a valid plugin name"), ("my plugin", "not a valid"),
                                           ("class", "not a valid"), ("eye_fundus", "is taken")])
def test_new_plugin_refuses_bad_names(tmp_path, name, message):
    result = new_plugin(name, "--dir", tmp_path)
    assert result.exit_code == 2 and message in result.output
    assert list(tmp_path.iterdir()) == []


def test_new_plugin_never_overwrites(tmp_path):
    (tmp_path / "grades").mkdir()
    (tmp_path / "grades" / "mine.txt").write_text("keep")
    result = new_plugin("grades", "--dir", tmp_path)
    assert result.exit_code == 2 and "already exists" in result.output
    assert [p.name for p in (tmp_path / "grades").iterdir()] == ["mine.txt"]


@pytest.mark.slow
def test_the_new_plugin_installs_is_listed_and_passes_its_own_tests(tmp_path):
    assert new_plugin("grades", "--dir", tmp_path).exit_code == 0
    root = tmp_path / "grades"
    # A venv on top of this interpreter's packages (torch, pytest, pip, setuptools): nothing
    # is downloaded, and the plugin is installed into the venv alone.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    parents = [p for p in [*site.getsitepackages(), sysconfig.get_paths()["purelib"]] if Path(p).is_dir()]
    Path(purelib, "_distillkit_parent.pth").write_text(
        "".join(f"import site; site.addsitedir({p!r})\n" for p in dict.fromkeys(parents)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "plugins")]),
           "DISTILLKIT_CACHE": str(tmp_path / "cache")}
    env.pop("DISTILLKIT_DISABLE_PLUGIN_AUTOLOAD", None)

    def run(*args: str, cwd: Path = tmp_path) -> subprocess.CompletedProcess:
        done = subprocess.run([str(python), *args], cwd=cwd, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        return done

    run("-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-e", str(root))
    listed = run("-m", "distillkit", "plugins").stdout.splitlines()
    # each plugin: a line "name version (source)", then its components and commands, indented;
    # the scaffold registers a task and a dataset source and adds no command
    start = listed.index("grades 0.1.0 (entry point)")
    block = listed[start + 1:start + 5]
    block = block[:next((i for i, line in enumerate(block) if not line.startswith("  ")), len(block))]
    assert block == ["  tasks: grades_label", "  datasets: grades_csv"]
    assert any(line.startswith("  commands: ") and "new-plugin" in line for line in listed[:start])  # the core's
    # not installed in this interpreter: only the venv sees its entry point
    assert "grades" not in PluginManager().info
    tests = run("-m", "pytest", "-q", "-p", "no:cacheprovider", str(root / "tests")).stdout
    assert "6 passed" in tests, tests
