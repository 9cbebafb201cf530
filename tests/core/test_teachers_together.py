"""Teachers trained together (``ensemble`` with ``together: true``): the same teachers as
training them one after the other, with early stopping, dropout, augmentation and a resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from distillkit.builtin.classification import ClassificationParams, ClassificationTask
from distillkit.builtin.components import MLPParams, MultiTaskParams, MultiTaskStudent
from distillkit.checkpoint import STATE_FORMAT, load_model_state, load_tensors
from distillkit.cli import cli
from distillkit.data import SplitData, hash_seed
from distillkit.losses import KDLoss, KDLossParams
from distillkit.plugins import PluginManager, set_plugin_manager
from distillkit.training import EarlyStoppingParams, Member, OptimizerParams, TrainingParams, fit, fit_together
from tests.conftest import toy_config, write_config

IN = 6
CPU = torch.device("cpu")
SUBSETS = (("a",), ("b",), ("a", "b"))
BATCH_SEED = 1234


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _tasks():
    a = ClassificationTask("a", ClassificationParams(hidden=16, dropout=0.3))
    a.fit(["a0", "a1", "a2"])
    b = ClassificationTask("b", ClassificationParams(hidden=0, weight=0.5))
    b.fit(["b0", "b1", "b2", "b3"])
    return {"a": a, "b": b}


def _split(tasks, n, seed, name):
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.normal(size=(n, IN)))  # float64
    targets = {"a": tasks["a"].encode([f"a{i}" for i in rng.integers(0, 3, n)]),
               "b": tasks["b"].encode([f"b{i}" for i in rng.integers(0, 4, n)])}
    return SplitData(name, np.arange(n), x, targets)


def _noise(x):
    return x + 0.1 * torch.randn_like(x)


def _params():
    # random labels: the validation loss soon rises, and each teacher stops at its own epoch
    return TrainingParams(optimizer=OptimizerParams(kind="adam", lr=0.05, weight_decay=1e-4), batch_size=8,
                          eval_batch_size=16, epochs=8, early_stopping=EarlyStoppingParams(patience=2))


def _models(tasks):
    registries = PluginManager(autoload=False).registries
    out = []
    for subset in SUBSETS:
        torch.manual_seed(hash_seed("init", subset))
        params = MultiTaskParams(encoder=MLPParams(in_features=IN, hidden=16, depth=2, dropout=0.2))
        out.append(MultiTaskStudent.build(params, {t: tasks[t] for t in subset}, registries))
    for model in out:
        assert next(model.parameters()).dtype == torch.float64
    return out


def _sequential(tasks, train, val, root):
    models, results = _models(tasks), []
    for i, (model, subset) in enumerate(zip(models, SUBSETS)):
        results.append(fit(model, {t: tasks[t] for t in subset}, KDLoss(KDLossParams()), train, val, _params(),
                           device=CPU, seed=hash_seed("teacher", i), workdir=root / str(i), stage="teachers",
                           augment=_noise, batch_seed=BATCH_SEED))
    return models, results


def _members(tasks, models, val, root, callbacks=None):
    return [Member(model, {t: tasks[t] for t in subset}, KDLoss(KDLossParams()), val, hash_seed("teacher", i),
                   root / str(i), callbacks=(callbacks or {}).get(i))
            for i, (model, subset) in enumerate(zip(models, SUBSETS))]


def _together(tasks, train, val, root, callbacks=None):
    models = _models(tasks)
    results = fit_together(_members(tasks, models, val, root, callbacks), train, _params(), device=CPU,
                           batch_seed=BATCH_SEED, stage="teachers", augment=_noise)
    return models, results


def _assert_same(models_a, models_b, root_a, root_b, results_a, results_b):
    for i, (a, b) in enumerate(zip(models_a, models_b)):
        sa, sb = a.state_dict(), b.state_dict()
        assert set(sa) == set(sb)
        for key in sa:
            assert torch.equal(sa[key], sb[key]), (i, key)
        assert (root_a / str(i) / "log.jsonl").read_text() == (root_b / str(i) / "log.jsonl").read_text()
        best_a, _ = load_model_state(root_a / str(i) / "best.safetensors")
        best_b, _ = load_model_state(root_b / str(i) / "best.safetensors")
        assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)
    assert [(r.best_epoch, r.epochs_run, r.history) for r in results_a] == \
           [(r.best_epoch, r.epochs_run, r.history) for r in results_b]


def test_together_gives_the_sequential_teachers_in_float64(tmp_path, float64):
    tasks = _tasks()
    train, val = _split(tasks, 40, 1, "train"), _split(tasks, 24, 2, "val")
    seq_models, seq = _sequential(tasks, train, val, tmp_path / "seq")
    tog_models, tog = _together(tasks, train, val, tmp_path / "tog")
    # the test means something: early stopping ends the teachers at different epochs, before the last
    assert len({r.epochs_run for r in seq}) > 1 and min(r.epochs_run for r in seq) < _params().epochs
    _assert_same(seq_models, tog_models, tmp_path / "seq", tmp_path / "tog", seq, tog)
    # a teacher ends with its best epoch's weights, not its last
    for i, r in enumerate(tog):
        best, _ = load_model_state(tmp_path / "tog" / str(i) / "best.safetensors")
        assert all(torch.equal(best[k], v) for k, v in tog_models[i].state_dict().items())
        assert r.best_epoch == min(range(r.epochs_run), key=lambda e: r.history[e]["val"]["loss"])


class _Kill(Exception):
    pass


class _KillAt:
    """Callbacks that interrupt the run after this member's epoch ``epoch`` was written."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_start(self, *a):
        pass

    def on_step(self):
        pass

    def on_epoch_end(self, epoch, record):
        if epoch == self.epoch:
            raise _Kill


