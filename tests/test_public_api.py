"""The declared public API: what ``distillkit`` exports, the contracts on the base classes,
and the rule that the eye plugin imports only ``from distillkit import X``."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

import distillkit
from distillkit.interfaces import Task
from tests.conftest import REPO
from tests.tiny_runs import Environment, make_run, tiny_toy_config

EYE_PLUGIN = REPO / "plugins" / "eye_fundus"


def private_imports(path: Path) -> list[str]:
    """``file:line: statement`` for every import of distillkit that is not its public API:
    ``import distillkit.x``, ``from distillkit.x import y``, ``from distillkit import <not exported>``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            bad = [a.name for a in node.names if a.name.startswith("distillkit.")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.startswith("distillkit."):
                bad = [f"{node.module}.{a.name}" for a in node.names]
            elif node.module == "distillkit":
                bad = [a.name for a in node.names if a.name not in distillkit.__all__]
            else:
                bad = []
        else:
            bad = []
        found += [f"{path}:{node.lineno}: {name}" for name in bad]
    return found


def test_the_eye_plugin_imports_only_the_public_api():
    files = sorted(EYE_PLUGIN.rglob("*.py"))
    assert len(files) > 10  # the check reads the plugin, not an empty folder
    problems = [p for f in files for p in private_imports(f)]
    assert problems == [], "the eye plugin imports core modules that are not public:\n" + "\n".join(problems)


def test_the_import_check_flags_every_private_form(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\n"
                   "from distillkit import Task, hookimpl\n"        # public: fine
                   "from distillkit.runner import resolve_device\n"  # line 3
                   "import distillkit.config as cfg\n"               # line 4
                   "def f():\n"
                   "    from distillkit.cli.eval_cmd import eval_command\n"  # line 6, inside a function
                   "    from distillkit import _EXPORTS, not_a_name\n"      # line 7
                   "from .sibling import thing\n")
    assert private_imports(bad) == [f"{bad}:3: distillkit.runner.resolve_device", f"{bad}:4: distillkit.config",
                                    f"{bad}:6: distillkit.cli.eval_cmd.eval_command", f"{bad}:7: _EXPORTS",
                                    f"{bad}:7: not_a_name"]
    good = tmp_path / "good.py"
    good.write_text("from distillkit import DataSpec, RunDirectory, resolve_device, run_eval\nimport distillkit\n")
    assert private_imports(good) == []


def test_every_export_resolves_to_the_object_of_its_module():
    import importlib

    for name, module in distillkit._EXPORTS.items():
        assert getattr(distillkit, name) is getattr(importlib.import_module(module), name), name
    from distillkit.config import apply_overrides
    from distillkit.data_spec import DataSpec
    from distillkit.io import atomic_write_text, read_json
    from distillkit.rundir import RunDirectory
    from distillkit.runner import resolve_device
    from distillkit.stages import Stage, StageContext

    for obj in (apply_overrides, DataSpec, atomic_write_text, read_json, RunDirectory, resolve_device, Stage,
                StageContext):
        assert getattr(distillkit, obj.__name__) is obj
    with pytest.raises(AttributeError, match="no attribute 'resolve_devices'"):
        distillkit.resolve_devices  # noqa: B018


# -- contracts on the base classes ---------------------------------------------------------------

class _Mean(Task):
    """A minimal task: it implements only the abstract methods, so the defaults are what is tested."""

    primary_metric = "mse"

    def fit(self, labels): ...
    def encode(self, labels, where=""): return {"present": torch.ones(len(labels), dtype=torch.bool)}
    def state(self): return {}
    def load_state(self, state): ...
    def build_head(self, in_features): return torch.nn.Linear(in_features, 1)
    def forward(self, head, features, guide=None, train=False): return head(features)
    def predict(self, head, features): return {"value": head(features)[:, 0]}
    def hard_loss(self, logits, target): return (logits[:, 0] - target["value"]) ** 2
    def soft_loss(self, logits, soft, tau): return (logits[:, 0] - soft["value"]) ** 2
    def soft_target(self, heads, features, weights, target, tau): return {}
    def metrics(self): raise NotImplementedError


def test_task_defaults_declare_no_classes_no_topk_and_no_text():
    from distillkit.interfaces import Params

    class P(Params):
        kind: str = "mean"

    task = _Mean("price", P())
    assert task.class_names is None and task.topk == ()
    assert task.decode_text(torch.tensor([[1, 2, 3]])) is None
    assert task.headline_metrics() == [("mse", "mse")]
    # Grad-CAM's default score for a task without probs: minus the hard loss of its own
    # prediction, which for a squared error is exactly 0 on every row
    torch.manual_seed(0)
    head, feats = task.build_head(3), torch.randn(4, 3)
    assert torch.equal(task.gradcam_score(head, feats), torch.zeros(4))


def test_classification_declares_its_classes_topk_columns_and_gradcam_logit(core_registries):
    cls = core_registries.task.get("classification")
    task = cls("fine", cls.Params(topk=[1, 5], hidden=0))
    task.fit(["b", "a", "c", "a", "d", "e", "f"])
    assert task.class_names == ["a", "b", "c", "d", "e", "f"] and task.topk == (1, 5)
    assert task.decode_text([[0, 1]]) is None
    from distillkit.evaluation import headline_columns

    assert headline_columns({"fine": task}) == [
        ("fine", "accuracy", "fine accuracy"), ("fine", "balanced_accuracy", "fine bal. acc"),
        ("fine", "majority_rate", "fine majority"), ("fine", "macro_auc", "fine AUC"), ("fine", "top5", "fine top-5")]
    head = task.build_head(2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0], [0, 1], [2, 0], [0, 2], [-1, 0], [0, -1]]))
        head.bias.zero_()
    feats = torch.tensor([[1.0, 0.5], [-1.0, 3.0]])
    # default: the logit of the predicted class (row 0: class c = 2 * 1; row 1: class d = 2 * 3)
    assert task.gradcam_score(head, feats).tolist() == [2.0, 6.0]
    # a chosen class for every row: class b, logits 0.5 and 3
    assert task.gradcam_score(head, feats, 1).tolist() == [0.5, 3.0]


