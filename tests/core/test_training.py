"""The training loop: it learns, it checkpoints exactly, it resumes exactly, it stops early, it fails safely."""

from __future__ import annotations

import copy
import json
import pickle
import shutil

import numpy as np
import pytest
import torch

from distillkit.builtin.classification import ClassificationParams, ClassificationTask
from distillkit.builtin.components import MLPParams, MultiTaskParams, MultiTaskStudent
from distillkit.checkpoint import (STATE_FORMAT, file_checksum, load_model_state, load_tensors,
                                   optimizer_from_tensors, optimizer_to_tensors, save_model, save_tensors)
from distillkit.data import SplitData, hash_seed
from distillkit.errors import DistillkitError
from distillkit.losses import KDLoss, KDLossParams
from distillkit.models import load_model, model_meta
from distillkit.plugins import PluginManager
from distillkit.training import EarlyStoppingParams, OptimizerParams, TrainingParams, fit

IN = 6
CPU = torch.device("cpu")


@pytest.fixture
def registries():
    return PluginManager(autoload=False).registries  # a fresh plugin manager per test


def _tasks(dropout=0.0):
    a = ClassificationTask("a", ClassificationParams(hidden=16, dropout=dropout))
    a.fit(["a0", "a1", "a2"])
    b = ClassificationTask("b", ClassificationParams(hidden=0, weight=0.5))
    b.fit(["b0", "b1", "b2", "b3"])
    return {"a": a, "b": b}


def _student_params(dropout=0.0):
    return MultiTaskParams(encoder=MLPParams(in_features=IN, hidden=32, depth=2, dropout=dropout))


def _student(tasks, registries, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    return MultiTaskStudent.build(_student_params(dropout), tasks, registries)


def _split(tasks, n, seed, name="train", missing_b=()):
    """Random inputs and random labels (learnable only by memorising)."""
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.normal(size=(n, IN)).astype(np.float32))
    labels_a = [f"a{i}" for i in rng.integers(0, 3, n)]
    labels_b = [None if i in missing_b else f"b{j}" for i, j in enumerate(rng.integers(0, 4, n))]
    targets = {"a": tasks["a"].encode(labels_a), "b": tasks["b"].encode(labels_b)}
    return SplitData(name, np.arange(n), x, targets)


def _params(**kw):
    defaults = dict(optimizer=OptimizerParams(kind="sgd", lr=0.05, momentum=0.9), batch_size=8, eval_batch_size=64,
                    epochs=6, early_stopping=None)
    return TrainingParams(**{**defaults, **kw})


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(a, b):
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


class _Recorder:
    """Callbacks that snapshot the weights after every epoch."""

    def __init__(self, model):
        self.model = model
        self.started: list[int] = []
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def on_epoch_start(self, epoch, total_epochs, steps):
        self.started.append(epoch)

    def on_step(self):
        pass

    def on_epoch_end(self, epoch, record):
        self.snapshots[epoch] = _state(self.model)


def _ce_loss(model, tasks, split):
    """The summed weighted CE of a split in eval mode, computed without the training code."""
    model.eval()
    with torch.no_grad():
        feats = model.features(split.inputs)
        total = 0.0
        for name, task in tasks.items():
            t = split.targets[name]
            ce = torch.nn.functional.cross_entropy(model.heads[name](feats)[t["present"]], t["y"][t["present"]])
            total += task.weight * ce.item()
    return total


# -- learning ------------------------------------------------------------------------------

def test_tiny_student_overfits_a_tiny_batch(registries, tmp_path):
    tasks = _tasks()
    train = _split(tasks, 16, seed=1, missing_b=(3, 7))
    model = _student(tasks, registries)
    before = _ce_loss(model, tasks, train)
    params = _params(optimizer=OptimizerParams(kind="adam", lr=0.03, weight_decay=0.0), batch_size=16, epochs=60)
    result = fit(model, tasks, KDLoss(KDLossParams()), train, train, params, device=CPU, seed=0, workdir=tmp_path)
    assert result.epochs_run == 60 and len(result.history) == 60
    assert result.history[-1]["train_loss"] < 0.01
    assert before > 1.0
    assert _ce_loss(model, tasks, train) < 0.01
    # evaluation on the training rows agrees: every label is predicted
    assert result.history[-1]["val"]["a"]["accuracy"] == 1.0
    assert result.history[-1]["val"]["b"]["accuracy"] == 1.0
    assert result.history[-1]["val"]["loss"] == pytest.approx(_ce_loss(model, tasks, train), rel=1e-4, abs=1e-6)
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in logged] == list(range(60))


