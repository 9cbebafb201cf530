"""Metric direction: lower-is-better metrics in early stopping, temperature: auto, val_score,
teacher scores, the report's chart axis, and a plugin that declares nonsense."""

from __future__ import annotations

import re
import types

import numpy as np
import pytest
import torch

import distillkit.training as training
from distillkit.builtin.classification import ClassificationParams, ClassificationTask
from distillkit.builtin.components import MLPEncoder, MLPParams, MultiTaskStudent, ValScoreParams, ValScorePolicy
from distillkit.builtin.regression import RegressionParams, RegressionTask
from distillkit.data import SplitData
from distillkit.errors import DistillkitError
from distillkit.interfaces import Teacher
from distillkit.losses import KDLoss, KDLossParams
from distillkit.metric_direction import best_of, direction
from distillkit.plugins import PluginManager, hookimpl
from distillkit.training import EarlyStoppingParams, NullCallbacks, OptimizerParams, TrainingParams, fit, score_of

CPU = torch.device("cpu")


# -- declarations ----------------------------------------------------------------------------

def test_declared_directions():
    assert direction(RegressionTask, "rmse") == "min" and direction(RegressionTask, "mae") == "min"
    assert direction(RegressionTask, "r2") == "max"
    assert direction(ClassificationTask, "ece") == "min" and direction(ClassificationTask, "accuracy") == "max"
    assert direction(None, "val_loss") == "min" and direction(None, "val_kd") == "min"
    assert best_of({"a": 3.0, "b": 1.0, "c": float("nan")}, "min") == "b"
    assert best_of({"a": 3.0, "b": 1.0, "c": float("nan")}, "max") == "a"


def test_score_of_reads_the_tasks_direction():
    metrics = {"price": {"rmse": 2.0, "r2": 0.5}, "band": {"ece": 0.1, "accuracy": 0.8}, "loss": 1.0}
    tasks = {"price": RegressionTask("price", RegressionParams()),
             "band": ClassificationTask("band", ClassificationParams())}
    assert score_of(metrics, "price.rmse", tasks) == (2.0, False)
    assert score_of(metrics, "price.r2", tasks) == (0.5, True)
    assert score_of(metrics, "band.ece", tasks) == (0.1, False)
    assert score_of(metrics, "band.accuracy", tasks) == (0.8, True)
    assert score_of(metrics, "val_loss", tasks) == (1.0, False)


def _plugin(name, task_cls):
    module = types.ModuleType(name)

    @hookimpl
    def register_tasks(register):
        register("house_price", task_cls)

    module.register_tasks = register_tasks
    return module


class _Sideways(RegressionTask):
    metric_directions = {"rmse": "lower"}


class _OddKind(RegressionTask):
    soft_target_kinds = {"mean": "number"}


def _load_with_a_good_plugin(bad):
    """A manager with the bad plugin and a good one: the bad one is reported and left out (its
    check raises inside its guarded register_tasks hook); the core and the good one keep working."""
    manager = PluginManager(autoload=False, plugins=[bad, _plugin("good_plugin", RegressionTask)])
    registries = manager.registries
    assert registries.task.get("house_price") is RegressionTask  # the good plugin's, not the bad one's
    assert "classification" in registries.task.names() and "regression" in registries.task.names()
    assert "good_plugin" in manager.info and "prices_plugin" not in manager.info
    return manager.failed["prices_plugin"]


def test_an_unknown_direction_names_the_plugin_and_task():
    message = _load_with_a_good_plugin(_plugin("prices_plugin", _Sideways))
    assert "task 'house_price'" in message and "plugin 'prices_plugin'" in message and "_Sideways" in message
    assert "'rmse'" in message and "'lower'" in message and "'max'" in message and "'min'" in message


def test_an_unknown_soft_target_kind_names_the_plugin_and_task():
    message = _load_with_a_good_plugin(_plugin("prices_plugin", _OddKind))
    assert re.search(r"task 'house_price'.*plugin 'prices_plugin'.*'mean' of kind 'number'", message), message


# -- early stopping ------------------------------------------------------------------------------

class _Snapshots(NullCallbacks):
    def __init__(self, model):
        self.model, self.states = model, []

    def on_epoch_end(self, epoch, record):
        self.states.append({k: v.clone() for k, v in self.model.state_dict().items()})


