"""A plain ``pip install distillkit`` (no extras) runs every core command.

The bundled eye plugin needs the ``eye`` extra (nltk, torchvision, Pillow). Without it the
core works and the plugin is reported once, with the extra to install. The fast tests block
those imports in a subprocess; ``scripts/check_plain_install.sh`` checks a real clean venv
(marked ``integration``).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

EXTRA_ONLY = ("nltk", "torchvision", "PIL")

# Runs the CLI (or the code after ``--code``) with the eye extra's modules made unimportable,
# as they are in an environment that installed distillkit without extras.
_BLOCKED = f"""
import sys
BLOCKED = {set(EXTRA_ONLY)!r}

class BlockExtras:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named '{{name}}'", name=name)
        return None

sys.meta_path.insert(0, BlockExtras())
if sys.argv[1] == "--code":
    exec(sys.argv[2])
else:
    from distillkit.cli import main
    sys.argv = ["distillkit", *sys.argv[1:]]
    main()
"""

NOTICE = ("warning: plugin 'eye_fundus' is unavailable: No module named 'nltk' (in its register_tasks hook). "
          "Install its extra: pip install 'distillkit[eye]'.")


def _without_extras(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "plugins")]),
               DISTILLKIT_CACHE=str(tmp_path / "cache"), COLUMNS="200")
    env.pop("DISTILLKIT_DISABLE_PLUGIN_AUTOLOAD", None)
    return subprocess.run([sys.executable, "-c", _BLOCKED, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)


def _notices(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "eye_fundus" in line]


@pytest.mark.slow
def test_core_commands_run_without_the_eye_extra_and_say_so_once(tmp_path):
    plugins = _without_extras(tmp_path, "plugins")
    assert plugins.returncode == 0, plugins.stderr
    assert plugins.stdout.startswith("builtin ")
    assert "  datasets: toy_blobs, toy_regression\n" in plugins.stdout and "synthetic_fundus" not in plugins.stdout
    [notice] = _notices(plugins.stderr)
    assert notice.startswith(NOTICE)

    config = str(REPO / "examples" / "toy.yaml")
    validate = _without_extras(tmp_path, "validate", config)
    assert validate.returncode == 0, validate.stderr
    assert "toy.yaml: valid. 2 task(s), 5 stage(s)." in validate.stdout
    [notice] = _notices(validate.stderr)
    assert notice.startswith(NOTICE)

    out = tmp_path / "run"
    run = _without_extras(tmp_path, "run", config, "--out", str(out), "--quiet", "--set", "training.epochs=1",
                          "--set", "data.num_labeled=200", "--set", "data.num_unlabeled=100")
    assert run.returncode == 0, run.stderr
    [notice] = _notices(run.stderr)
    assert notice.startswith(NOTICE)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"teachers", "m1", "m2", "m3", "report"}
    assert 0 <= metrics["report"]["test"]["m1"]["cluster"]["accuracy"] <= 1

    # predict is a core command: the toy source reads a point from a text file, and the
    # probabilities are the model's own on that point
    model_file = out / "stages" / "m1" / "model.safetensors"
    point = [0.5, -1.0, 2.0, 0.0, 1.5, -0.5, 0.25, 3.0]
    (tmp_path / "point.txt").write_text(" ".join(map(str, point)))
    predict = _without_extras(tmp_path, "predict", str(model_file), "point.txt", "--json")
    assert predict.returncode == 0, predict.stderr
    [notice] = _notices(predict.stderr)
    assert notice.startswith(NOTICE)
    [row] = json.loads(predict.stdout)
    assert row["file"] == "point.txt"
    import torch

    from distillkit.models import load_model
    from distillkit.plugins import PluginManager

    loaded = load_model(model_file, PluginManager(autoload=False).registries, torch.device("cpu"))
    with torch.no_grad():
        features = loaded.model.features(torch.tensor([point]))
        probs = loaded.tasks["cluster"].predict(loaded.model.heads["cluster"], features)["probs"][0]
    classes = loaded.tasks["cluster"].class_names
    assert [row["tasks"]["cluster"]["probabilities"][c] for c in classes] == pytest.approx(probs.tolist(), abs=1e-6)

    # an eye command says why it cannot run, rather than failing with a traceback
    manifest = _without_extras(tmp_path, "eval-manifest", str(out), "manifest.csv")
    assert manifest.returncode == 2, manifest.stderr
    [notice, error] = _notices(manifest.stderr)
    assert notice.startswith(NOTICE)
    assert error == ("error: 'eval-manifest' is a command of plugin 'eye_fundus', which is unavailable "
                     "(see the warning above).")


def test_every_core_module_imports_without_the_eye_extra(tmp_path):
    """``import distillkit`` and each of its modules (but ``plots``, the report's figures, which
    need matplotlib from the ``report`` extra) import with nltk, torchvision and PIL absent."""
    code = ("import importlib, pkgutil, distillkit\n"
            "names = [m.name for m in pkgutil.walk_packages(distillkit.__path__, 'distillkit.')]\n"
            "assert 'distillkit.cli.run' in names and 'distillkit.runner' in names\n"
            "for name in names:\n"
            "    if name not in ('distillkit.plots', 'distillkit.__main__'):\n"
            "        importlib.import_module(name)\n"
            f"assert not {set(EXTRA_ONLY)!r} & set(sys.modules), 'an extra module was imported'\n")
    result = _without_extras(tmp_path, "--code", code)
    assert result.returncode == 0, result.stderr


def _top_level_imports(path: Path) -> set[str]:
    """Modules a file imports when it is imported (not inside functions or classes' methods)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()

    def visit(nodes) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module.split(".")[0])
            elif isinstance(node, (ast.If, ast.Try, ast.With, ast.ClassDef)):
                visit([n for field in ("body", "orelse", "finalbody", "handlers") for n in getattr(node, field, [])])
            elif isinstance(node, ast.ExceptHandler):
                visit(node.body)

    visit(tree.body)
    return found


def test_no_core_module_imports_an_extra_at_the_top_level():
    offenders = {str(path.relative_to(REPO)): sorted(_top_level_imports(path) & set(EXTRA_ONLY))
                 for path in (REPO / "distillkit").rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}
    # the checker itself sees such an import
    assert _top_level_imports(REPO / "plugins" / "eye_fundus" / "bleu.py") >= {"nltk"}


@pytest.mark.integration
def test_plain_install_in_a_clean_venv(tmp_path):
    """``scripts/check_plain_install.sh``: a new venv, torch from the local index, ``pip install .``
    without extras, then the core commands (several minutes)."""
    result = subprocess.run(["bash", str(REPO / "scripts" / "check_plain_install.sh"), str(tmp_path / "venv")],
                            cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "plain install: ok" in result.stdout