# -- checkpoints ---------------------------------------------------------------------------

def test_model_checkpoint_round_trip_is_bit_exact(registries, tmp_path):
    tasks = _tasks(dropout=0.3)
    model = _student(tasks, registries, dropout=0.3)
    train = _split(tasks, 24, seed=2)
    fit(model, tasks, KDLoss(KDLossParams()), train, train, _params(epochs=2), device=CPU, seed=0,
        workdir=tmp_path / "run")
    path = tmp_path / "model.safetensors"
    save_model(path, model, model_meta(_student_params(0.3), tasks, "m1"))

    state, meta = load_model_state(path)
    _assert_same_state(state, model.state_dict())
    assert meta["stage"] == "m1"
    assert meta["tasks"]["a"]["state"] == {"classes": ["a0", "a1", "a2"]}

    loaded = load_model(path, registries)
    _assert_same_state(loaded.model.state_dict(), model.state_dict())
    assert loaded.checksum == file_checksum(path)
    assert {n: t.classes for n, t in loaded.tasks.items()} == {n: t.classes for n, t in tasks.items()}
    assert loaded.tasks["b"].weight == 0.5
    assert not loaded.model.training
    model.eval()
    x = torch.randn(10, IN)
    with torch.no_grad():
        for name in tasks:
            ours = model.heads[name](model.features(x))
            theirs = loaded.model.heads[name](loaded.model.features(x))
            assert torch.equal(ours, theirs)


def _train_steps(model, optimizer, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, IN, generator=g)
        y = torch.randint(0, 3, (8,), generator=g)
        loss = torch.nn.functional.cross_entropy(model.heads["a"](model.features(x)), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4),
    lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=1e-4),
], ids=["sgd-momentum", "adam"])
def test_optimizer_state_round_trip(registries, tmp_path, make):
    tasks = _tasks()
    model = _student(tasks, registries)
    optimizer = make(model.parameters())
    _train_steps(model, optimizer, 3, seed=0)

    tensors, meta = optimizer_to_tensors(optimizer)
    path = tmp_path / "state.safetensors"
    save_tensors(path, tensors, {"format": STATE_FORMAT, "optimizer": meta})  # through the file and JSON
    read, read_meta = load_tensors(path, STATE_FORMAT)

    twin = copy.deepcopy(model)
    restored = make(twin.parameters())
    optimizer_from_tensors(restored, read, read_meta["optimizer"])
    original, copy_ = optimizer.state_dict(), restored.state_dict()
    assert set(original["state"]) == set(copy_["state"]) and original["state"]
    for pid, values in original["state"].items():
        assert set(values) == set(copy_["state"][pid])
        for key, value in values.items():
            other = copy_["state"][pid][key]
            if torch.is_tensor(value):
                assert torch.equal(value, other), (pid, key)
                assert value.dtype == other.dtype
            else:
                assert value == other
    normalise = lambda groups: json.loads(json.dumps(groups))  # noqa: E731 (tuples vs lists)
    assert normalise(original["param_groups"]) == normalise(copy_["param_groups"])
    # the restored optimizer continues exactly like the original
    _train_steps(model, optimizer, 2, seed=1)
    _train_steps(twin, restored, 2, seed=1)
    _assert_same_state(model.state_dict(), twin.state_dict())


# -- resume ------------------------------------------------------------------------------