def test_together_resumes_each_teacher_from_its_own_state(tmp_path, float64):
    tasks = _tasks()
    train, val = _split(tasks, 40, 1, "train"), _split(tasks, 24, 2, "val")
    seq_models, seq = _sequential(tasks, train, val, tmp_path / "seq")
    # interrupted after teacher 0 wrote epoch 1 and before teacher 1 and 2 did: they are an epoch apart
    with pytest.raises(_Kill):
        _together(tasks, train, val, tmp_path / "tog", callbacks={0: _KillAt(1)})
    epochs = [len((tmp_path / "tog" / str(i) / "log.jsonl").read_text().splitlines()) for i in range(3)]
    assert epochs == [2, 1, 1]
    tog_models, tog = _together(tasks, train, val, tmp_path / "tog")
    _assert_same(seq_models, tog_models, tmp_path / "seq", tmp_path / "tog", seq, tog)


def _run(tmp_path, together):
    config = toy_config(training={"optimizer": {"kind": "adam", "lr": 0.05}, "batch_size": 32, "epochs": 10,
                                  "early_stopping": {"metric": "val_loss", "patience": 1},
                                  "augment": {"kind": "gaussian_noise", "std": 0.3}})
    config["student"]["encoder"]["dropout"] = 0.2
    config["stages"] = {"teachers": {"kind": "ensemble", "subsets": "all", "together": together}}
    folder = tmp_path / ("together" if together else "sequential")
    folder.mkdir()
    set_plugin_manager(None)
    result = CliRunner().invoke(cli, ["run", str(write_config(folder, config)), "--out", str(folder / "run"),
                                      "--quiet"])
    assert result.exit_code == 0, result.output
    return folder / "run"