def _fit_with_scripted_validation(tmp_path, monkeypatch, task, metric, values):
    """fit() where the validation result of epoch e reports ``values[e]`` for ``metric``."""
    name, _, key = metric.partition(".")
    calls = []

    def scripted(*args, **kwargs):
        calls.append(1)
        return {name: {key: values[len(calls) - 1]}, "loss": 1.0}

    monkeypatch.setattr(training, "evaluate", scripted)
    tasks = {name: task}
    torch.manual_seed(0)
    model = MultiTaskStudent(MLPEncoder(MLPParams(in_features=3, hidden=8, depth=1)), tasks)
    rng = np.random.default_rng(0)
    labels = [str(v) for v in rng.normal(size=24)] if isinstance(task, RegressionTask) else \
        [f"c{i}" for i in rng.integers(0, 3, 24)]
    split = SplitData("train", np.arange(24), torch.from_numpy(rng.normal(size=(24, 3)).astype(np.float32)),
                      {name: task.encode(labels)})
    params = TrainingParams(optimizer=OptimizerParams(kind="sgd", lr=0.05), batch_size=8, epochs=len(values),
                            early_stopping=EarlyStoppingParams(metric=metric, patience=len(values)))
    snapshots = _Snapshots(model)
    result = fit(model, tasks, KDLoss(KDLossParams()), split, split, params, device=CPU, seed=0, workdir=tmp_path,
                 callbacks=snapshots)
    return result, model, snapshots


def _regression():
    task = RegressionTask("price", RegressionParams(hidden=0))
    task.fit([str(v) for v in np.random.default_rng(0).normal(size=24)])
    return task


def test_early_stopping_on_rmse_keeps_the_lowest_rmse_epoch(tmp_path, monkeypatch):
    # the highest RMSE is the last epoch's: a higher-is-better rule would keep epoch 3
    result, model, snapshots = _fit_with_scripted_validation(tmp_path, monkeypatch, _regression(), "price.rmse",
                                                             [5.0, 3.0, 4.0, 6.0])
    assert result.best_epoch == 1
    kept = model.state_dict()
    assert all(torch.equal(kept[k], snapshots.states[1][k]) for k in kept)
    assert not all(torch.equal(kept[k], snapshots.states[3][k]) for k in kept)
    assert [r["monitor"]["price.rmse"] for r in result.history] == [5.0, 3.0, 4.0, 6.0]


def test_early_stopping_on_r2_keeps_the_highest(tmp_path, monkeypatch):
    result, _, _ = _fit_with_scripted_validation(tmp_path, monkeypatch, _regression(), "price.r2",
                                                 [0.1, 0.2, 0.7, 0.3])
    assert result.best_epoch == 2


def test_early_stopping_on_calibration_error_keeps_the_lowest(tmp_path, monkeypatch):
    task = ClassificationTask("band", ClassificationParams(hidden=0))
    task.fit(["c0", "c1", "c2"])
    result, _, _ = _fit_with_scripted_validation(tmp_path, monkeypatch, task, "band.ece", [0.3, 0.4, 0.05, 0.2])
    assert result.best_epoch == 2


def test_patience_counts_epochs_without_a_lower_error(tmp_path, monkeypatch):
    task = _regression()
    values = [4.0, 2.0, 3.0, 5.0, 1.0]
    name = "price"
    calls = []

    def scripted(*args, **kwargs):
        calls.append(1)
        return {name: {"rmse": values[len(calls) - 1]}, "loss": 1.0}

    monkeypatch.setattr(training, "evaluate", scripted)
    tasks = {name: task}
    torch.manual_seed(0)
    model = MultiTaskStudent(MLPEncoder(MLPParams(in_features=3, hidden=8, depth=1)), tasks)
    rng = np.random.default_rng(1)
    split = SplitData("train", np.arange(16), torch.from_numpy(rng.normal(size=(16, 3)).astype(np.float32)),
                      {name: task.encode([str(v) for v in rng.normal(size=16)])})
    params = TrainingParams(optimizer=OptimizerParams(kind="sgd", lr=0.05), batch_size=8, epochs=5,
                            early_stopping=EarlyStoppingParams(metric="price.rmse", patience=2))
    result = fit(model, tasks, KDLoss(KDLossParams()), split, split, params, device=CPU, seed=0, workdir=tmp_path)
    # 4 -> 2 improves; 3 and 5 do not: stopped after epoch 3, before the 1.0 of epoch 4
    assert result.best_epoch == 1 and result.epochs_run == 4


# -- val_score and teacher scores -------------------------------------------------------------------

def _teacher(name, score, way=None):
    model = torch.nn.Linear(1, 1)
    return Teacher(name, model, frozenset({"price"}), scores={"price": score},
                   score_directions={"price": way} if way else {})


