"""``group_by`` of an evaluate stage: a classification task, a dataset field or the group id."""

from __future__ import annotations

import json
import types
from typing import Optional

import pytest
import torch
from click.testing import CliRunner

from distillkit.cli import cli
from distillkit.data import split_indices
from distillkit.interfaces import Params, Task
from distillkit.models import load_model
from distillkit.plugins import PluginManager, hookimpl, set_plugin_manager
from distillkit.rundir import RunDirectory
from tests.conftest import toy_config, write_config


@pytest.fixture(autouse=True)
def _no_autoload(monkeypatch, fresh_plugin_manager, cache_dir):
    monkeypatch.setenv("DISTILLKIT_DISABLE_PLUGIN_AUTOLOAD", "1")


def _one_task_config(group_by: str) -> dict:
    """Only ``cluster`` is a task; ``quadrant`` stays a plain field of the toy data."""
    config = toy_config()
    config["tasks"] = {"cluster": config["tasks"]["cluster"]}
    config["training"].update(epochs=2)
    config["stages"] = {"m1": {"kind": "train"},
                        "report": {"kind": "evaluate", "models": ["m1"], "group_by": group_by}}
    return config


def _accuracy_by(run: RunDirectory, values_of) -> dict[str, float]:
    """m1's test accuracy per value, from the dataset's own labels and split (not the run's grouping)."""
    registries = PluginManager(autoload=False).registries
    data = run.load_data(registries)
    model = load_model(run.path / "stages" / "m1" / "model.safetensors", registries, torch.device("cpu"))
    rows = split_indices(data.dataset, data.split_params)["test"]
    split = data.split("test", model.tasks)
    with torch.no_grad():
        pred = model.model.heads["cluster"](model.model.features(split.inputs)).argmax(-1)
    classes = model.tasks["cluster"].classes
    truth = [data.dataset.labels["cluster"][i] for i in rows]
    out: dict[str, list[bool]] = {}
    for r, i in enumerate(rows):
        value = values_of(data.dataset, i)
        if value is not None:
            out.setdefault(value, []).append(classes[int(pred[r])] == truth[r])
    return {k: sum(v) / len(v) for k, v in out.items()}


@pytest.mark.parametrize("group_by, values_of", [
    ("quadrant", lambda ds, i: ds.labels["quadrant"][i]),
    ("group", lambda ds, i: ds.groups[i]),
])
def test_group_by_a_field_or_the_group_id(tmp_path, group_by, values_of):
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["run", str(write_config(tmp_path, _one_task_config(group_by))),
                                      "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    by_group = json.loads((out / "metrics.json").read_text())["report"]["test"]["m1"]["by_group"]
    expected = _accuracy_by(RunDirectory(out), values_of)
    assert set(by_group) == set(expected)
    if group_by == "quadrant":
        assert set(expected) == {"q0", "q1", "q2", "q3"}  # rows without a quadrant label have no group
    else:
        assert len(expected) > 10  # pairs of rows share a group id
    for name, accuracy in expected.items():
        assert by_group[name]["cluster"]["accuracy"] == pytest.approx(accuracy)


def test_an_unknown_field_stops_before_training(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["run", str(write_config(tmp_path, _one_task_config("quadrnt"))),
                                      "--out", str(out)])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "stages.report.group_by: 'quadrnt' is neither a task, a field of the data nor 'group'" in text
    assert "Did you mean 'quadrant'?" in text and "Traceback" not in result.output
    assert not list(out.rglob("*.safetensors"))  # nothing trained


class _ScoreParams(Params):
    kind: str = "score"
    field: Optional[str] = None


class _ScoreTask(Task):
    """A task that is not a classification (its labels are not groups); only planned here."""

    Params = _ScoreParams


def test_a_task_that_is_not_a_classification_is_refused_by_validate(tmp_path):
    plugin = types.ModuleType("score_plugin")
    plugin.register_tasks = hookimpl(lambda register: register("score", _ScoreTask))
    set_plugin_manager(PluginManager(autoload=False, plugins=[plugin]))
    config = _one_task_config("price")
    config["tasks"]["price"] = {"kind": "score", "field": "quadrant"}
    config["stages"]["m1"]["tasks"] = ["cluster"]
    result = CliRunner().invoke(cli, ["validate", str(write_config(tmp_path, config))])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "stages.report.group_by: task 'price' is not a classification task" in text
    assert "Traceback" not in result.output
    # the same config grouped by the classification task is valid
    config["stages"]["report"]["group_by"] = "cluster"
    assert CliRunner().invoke(cli, ["validate", str(write_config(tmp_path, config))]).exit_code == 0


class _Grades(_ScoreTask):
    """Not a ClassificationTask, but it declares its classes (``Task.class_names``)."""

    @property
    def class_names(self) -> list[str]:
        return ["a", "b"]


def test_a_task_groups_rows_when_it_declares_class_names():
    from distillkit.builtin.regression import RegressionParams, RegressionTask
    from distillkit.evaluation import grouping_problem

    # before the data is loaded the classes are checked, after it the instances
    assert grouping_problem("grade", {"grade": _Grades}, None) is None
    fitted = types.SimpleNamespace(class_names=["a", "b"])  # an instance: its fitted class list counts
    assert grouping_problem("grade", {"grade": fitted}, ["quadrant"]) is None
    assert grouping_problem("grade", {"grade": _ScoreTask}, None).startswith("task 'grade' is not a classification")
    for task in (RegressionTask, RegressionTask("price", RegressionParams())):
        problem = grouping_problem("price", {"price": task}, ["quadrant"])
        assert problem.startswith("task 'price' is not a classification task")
    assert grouping_problem("quadrant", {"price": RegressionTask}, ["quadrant"]) is None
    assert "Did you mean 'quadrant'" in grouping_problem("quadrnt", {"price": RegressionTask}, ["quadrant"])