def test_ensemble_stage_together_writes_the_sequential_results(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLKIT_CACHE", str(tmp_path / "cache"))
    seq, tog = _run(tmp_path, False), _run(tmp_path, True)
    assert json.loads((seq / "metrics.json").read_text()) == json.loads((tog / "metrics.json").read_text())
    seq_stage = json.loads((seq / "stages" / "teachers" / "stage.json").read_text())
    tog_stage = json.loads((tog / "stages" / "teachers" / "stage.json").read_text())
    assert seq_stage["result"] == tog_stage["result"]  # scores, checksums (bit-identical weights), metrics
    logs = sorted((seq / "stages" / "teachers").rglob("log.jsonl"))
    assert len(logs) == 3
    stopped = set()
    for log in logs:
        other = tog / log.relative_to(seq)
        assert log.read_text() == other.read_text()
        stopped.add(len(log.read_text().splitlines()))
    assert len(stopped) > 1  # early stopping ended the teachers at different epochs


def test_together_reads_each_training_batch_once(tmp_path, float64, monkeypatch):
    import distillkit.training as training

    passes = []
    original = training.iterate_batches

    def counting(split, *args, **kw):
        if split.name == "train":
            passes.append(kw["epoch"])
        return original(split, *args, **kw)

    monkeypatch.setattr(training, "iterate_batches", counting)
    tasks = _tasks()
    train, val = _split(tasks, 40, 1, "train"), _split(tasks, 24, 2, "val")
    _, seq = _sequential(tasks, train, val, tmp_path / "seq")
    assert len(passes) == sum(r.epochs_run for r in seq)
    passes.clear()
    _, tog = _together(tasks, train, val, tmp_path / "tog")
    assert passes == list(range(max(r.epochs_run for r in tog)))  # one pass per epoch for all teachers


def test_sigkilled_together_stage_resumes_to_the_sequential_teachers(tmp_path):
    from tests.robustness.support import cli_env, dump_yaml, run_cli

    def config(together):
        data = toy_config(training={"optimizer": {"kind": "adam", "lr": 0.01}, "batch_size": 32, "epochs": 4,
                                    "early_stopping": None})
        data["stages"] = {"teachers": {"kind": "ensemble", "subsets": "all", "together": together}}
        return dump_yaml(tmp_path / f"{together}.yaml", data)

    env = dict(cli_env(tmp_path / "cache"), OMP_NUM_THREADS="1")
    args = ["run", str(config(True)), "--out", str(tmp_path / "together"), "--quiet"]
    # killed just after teacher [cluster] wrote its second epoch, before the others did
    killed = run_cli(args, env, kill_at="stages/.work/teachers-*/cluster/last.safetensors#2@after")
    assert killed.returncode == -9, killed.stderr
    work = next((tmp_path / "together" / "stages" / ".work").glob("teachers-*"))
    epochs = [load_tensors(work / s / "last.safetensors", STATE_FORMAT)[1]["loop"]["epoch"]
              for s in ("cluster", "quadrant", "cluster+quadrant")]
    assert epochs == [2, 1, 1]
    assert run_cli(args, env).returncode == 0
    sequential = run_cli(["run", str(config(False)), "--out", str(tmp_path / "sequential"), "--quiet"], env)
    assert sequential.returncode == 0, sequential.stderr
    results = [json.loads((tmp_path / mode / "stages" / "teachers" / "stage.json").read_text())["result"]
               for mode in ("together", "sequential")]
    assert results[0] == results[1]


def test_together_honours_bf16_and_channels_last_like_fit(tmp_path):
    """Teachers trained together take the same training step as fit: the forward autocast to
    bf16 on channels_last image batches, the losses on fp32 logits, and the same weights as
    fit gives each teacher alone under the same settings."""
    from tests.core.test_mixed_precision import _conv_student, _split as image_split, _tasks as image_tasks

    tasks = image_tasks()
    g = torch.Generator().manual_seed(0)
    train = image_split(tasks, torch.randn(48, 3, 8, 8, generator=g), "train")
    val = image_split(tasks, torch.randn(16, 3, 8, 8, generator=g), "val")

    def params(**kw):
        return TrainingParams(optimizer=OptimizerParams(kind="adam", lr=0.01, weight_decay=0.0), batch_size=16,
                              eval_batch_size=16, epochs=3, early_stopping=None, **kw)

    def teachers():
        models = [_conv_student(tasks, seed=s) for s in (1, 2)]
        seen = []
        for i, model in enumerate(models):
            model.encoder.conv1[0].register_forward_hook(
                lambda m, inp, out, i=i: seen.append(
                    (i, out.dtype, inp[0].is_contiguous(memory_format=torch.channels_last))) if m.training else None)
        return models, seen

    def members(models, root):
        return [Member(m, tasks, KDLoss(KDLossParams()), val, hash_seed("teacher", i), root / str(i))
                for i, m in enumerate(models)]

    fast = params(mixed_precision="bf16", channels_last=True)
    seq_models, seq_seen = teachers()
    seq = [fit(m, tasks, KDLoss(KDLossParams()), train, val, fast, device=CPU, seed=hash_seed("teacher", i),
               workdir=tmp_path / "seq" / str(i), stage="teachers", batch_seed=BATCH_SEED)
           for i, m in enumerate(seq_models)]
    tog_models, tog_seen = teachers()
    tog = fit_together(members(tog_models, tmp_path / "tog"), train, fast, device=CPU, batch_seed=BATCH_SEED,
                       stage="teachers")
    # every training forward of every teacher ran in bf16 on a channels_last batch
    assert {(dtype, layout) for _, dtype, layout in tog_seen} == {(torch.bfloat16, True)}
    assert sorted({i for i, _, _ in tog_seen}) == [0, 1] and len(tog_seen) == len(seq_seen) == 2 * 3 * 3
    assert all(m.encoder.conv1[0].weight.is_contiguous(memory_format=torch.channels_last) for m in tog_models)
    for i in range(2):
        assert (tmp_path / "seq" / str(i) / "log.jsonl").read_text() == \
               (tmp_path / "tog" / str(i) / "log.jsonl").read_text()
        a, b = seq_models[i].state_dict(), tog_models[i].state_dict()
        for key in a:
            assert torch.equal(a[key], b[key]), (i, key)
    assert [r.history for r in seq] == [r.history for r in tog]
    # the precision really changed the arithmetic: fp32 teachers trained together end elsewhere
    plain_models, plain_seen = teachers()
    fit_together(members(plain_models, tmp_path / "plain"), train, params(), device=CPU, batch_seed=BATCH_SEED,
                 stage="teachers")
    assert {(dtype, layout) for _, dtype, layout in plain_seen} == {(torch.float32, False)}
    assert not torch.equal(plain_models[0].state_dict()["encoder.conv1.0.weight"],
                           tog_models[0].state_dict()["encoder.conv1.0.weight"])