def test_interrupted_fit_resumes_to_identical_weights(registries, tmp_path):
    tasks = _tasks(dropout=0.3)
    train = _split(tasks, 44, seed=3, missing_b=(0, 5, 9))
    val = _split(tasks, 20, seed=4, name="val")
    loss_fn = KDLoss(KDLossParams())
    # early stopping on (patience large enough not to stop): the best-epoch bookkeeping must resume too
    es = EarlyStoppingParams(metric="val_loss", patience=20)

    straight = _student(tasks, registries, dropout=0.3, seed=0)
    full = fit(straight, tasks, loss_fn, train, val, _params(epochs=6, early_stopping=es), device=CPU, seed=7,
               workdir=tmp_path / "straight", stage="m1")

    first = _student(tasks, registries, dropout=0.3, seed=0)
    fit(first, tasks, loss_fn, train, val, _params(epochs=3, early_stopping=es), device=CPU, seed=7,
        workdir=tmp_path / "resumed", stage="m1")
    second = _student(tasks, registries, dropout=0.3, seed=123)  # fresh object, other init: loaded from disk
    recorder = _Recorder(second)
    resumed = fit(second, tasks, loss_fn, train, val, _params(epochs=6, early_stopping=es), device=CPU, seed=7,
                  workdir=tmp_path / "resumed", stage="m1", callbacks=recorder)

    assert recorder.started == [3, 4, 5]  # only the missing epochs ran
    assert resumed.epochs_run == full.epochs_run == 6
    assert resumed.best_epoch == full.best_epoch
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in full.history]
    _assert_same_state(second.state_dict(), straight.state_dict())
    last_a, _ = load_tensors(tmp_path / "straight" / "last.safetensors", STATE_FORMAT)
    last_b, _ = load_tensors(tmp_path / "resumed" / "last.safetensors", STATE_FORMAT)
    _assert_same_state(last_a, last_b)  # weights after the last epoch, optimizer state and RNG
    # dropout made the RNG matter: a different stream gives different weights
    other = _student(tasks, registries, dropout=0.3, seed=0)
    fit(other, tasks, loss_fn, train, val, _params(epochs=6, early_stopping=es), device=CPU, seed=8,
        workdir=tmp_path / "other", stage="m1")
    assert not torch.equal(other.state_dict()["encoder.net.0.weight"], straight.state_dict()["encoder.net.0.weight"])


# -- failures ------------------------------------------------------------------------------

def test_nan_loss_names_stage_and_step_and_keeps_the_last_checkpoint(registries, tmp_path):
    tasks = _tasks()
    train = _split(tasks, 40, seed=5)
    loss_fn = KDLoss(KDLossParams())
    model = _student(tasks, registries)
    fit(model, tasks, loss_fn, train, train, _params(epochs=2), device=CPU, seed=3, workdir=tmp_path, stage="m2")
    last, best = tmp_path / "last.safetensors", tmp_path / "best.safetensors"
    saved_last, saved_best = last.read_bytes(), best.read_bytes()

    bad_row = 17
    poisoned = SplitData("train", train.indices, train.inputs.clone(), train.targets)
    poisoned.inputs[bad_row, 2] = float("nan")
    # the epoch-2 order of the rows decides which step sees the NaN first
    order = torch.randperm(40, generator=torch.Generator().manual_seed(hash_seed(3, 2)))
    step = int((order == bad_row).nonzero()) // 8
    with pytest.raises(DistillkitError, match=rf"stage 'm2' at epoch 2, step {step}\b") as info:
        fit(_student(tasks, registries), tasks, loss_fn, poisoned, train, _params(epochs=4), device=CPU, seed=3,
            workdir=tmp_path, stage="m2")
    assert "last.safetensors" in info.value.message
    assert last.read_bytes() == saved_last
    assert best.read_bytes() == saved_best
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 2


def test_huge_learning_rate_is_reported_as_a_nan_loss(registries, tmp_path):
    tasks = _tasks()
    train = _split(tasks, 16, seed=6)
    train.inputs.mul_(1e3)
    params = _params(optimizer=OptimizerParams(kind="sgd", lr=1e12, momentum=0.0), epochs=3)
    with pytest.raises(DistillkitError, match=r"stage 'm1' at epoch 0, step \d"):
        fit(_student(tasks, registries), tasks, KDLoss(KDLossParams()), train, train, params, device=CPU, seed=0,
            workdir=tmp_path, stage="m1")
    assert not (tmp_path / "last.safetensors").exists()


@pytest.fixture
def no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        pytest.fail("a checkpoint was unpickled")

    for module, name in ((pickle, "load"), (pickle, "loads"), (torch, "load"), (torch.serialization, "load")):
        monkeypatch.setattr(module, name, refuse)


def test_load_tensors_never_unpickles(tmp_path, no_unpickling):
    pickled = tmp_path / "weights.pt"
    with open(pickled, "wb") as fh:  # a real torch.save file, written before the patch matters
        torch.serialization.save({"w": torch.ones(3)}, fh)
    renamed = tmp_path / "weights.safetensors"
    shutil.copy(pickled, renamed)
    with pytest.raises(DistillkitError, match="not a .safetensors file"):
        load_tensors(pickled)
    with pytest.raises(DistillkitError, match="not a readable safetensors file"):
        load_tensors(renamed)
    with pytest.raises(DistillkitError):
        load_model_state(renamed)
    with pytest.raises(DistillkitError, match="does not exist"):
        load_tensors(tmp_path / "missing.safetensors")


