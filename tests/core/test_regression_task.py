"""The built-in regression task, soft-target kinds in the teacher-output cache, and temperatures."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

from distillkit.builtin.classification import ClassificationParams, ClassificationTask
from distillkit.builtin.components import MeanParams, MeanPolicy, MLPEncoder, MLPParams, MultiTaskStudent
from distillkit.builtin.regression import RegressionParams, RegressionTask
from distillkit.checkpoint import load_tensors
from distillkit.cli import cli
from distillkit.data import Batch, SplitData
from distillkit.errors import DistillkitError
from distillkit.interfaces import Teacher
from distillkit.losses import KDLoss, KDLossParams
from distillkit.teacher_targets import OnlineTargets, TeacherOutputParams, build_or_load_cache, route_teachers
from tests.conftest import REPO, write_config

BIG = 97_000_000.0  # fp16 tops out at 65504: stored as fp16 this is infinity


def _fitted(labels=("96000000", "97000000", None, "99000000"), **kw) -> RegressionTask:
    task = RegressionTask("price", RegressionParams(**kw))
    task.fit(list(labels))
    return task


# -- labels and state --------------------------------------------------------------------

def test_fit_learns_mean_and_population_std_of_the_training_labels():
    task = _fitted()
    values = np.array([96e6, 97e6, 99e6])
    assert task.dim == 1
    assert task.mean == pytest.approx([values.mean()])
    assert task.std == pytest.approx([values.std()])  # population std, as numpy's default
    target = task.encode(["97000000", None, "", "1.5e6"])
    assert target["present"].tolist() == [True, False, False, True]
    assert target["y"][:, 0].tolist() == [97e6, 0.0, 0.0, 1.5e6]
    fresh = RegressionTask("price", RegressionParams())
    fresh.load_state(json.loads(json.dumps(task.state())))
    assert fresh.state() == task.state()


def test_vector_targets_and_bad_labels():
    task = RegressionTask("xy", RegressionParams())
    task.fit(["1 2", "3,4", [5, 6], None])
    assert task.dim == 2 and task.mean == pytest.approx([3.0, 4.0])
    assert task.encode(["7 8"])["y"].tolist() == [[7.0, 8.0]]
    with pytest.raises(DistillkitError, match=r"row 1: label 'cheap' of regression task 'xy'.*not a number"):
        task.encode(["1 2", "cheap"], where="val split")
    with pytest.raises(DistillkitError, match="has 3 values, the others 2"):
        task.encode(["1 2 3"])
    with pytest.raises(DistillkitError, match="no labeled row"):
        RegressionTask("p", RegressionParams()).fit([None, ""])


# -- losses, soft targets, metrics -----------------------------------------------------------

def test_hard_and_soft_losses_are_squared_errors_in_standardised_units():
    task = _fitted()
    mu, sd = task.mean[0], task.std[0]
    logits = torch.tensor([[0.5], [-1.0], [2.0]])
    y = torch.tensor([97e6, 0.0, 99e6])
    target = {"y": y[:, None], "present": torch.tensor([True, False, True])}
    expected = [(0.5 - (97e6 - mu) / sd) ** 2, (-1.0 - (0.0 - mu) / sd) ** 2, (2.0 - (99e6 - mu) / sd) ** 2]
    assert task.hard_loss(logits, target).tolist() == pytest.approx(expected, rel=1e-5)
    soft = {"mean": torch.tensor([[98e6], [96e6], [97e6]])}
    expected = [(0.5 - (98e6 - mu) / sd) ** 2, (-1.0 - (96e6 - mu) / sd) ** 2, (2.0 - (97e6 - mu) / sd) ** 2]
    assert task.soft_loss(logits, soft, tau=1.0).tolist() == pytest.approx(expected, rel=1e-5)


def test_predict_and_soft_target_are_in_the_targets_units():
    task = _fitted()
    torch.manual_seed(0)
    heads = [task.build_head(4), task.build_head(4)]
    feats = [torch.randn(5, 4), torch.randn(5, 4)]
    with torch.no_grad():
        raw = [h(f).double() * task.std[0] + task.mean[0] for h, f in zip(heads, feats)]
        soft = task.soft_target(heads, feats, [0.25, 0.75], None, tau=1.0)
        assert torch.allclose(task.predict(heads[0], feats[0])["value"].double(), raw[0], rtol=1e-6)
    assert set(soft) == {"mean"}
    assert torch.allclose(soft["mean"].double(), 0.25 * raw[0] + 0.75 * raw[1], rtol=1e-6)
    assert float(soft["mean"].abs().min()) > 1e7  # prices, not standardised values


def test_metrics_equal_scikit_learn_over_the_labeled_rows():
    rng = np.random.default_rng(3)
    y = rng.normal(5.0, 2.0, size=(40, 2))
    pred = y + rng.normal(0.0, 0.7, size=(40, 2))
    present = rng.random(40) < 0.8
    acc = RegressionTask("v", RegressionParams()).metrics()
    for rows in (slice(0, 17), slice(17, 40)):  # two batches
        acc.update({"value": torch.tensor(pred[rows], dtype=torch.float32)},
                   {"y": torch.tensor(y[rows], dtype=torch.float32), "present": torch.tensor(present[rows])})
    out = acc.compute()
    yp, pp = y[present].astype(np.float32).astype(np.float64), pred[present].astype(np.float32).astype(np.float64)
    assert out["n"] == int(present.sum())
    assert out["rmse"] == pytest.approx(math.sqrt(mean_squared_error(yp, pp)), rel=1e-9)
    assert out["mae"] == pytest.approx(mean_absolute_error(yp, pp), rel=1e-9)
    assert out["r2"] == pytest.approx(r2_score(yp, pp), rel=1e-9)


def test_metrics_by_hand_for_a_scalar_target():
    acc = RegressionTask("v", RegressionParams()).metrics()
    acc.update({"value": torch.tensor([[1.0], [2.0], [4.0]])},
               {"y": torch.tensor([[2.0], [2.0], [5.0]]), "present": torch.tensor([True, True, True])})
    out = acc.compute()
    # errors -1, 0, -1: MSE 2/3, MAE 2/3; y mean 3, SS_tot 1 + 1 + 4 = 6, SS_res 2: R2 = 2/3
    assert out["rmse"] == pytest.approx(math.sqrt(2 / 3))
    assert out["mae"] == pytest.approx(2 / 3)
    assert out["r2"] == pytest.approx(1 - 2 / 6)


def test_kd_loss_gives_a_regression_task_no_temperature():
    task = _fitted()
    loss = KDLoss(KDLossParams())
    logits = {"price": torch.tensor([[0.3], [-0.4]])}
    targets = {"price": task.encode(["97000000", "99000000"])}
    soft = {"price": {"mean": torch.tensor([[98e6], [96e6]])}}
    hard = task.hard_loss(logits["price"], targets["price"]).mean()
    dist = task.soft_loss(logits["price"], soft["price"], 1.0).mean()
    value, _ = loss({"price": task}, logits, targets, soft, 0.25, {"price": 5.0})
    # alpha combines the two as for classification; tau = 5 must not scale the soft term by 25
    assert value.item() == pytest.approx((0.75 * hard + 0.25 * dist).item(), rel=1e-6)


# -- the teacher-output cache ----------------------------------------------------------------

def _teachers(tasks, n=2):
    out = []
    for k in range(n):
        torch.manual_seed(10 + k)
        model = MultiTaskStudent(MLPEncoder(MLPParams(in_features=3, hidden=5, depth=1)), tasks)
        out.append(Teacher(name=f"t{k}", model=model, tasks=frozenset(tasks), checksum=f"c{k}"))
    return out


def _online(tasks, teachers, tau=None):
    routes = route_teachers(list(tasks), teachers, MeanPolicy(MeanParams()))
    return OnlineTargets(teachers, tasks, routes, tau or {t: 1.0 for t in tasks}, use_labels=False)


def _split(n=21):
    g = torch.Generator().manual_seed(1)
    return SplitData("unlabeled", np.arange(n), torch.randn(n, 3, generator=g))


@pytest.mark.parametrize("storage", ["fp16", "topk", "fp32"])
def test_cache_stores_plain_values_exactly_and_still_renormalises_distributions(tmp_path, storage):
    price = _fitted()
    band = ClassificationTask("band", ClassificationParams(hidden=0))
    band.fit(["a", "b", "c", "d"])
    tasks = {"price": price, "band": band}
    online = _online(tasks, _teachers(tasks), {"price": 1.0, "band": 2.0})
    split = _split()
    batch = Batch(torch.arange(len(split)), split.inputs, None)
    exact = online(batch)
    assert float(exact["price"]["mean"].min()) > 65504  # beyond fp16
    params = TeacherOutputParams(storage=storage, topk=2, shard_size=8)
    cached = build_or_load_cache(online, split, tmp_path / "c", params, batch_size=5, device=torch.device("cpu"))
    got = cached(batch)
    # not rounded to fp16 (infinity), not renormalised; fp32 spacing at 97e6 is 8
    torch.testing.assert_close(got["price"]["mean"], exact["price"]["mean"], rtol=2e-7, atol=0.0)
    assert got["band"]["probs"].sum(-1).sub(1).abs().max() < 1e-5  # the distribution still sums to 1
    tensors, _ = load_tensors(tmp_path / "c" / "shard-00000.safetensors")
    assert tensors["price.mean"].dtype == torch.float32
    index = json.loads((tmp_path / "c" / "index.json").read_text())
    assert index["kinds"] == {"price": {"mean": "value"}, "band": {"probs": "distribution"}}


class _HalfValues(RegressionTask):
    soft_target_kinds = {"mean": "value_fp16"}


def test_value_fp16_is_rounded_only_where_the_task_allows_it(tmp_path):
    task = _HalfValues("v", RegressionParams(standardize=False))
    task.fit(["0.1", "0.2", "0.3"])
    tasks = {"v": task}
    online = _online(tasks, _teachers(tasks))
    split = _split()
    batch = Batch(torch.arange(len(split)), split.inputs, None)
    exact = online(batch)["v"]["mean"]
    half = build_or_load_cache(online, split, tmp_path / "h", TeacherOutputParams(storage="fp16"), 7,
                               torch.device("cpu"))(batch)["v"]["mean"]
    full = build_or_load_cache(online, split, tmp_path / "f", TeacherOutputParams(storage="fp32"), 7,
                               torch.device("cpu"))(batch)["v"]["mean"]
    # (batches of 7 rows may differ from one batch of 21 in the last bit: compare with tolerances)
    assert torch.equal(half, half.half().float())  # held at fp16 precision ...
    torch.testing.assert_close(half, exact, rtol=2 ** -10, atol=0.0)
    assert not torch.equal(full, full.half().float())  # ... and at fp32 where the storage is fp32
    torch.testing.assert_close(full, exact, rtol=1e-6, atol=1e-9)


class _Forgetful(RegressionTask):
    def soft_target(self, heads, features, weights, target, tau):
        return {"prediction": super().soft_target(heads, features, weights, target, tau)["mean"]}


def test_a_soft_target_without_a_declared_key_is_one_clear_error(tmp_path):
    task = _Forgetful("price", RegressionParams())
    task.fit(["1", "2", "3"])
    tasks = {"price": task}
    online = _online(tasks, _teachers(tasks))
    split = _split()
    with pytest.raises(DistillkitError) as info:
        build_or_load_cache(online, split, tmp_path / "c", TeacherOutputParams(), 7, torch.device("cpu"))
    message = str(info.value)
    assert "task 'price'" in message and "_Forgetful" in message and "test_regression_task" in message
    assert "'mean'" in message and "prediction" in message
    assert not (tmp_path / "c" / "index.json").exists()


# -- temperatures ------------------------------------------------------------------------------

def _regression_config(**m2):
    import yaml

    config = yaml.safe_load((REPO / "examples" / "regression.yaml").read_text())
    config["data"].update(num_labeled=160, num_unlabeled=40)
    config["training"].update(epochs=2)
    config["stages"]["m2"].update(m2)
    return config


def _validate(tmp_path, config):
    path = write_config(tmp_path, config)
    return CliRunner().invoke(cli, ["validate", str(path)]), path


def test_a_temperature_for_the_regression_task_exits_2_naming_file_and_key(tmp_path):
    result, path = _validate(tmp_path, _regression_config(temperature={"band": 2.0, "price": 3.0}))
    assert result.exit_code == 2, result.output
    assert str(path.name) in result.output and "stages.m2.temperature.price" in result.output
    assert "has no temperature" in result.output and "Traceback" not in result.output


def test_a_single_temperature_applies_to_the_tasks_that_have_one(tmp_path):
    result, _ = _validate(tmp_path, _regression_config(temperature=2.0))
    assert result.exit_code == 0, result.output
    # the plan shows a temperature only for the task that has one, and how values are cached
    [m2] = [line for line in result.output.splitlines() if " m2: distill" in line]
    assert "tau band=2;" in m2 and "price=" not in m2
    assert "teacher outputs cache/fp16 (plain values fp32)" in m2
    only_band = _regression_config(temperature=2.0, teacher_outputs={"storage": "fp32"})
    result, _ = _validate(tmp_path, only_band)
    assert "teacher outputs cache/fp32  " in result.output or "teacher outputs cache/fp32\n" in result.output
    config = _regression_config(temperature="auto")
    config["tasks"] = {"price": config["tasks"]["price"]}
    config["stages"]["report"].pop("group_by")
    result, path = _validate(tmp_path, config)
    assert result.exit_code == 2, result.output
    assert "stages.m2.temperature:" in result.output and "none of the stage's tasks has a temperature" in result.output


# -- end to end ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_regression_example_caches_the_teachers_raw_predictions(tmp_path, monkeypatch):
    """M1 -> teachers -> M2 on examples/regression.yaml: the cached soft targets of ``price`` are
    the val_score-weighted mean of the teachers' predictions in dollars, untouched by fp16."""
    from distillkit.models import load_model
    from distillkit.plugins import PluginManager
    from distillkit.rundir import RunDirectory

    monkeypatch.setenv("DISTILLKIT_CACHE", str(tmp_path / "cache"))
    config = _regression_config()
    config["stages"] = {k: config["stages"][k] for k in ("teachers", "m1", "m2")}
    assert config["stages"]["m2"]["aggregation"]["kind"] == "val_score"
    path = write_config(tmp_path, config)
    result = CliRunner().invoke(cli, ["run", str(path), "--out", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 0, result.output

    registries = PluginManager(autoload=False).registries
    run = RunDirectory(tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    teachers = [e for e in run.models(["m1", "teachers"]) if "price" in e.tasks]
    assert sorted(e.label for e in teachers) == ["m1", "teachers[price]"]
    rmse = {e.label: metrics[e.stage]["val"][e.label]["price"]["rmse"] for e in teachers}
    weights = {label: (1 / r) / sum(1 / v for v in rmse.values()) for label, r in rmse.items()}
    assert max(weights, key=weights.get) == min(rmse, key=rmse.get)  # the lower RMSE counts more
    # the weights the stage used are recorded, with the scores they came from
    recorded = metrics["m2"]["teacher_weights"]
    assert recorded["policy"] == "val_score"
    shown = {row["teacher"]: row for row in recorded["tasks"]["price"]}
    assert set(shown) == set(weights)
    for label, row in shown.items():
        assert row["weight"] == pytest.approx(weights[label], rel=1e-9)
        assert row["score"] == pytest.approx(rmse[label]) and row["direction"] == "min"
    assert {row["teacher"] for row in recorded["tasks"]["band"]} == {"m1", "teachers[band]"}

    data = run.load_data(registries)
    caches = {}
    for index_path in (tmp_path / "run" / "cache" / "teacher_outputs").glob("*/index.json"):
        index = json.loads(index_path.read_text())
        assert index["storage"] == "fp16" and index["kinds"]["price"] == {"mean": "value"}
        parts = [load_tensors(index_path.parent / s["file"])[0]["price.mean"] for s in index["shards"]]
        caches[index["rows"]] = torch.cat(parts)
    for split_name in ("train", "val"):
        loaded = {e.label: load_model(e.path, registries) for e in teachers}
        rows = data.split(split_name, next(iter(loaded.values())).tasks)
        expected = torch.zeros(len(rows), 1, dtype=torch.float64)
        with torch.no_grad():
            for label, model in loaded.items():
                feats = model.model.features(rows.inputs)
                pred = model.tasks["price"].predict(model.model.heads["price"], feats)["value"]
                expected += weights[label] * pred.double()
        cached = caches[len(rows)]
        assert cached.dtype == torch.float32 and torch.isfinite(cached).all()
        assert float(cached.min()) > 9e7  # prices near 97,000,000, which fp16 cannot hold
        torch.testing.assert_close(cached.double(), expected, rtol=1e-6, atol=0.0)

    # predict reads a point per file through the toy_regression source and shows the price in
    # dollars: the student's own prediction for that point
    point = data.dataset.inputs[0]
    (tmp_path / "point.txt").write_text(" ".join(repr(float(v)) for v in point.tolist()))
    m2 = tmp_path / "run" / "stages" / "m2" / "model.safetensors"
    shown = CliRunner().invoke(cli, ["predict", str(m2), str(tmp_path / "point.txt"), "--json"])
    assert shown.exit_code == 0, shown.output
    [row] = json.loads(shown.output)
    student = load_model(m2, registries)
    with torch.no_grad():
        price = student.tasks["price"].predict(student.model.heads["price"], student.model.features(point[None]))
    assert row["tasks"]["price"] == {"kind": "values", "values": {"value": pytest.approx(price["value"][0].tolist())}}
    assert row["tasks"]["price"]["values"]["value"][0] > 9e7
    assert row["tasks"]["band"]["kind"] == "classes"
    text = CliRunner().invoke(cli, ["predict", str(m2), str(tmp_path / "point.txt")])
    assert text.exit_code == 0 and f"value {price['value'][0, 0].item():.6g}" in text.output, text.output