def test_val_score_gives_the_lower_rmse_teacher_more_weight():
    policy = ValScorePolicy(ValScoreParams())
    weights = policy.weights("price", [_teacher("good", 2.0, "min"), _teacher("bad", 4.0, "min")])
    assert weights == pytest.approx([2 / 3, 1 / 3])  # proportional to 1 / rmse
    squared = ValScorePolicy(ValScoreParams(power=2.0)).weights(
        "price", [_teacher("good", 2.0, "min"), _teacher("bad", 4.0, "min")])
    assert squared == pytest.approx([0.8, 0.2])
    # higher is better (the default) is unchanged: weights proportional to the score
    assert policy.weights("price", [_teacher("a", 0.2), _teacher("b", 0.6)]) == pytest.approx([0.25, 0.75])
    # a teacher without a score gets no weight when the others have an error
    assert policy.weights("price", [_teacher("a", float("nan"), "min"), _teacher("b", 3.0, "min")]) == [0.0, 1.0]


def test_as_teacher_records_the_direction_of_each_tasks_primary_metric():
    from distillkit.models import LoadedModel, as_teacher

    tasks = {"price": _regression(), "band": ClassificationTask("band", ClassificationParams(hidden=0))}
    tasks["band"].fit(["x", "y"])
    model = MultiTaskStudent(MLPEncoder(MLPParams(in_features=3, hidden=4, depth=1)), tasks)
    teacher = as_teacher(LoadedModel(model, tasks, {}, "sum"), "t", {"price": 1.5, "band": 0.9})
    assert teacher.score_directions == {"price": "min", "band": "max"}


# -- temperature: auto ----------------------------------------------------------------------------------

class _CalibratedBand(ClassificationTask):
    """A classification task ranked by its calibration error (lower is better)."""

    primary_metric = "ece"


def test_temperature_auto_keeps_the_tau_with_the_lowest_error(tmp_path, monkeypatch):
    import distillkit.stages as stages

    task = _CalibratedBand("band", ClassificationParams())
    scores = {0.5: 0.30, 1.0: 0.20, 4.0: 0.05, 10.0: 0.40}  # highest at 10: a max rule would pick it

    def trial(ctx, stage, label, task_names, params, folder, init, teachers=None):
        tau = params.temperature["band"]
        return stages.ModelRecord("m", list(task_names), {"band": scores[tau]}, "sum", label), {}

    monkeypatch.setattr(stages, "_train_one", trial)
    ctx = types.SimpleNamespace(tasks={"band": task})
    stage = stages.DistillStage("m2", stages.DistillParams(teachers=["m1"], temperature="auto",
                                                           temperature_grid=list(scores)))
    params, search = stage._choose_temperatures(ctx, tmp_path, ["band"], [])
    assert search["chosen"] == {"band": 4.0} and params.temperature == {"band": 4.0}


def test_temperature_auto_skips_a_task_without_temperature(tmp_path, monkeypatch):
    import distillkit.stages as stages

    band = ClassificationTask("band", ClassificationParams())
    tried = []

    def trial(ctx, stage, label, task_names, params, folder, init, teachers=None):
        tried.append(dict(params.temperature))
        return stages.ModelRecord("m", list(task_names), {"band": 0.5, "price": 1.0}, "sum", label), {}

    monkeypatch.setattr(stages, "_train_one", trial)
    ctx = types.SimpleNamespace(tasks={"band": band, "price": _regression()})
    stage = stages.DistillStage("m2", stages.DistillParams(teachers=["m1"], temperature="auto",
                                                           temperature_grid=[1.0, 2.0]))
    params, search = stage._choose_temperatures(ctx, tmp_path, ["band", "price"], [])
    assert list(search["chosen"]) == ["band"] and len(tried) == 2
    assert all(t["price"] == 1.0 for t in tried)


# -- the report's per-group chart ------------------------------------------------------------------------

def test_group_chart_axis_comes_from_the_data():
    pytest.importorskip("matplotlib")
    from distillkit import plots

    rmse = {"price": {"m1": {"low": 390_000.0, "high": 433_000.0}, "m2": {"low": 373_000.0, "high": None}}}
    fig = plots.group_bars_figure(rmse, {"price": "rmse"}, "band")
    low, high = fig.axes[0].get_ylim()
    assert low == 0.0 and high >= 433_000.0  # nothing clipped at 1.1
    r2 = {"price": {"m1": {"low": -0.5, "high": 0.8}}}
    low, high = plots.group_bars_figure(r2, {"price": "r2"}, "band").axes[0].get_ylim()
    assert low < -0.5 and high > 0.8
    assert plots.value_axis([0.2, 1.0, None]) == pytest.approx((0.0, 1.1))  # scores up to 1: as before