def test_resume_from_a_pickle_planted_as_last_checkpoint_is_refused(registries, tmp_path, no_unpickling):
    tasks = _tasks()
    torch.serialization.save({"model.x": torch.ones(1)}, str(tmp_path / "planted.pt"))
    shutil.copy(tmp_path / "planted.pt", tmp_path / "last.safetensors")
    train = _split(tasks, 8, seed=0)
    with pytest.raises(DistillkitError, match="not a readable safetensors file"):
        fit(_student(tasks, registries), tasks, KDLoss(KDLossParams()), train, train, _params(epochs=1),
            device=CPU, seed=0, workdir=tmp_path)


def test_foreign_safetensors_files_are_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(DistillkitError, match="not a distillkit checkpoint"):
        load_tensors(tmp_path / "foreign.safetensors")
    save_tensors(tmp_path / "state.safetensors", {"w": torch.ones(2)}, {"format": STATE_FORMAT})
    with pytest.raises(DistillkitError, match="expected 'distillkit.model/1'"):
        load_model_state(tmp_path / "state.safetensors")


# -- early stopping ------------------------------------------------------------------------

def test_early_stopping_stops_after_patience_and_restores_the_best_weights(registries, tmp_path):
    tasks = _tasks()
    train = _split(tasks, 32, seed=7)
    model = _student(tasks, registries)
    recorder = _Recorder(model)
    # accuracy can never improve by more than 1: after epoch 0 no epoch counts as better
    es = EarlyStoppingParams(metric="a.accuracy", patience=3, min_delta=1.0)
    result = fit(model, tasks, KDLoss(KDLossParams()), train, train, _params(epochs=30, early_stopping=es),
                 device=CPU, seed=0, workdir=tmp_path, callbacks=recorder)
    assert recorder.started == [0, 1, 2, 3]
    assert result.epochs_run == 4 and result.best_epoch == 0
    assert [r["epoch"] for r in result.history] == [0, 1, 2, 3]
    _assert_same_state(model.state_dict(), recorder.snapshots[0])
    assert not torch.equal(recorder.snapshots[3]["heads.a.0.weight"], recorder.snapshots[0]["heads.a.0.weight"])
    best, meta = load_model_state(tmp_path / "best.safetensors")
    _assert_same_state(best, recorder.snapshots[0])
    assert meta["epoch"] == 0


def test_early_stopping_keeps_the_epoch_with_the_lowest_val_loss(registries, tmp_path):
    tasks = _tasks()
    train = _split(tasks, 32, seed=8)
    val = _split(tasks, 32, seed=9, name="val")  # unrelated labels: training soon hurts the val loss
    model = _student(tasks, registries)
    recorder = _Recorder(model)
    es = EarlyStoppingParams(metric="val_loss", patience=4)
    params = _params(optimizer=OptimizerParams(kind="adam", lr=0.02, weight_decay=0.0), epochs=40, early_stopping=es)
    result = fit(model, tasks, KDLoss(KDLossParams()), train, val, params, device=CPU, seed=0, workdir=tmp_path,
                 callbacks=recorder)
    losses = [r["val"]["loss"] for r in result.history]
    best = int(np.argmin(losses))  # the first minimum
    assert result.best_epoch == best
    assert result.epochs_run == best + 5 < 40  # four epochs without improvement, then stop
    assert all(loss >= losses[best] for loss in losses[best + 1:])
    _assert_same_state(model.state_dict(), recorder.snapshots[best])
    assert _ce_loss(model, tasks, val) == pytest.approx(losses[best], rel=1e-4)


def test_rerunning_an_early_stopped_fit_trains_no_further(registries, tmp_path):
    """A stage interrupted after fit returned is re-run on the same workdir: it must end as before."""
    tasks = _tasks()
    train = _split(tasks, 32, seed=7)
    es = EarlyStoppingParams(metric="a.accuracy", patience=3, min_delta=1.0)
    first = _student(tasks, registries)
    done = fit(first, tasks, KDLoss(KDLossParams()), train, train, _params(epochs=30, early_stopping=es),
               device=CPU, seed=0, workdir=tmp_path)
    saved_last = (tmp_path / "last.safetensors").read_bytes()
    again = _student(tasks, registries, seed=5)
    recorder = _Recorder(again)
    redo = fit(again, tasks, KDLoss(KDLossParams()), train, train, _params(epochs=30, early_stopping=es),
               device=CPU, seed=0, workdir=tmp_path, callbacks=recorder)
    assert recorder.started == []
    assert (redo.epochs_run, redo.best_epoch) == (done.epochs_run, done.best_epoch) == (4, 0)
    assert (tmp_path / "last.safetensors").read_bytes() == saved_last
    _assert_same_state(again.state_dict(), first.state_dict())