def test_student_build_default_makes_the_encoder_its_params_name(core_registries):
    from distillkit.interfaces import Student

    student_cls = core_registries.student.get("multitask")
    assert "build" not in vars(student_cls)  # the base class's default builds it
    task_cls = core_registries.task.get("classification")
    task = task_cls("cluster", task_cls.Params(hidden=0))
    task.fit(["x", "y", "z"])
    params = student_cls.Params.model_validate({"kind": "multitask", "encoder": {"kind": "mlp", "in_features": 5,
                                                                                  "hidden": 7, "depth": 1}})
    params = params.model_copy(update={"encoder": core_registries.encoder.get("mlp").Params(in_features=5, hidden=7,
                                                                                             depth=1)})
    model = Student.build.__func__(student_cls, params, {"cluster": task}, core_registries)
    assert isinstance(model, student_cls) and type(model.encoder).__name__ == "MLPEncoder"
    assert model.encoder.out_features == 7 and model.heads["cluster"].weight.shape == (3, 7)
    assert student_cls.nested == {"encoder": "encoder"} and Student.nested == {}


# -- evaluation as a library function ------------------------------------------------------------

@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("api_toy")
    with Environment(DISTILLKIT_CACHE=str(folder / "cache"), DISTILLKIT_DISABLE_PLUGIN_AUTOLOAD="1"):
        run = make_run(tiny_toy_config(), folder)
        yield run


def test_evaluate_models_equals_the_runs_evaluate_stage(toy_run, monkeypatch):
    from distillkit.io import read_json
    from distillkit.plugins import set_plugin_manager

    monkeypatch.setenv("DISTILLKIT_CACHE", str(toy_run.parent / "cache"))
    monkeypatch.setenv("DISTILLKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    set_plugin_manager(None)
    try:
        notes: list[str] = []
        report = distillkit.evaluate_models(toy_run, split="test", group_by="cluster", warn=notes.append)
    finally:
        set_plugin_manager(None)
    recorded = read_json(toy_run / "metrics.json")["report"]["test"]
    assert list(report.metrics) == ["m1", "m2", "m3"] and notes == []
    from distillkit.io import _jsonable

    for label, metrics in recorded.items():  # as JSON (NaN -> null), every number equal
        assert _jsonable(report.metrics[label]) == metrics
    header, rows = report.table()
    assert header[:2] == ["model", "cluster accuracy"]
    accuracy = recorded["m3"]["cluster"]["accuracy"]
    assert rows[2][:2] == ["m3", f"{accuracy:.3f}"] and not math.isnan(accuracy)
    assert report.to_json()["models"]["m1"].endswith("model.safetensors")


def test_no_contract_is_read_through_getattr():
    """Task and Student contracts are base-class members: callers use them directly."""
    contracts = {"classes", "class_names", "decode_text", "gradcam_score", "topk", "build", "primary_metric",
                 "screening_specificity"}
    found = []
    for path in sorted((REPO / "distillkit").rglob("*.py")) + sorted(EYE_PLUGIN.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
                    and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
                    and node.args[1].value in contracts):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.func.id}(..., {node.args[1].value!r})")
    assert found == []


def test_docs_list_every_export():
    text = (REPO / "docs" / "plugins.md").read_text(encoding="utf-8")
    section = text[text.index("## Public API"):]
    section = section[:section.index("\n## ")]
    missing = [name for name in distillkit._EXPORTS if f"`{name}`" not in section]
    assert missing == [], f"docs/plugins.md, section Public API, does not list {missing}"