def test_misspelt_early_stopping_metric_is_a_user_error(registries, tmp_path):
    tasks = _tasks()
    train = _split(tasks, 16, seed=7)
    es = EarlyStoppingParams(metric="a.acuracy", patience=3)
    with pytest.raises(DistillkitError, match=r"'a\.acuracy'.*Did you mean 'a\.accuracy'\?") as info:
        fit(_student(tasks, registries), tasks, KDLoss(KDLossParams()), train, train,
            _params(epochs=30, early_stopping=es), device=CPU, seed=0, workdir=tmp_path)
    assert "val_loss" in info.value.message and "b.accuracy" in info.value.message
    with pytest.raises(DistillkitError, match="'val_kd'"):  # no teachers: there is no KD term to monitor
        fit(_student(tasks, registries), tasks, KDLoss(KDLossParams()), train, train,
            _params(epochs=2, early_stopping=EarlyStoppingParams(metric="val_kd")), device=CPU, seed=0,
            workdir=tmp_path / "kd")


class _NaNFirstValidation(KDLoss):
    """The KD loss, except that the first validation pass reports NaN."""

    def __init__(self):
        super().__init__(KDLossParams())
        self.validations = 0

    def __call__(self, *args, **kwargs):
        loss, parts = super().__call__(*args, **kwargs)
        if not torch.is_grad_enabled():  # evaluate() runs under no_grad
            self.validations += 1
            if self.validations == 1:
                loss = loss * float("nan")
        return loss, parts


def test_a_nan_score_at_epoch_zero_does_not_block_later_improvements(registries, tmp_path):
    tasks = _tasks()
    train = _split(tasks, 16, seed=1)
    model = _student(tasks, registries)
    recorder = _Recorder(model)
    es = EarlyStoppingParams(metric="val_loss", patience=2)
    params = _params(optimizer=OptimizerParams(kind="adam", lr=0.03, weight_decay=0.0), batch_size=16, epochs=6,
                     early_stopping=es)
    result = fit(model, tasks, _NaNFirstValidation(), train, train, params, device=CPU, seed=0, workdir=tmp_path,
                 callbacks=recorder)
    losses = [r["val"].get("loss", float("nan")) for r in result.history]
    assert np.isnan(losses[0])
    assert result.epochs_run == 6  # training keeps improving the (training-set) validation loss
    assert result.best_epoch == 1 + int(np.argmin(losses[1:])) == 5
    _assert_same_state(model.state_dict(), recorder.snapshots[5])


def test_teachers_see_the_augmented_batch(tmp_path):
    """fit applies the augmentation before asking for soft targets: student and teachers share the view."""
    from distillkit.builtin.classification import ClassificationTask
    from distillkit.builtin.components import MLPEncoder, MultiTaskStudent
    from distillkit.data import SplitData
    from distillkit.losses import KDLoss
    from distillkit.training import TrainingParams, fit

    task = ClassificationTask("a", ClassificationTask.Params(hidden=4))
    task.fit(["x", "y"])
    x = torch.zeros(8, 4)
    split = SplitData("train", np.arange(8), x, {"a": task.encode(["x", "y"] * 4)})
    seen = []

    def soft_targets(batch):
        seen.append(batch.inputs.clone())
        return {"a": {"probs": torch.full((len(batch.index), 2), 0.5)}}

    model = MultiTaskStudent(MLPEncoder(MLPEncoder.Params(in_features=4, hidden=4)), {"a": task})
    fit(model, {"a": task}, KDLoss(KDLoss.Params()), split, split,
        TrainingParams(batch_size=4, epochs=1, early_stopping=None), device=torch.device("cpu"), seed=0,
        workdir=tmp_path, use_labels=False, soft_targets=soft_targets, alpha=1.0, tau={"a": 1.0},
        augment=lambda inputs: inputs + 100.0)
    assert len(seen) == 2 and all(torch.equal(s, torch.full((4, 4), 100.0)) for s in seen)
