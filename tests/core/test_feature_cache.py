"""Frozen encoder blocks and their feature cache: values, reuse, invalidation, damage, runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from distillkit import feature_cache
from distillkit.builtin.classification import ClassificationParams, ClassificationTask
from distillkit.builtin.components import MLPEncoder, MLPParams, MultiTaskStudent
from distillkit.checkpoint import load_model_state
from distillkit.config import validate_config
from distillkit.data import SplitData, hash_seed
from distillkit.errors import DistillkitError
from distillkit.feature_cache import FeatureCache, FrozenPrefix, freeze_encoder, reading_features
from distillkit.interfaces import Encoder, EncoderParams
from distillkit.losses import KDLoss, KDLossParams
from distillkit.models import build_student, load_model
from distillkit.plugins import PluginManager
from distillkit.runner import Runner, plan
from distillkit.training import OptimizerParams, TrainingParams, fit, make_optimizer
from tests.conftest import toy_config

CPU = torch.device("cpu")


@pytest.fixture
def registries():
    return PluginManager(autoload=False).registries


@pytest.fixture
def extractions(monkeypatch):
    """Counts the frozen-part passes over a split (one per split and cache build)."""
    calls: list[tuple[str, int]] = []
    original = feature_cache.extract

    def counting(encoder, split, *args, **kw):
        calls.append((split.name, len(split)))
        return original(encoder, split, *args, **kw)

    monkeypatch.setattr(feature_cache, "extract", counting)
    return calls


# -- encoders ---------------------------------------------------------------------------------

class BNParams(EncoderParams):
    kind: str = "bn_mlp"


class BNEncoder(Encoder):
    """Two Linear-BatchNorm-ReLU-Dropout blocks: statistics and dropout that freezing must fix."""

    Params = BNParams

    def __init__(self, params: BNParams):
        super().__init__()
        self.params = params
        self.one = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5))
        self.two = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5))
        self.out_features = 8

    def blocks(self):
        return [("one", self.one), ("two", self.two)]


def _task():
    task = ClassificationTask("y", ClassificationParams(hidden=0))
    task.fit(["a", "b", "c"])
    return task


def _split(task, n=40, seed=0, name="train", width=4):
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.normal(size=(n, width)).astype(np.float32))
    labels = [["a", "b", "c"][i] for i in rng.integers(0, 3, n)]
    return SplitData(name, np.arange(n) + 1000 * seed, x, {"y": task.encode(labels)})


def _bn_student(task, freeze="none"):
    torch.manual_seed(0)
    encoder = BNEncoder(BNParams(freeze=freeze))
    freeze_encoder(encoder)
    return MultiTaskStudent(encoder, {"y": task})


def _mlp(freeze, seed=0, depth=2):
    torch.manual_seed(seed)
    encoder = MLPEncoder(MLPParams(in_features=4, hidden=6, depth=depth, freeze=freeze))
    freeze_encoder(encoder)
    return encoder


def test_mlp_blocks_compose_to_the_forward_pass_and_keep_the_state_dict_keys():
    encoder = _mlp("none").eval()
    x = torch.randn(5, 2, 2)
    w1, b1, w2, b2 = (encoder.net[0].weight, encoder.net[0].bias, encoder.net[3].weight, encoder.net[3].bias)
    by_hand = torch.relu(torch.relu(x.flatten(1) @ w1.T + b1) @ w2.T + b2)
    assert [name for name, _ in encoder.blocks()] == ["layer1", "layer2"]
    torch.testing.assert_close(encoder(x), by_hand)
    assert sorted(encoder.state_dict()) == ["net.0.bias", "net.0.weight", "net.3.bias", "net.3.weight"]
    # the frozen part and the part above it split the same computation
    frozen = _mlp({"until": "layer1"})
    torch.testing.assert_close(frozen.forward_frozen(x), torch.relu(x.flatten(1) @ w1.T + b1))
    torch.testing.assert_close(frozen.forward_trainable(frozen.forward_frozen(x)), by_hand)


def test_a_bad_freeze_point_names_the_field_and_lists_the_blocks():
    with pytest.raises(DistillkitError) as err:
        _mlp({"until": "layr2"})
    assert err.value.where == "student.encoder.freeze.until"
    assert "'layr2'" in err.value.message and "Did you mean 'layer2'?" in err.value.message
    assert "layer1, layer2" in err.value.message


def test_the_frozen_part_stays_fixed_and_in_eval_mode_while_training(tmp_path):
    task = _task()
    model = _bn_student(task, {"until": "one"})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    assert not model.encoder.one[1].training and not model.encoder.one[3].training
    assert model.encoder.two[1].training and model.heads["y"].training
    optimised = {id(p) for g in make_optimizer(model, OptimizerParams()).param_groups for p in g["params"]}
    assert optimised == {id(p) for p in (*model.encoder.two.parameters(), *model.heads.parameters())}
    # dropout off in the frozen block even in train mode: two passes agree
    x = _split(task).inputs
    assert torch.equal(model.encoder.forward_frozen(x), model.encoder.forward_frozen(x))

    fit(model, {"y": task}, KDLoss(KDLossParams()), _split(task), _split(task, 16, 1, "val"),
        TrainingParams(batch_size=8, epochs=2, early_stopping=None), device=CPU, seed=0, workdir=tmp_path)
    after = model.state_dict()
    for key in ("encoder.one.0.weight", "encoder.one.0.bias", "encoder.one.1.running_mean",
                "encoder.one.1.running_var", "encoder.one.1.num_batches_tracked"):
        assert torch.equal(after[key], before[key]), key
    # the control: the block above trained, statistics included
    assert not torch.equal(after["encoder.two.1.running_mean"], before["encoder.two.1.running_mean"])
    assert not torch.equal(after["encoder.two.0.weight"], before["encoder.two.0.weight"])


def test_training_on_cached_features_equals_running_the_frozen_part(tmp_path):
    """Same seed, batches and dropout draws: only where the frozen part's output comes from differs."""
    task = _task()
    train, val = _split(task, 48, 0), _split(task, 16, 1, "val")
    params = TrainingParams(optimizer=OptimizerParams(kind="adam", lr=0.01), batch_size=8, epochs=3,
                            early_stopping=None)
    uncached = _bn_student(task, {"until": "one"})
    fit(uncached, {"y": task}, KDLoss(KDLossParams()), train, val, params, device=CPU, seed=3, workdir=tmp_path / "a")

    cached = _bn_student(task, {"until": "one"})
    cache = FeatureCache(tmp_path / "cache", "data", batch_size=64)
    with reading_features([cached]):
        fit(cached, {"y": task}, KDLoss(KDLossParams()), cache.view(cached.encoder, train),
            cache.view(cached.encoder, val), params, device=CPU, seed=3, workdir=tmp_path / "b")
    a, b = uncached.state_dict(), cached.state_dict()
    assert not torch.equal(a["encoder.two.0.weight"], _bn_student(task, {"until": "one"}).encoder.two[0].weight)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)


# -- the cache --------------------------------------------------------------------------------

def test_features_are_the_frozen_output_row_for_row_and_reused(tmp_path, extractions):
    task = _task()
    split = _split(task, 30)
    encoder = _mlp({"until": "layer1"})
    by_hand = torch.relu(split.inputs @ encoder.net[0].weight.T + encoder.net[0].bias)
    cache = FeatureCache(tmp_path, "data", batch_size=7)
    view = cache.view(encoder, split)
    torch.testing.assert_close(view.inputs, by_hand)
    assert np.array_equal(view.indices, split.indices) and view.targets is split.targets
    again = FeatureCache(tmp_path, "data", batch_size=64).view(_mlp({"until": "layer1"}), split)
    assert len(extractions) == 1 and torch.equal(again.inputs, view.inputs)
    # a change above the frozen part does not touch its output: the cache is shared
    above = _mlp({"until": "layer1"})
    with torch.no_grad():
        above.net[3].weight.add_(1.0)
    cache.view(above, split)
    assert len(extractions) == 1


def _changed(what: str, task):
    """(encoder, split, fingerprint) differing from the reference in one part of the key."""
    encoder, split, data = _mlp({"until": "layer1"}), _split(task, 30), "data"
    if what == "data":
        data = "other-data"
    elif what == "rows":  # same split name and size, other images
        split = _split(task, 30, seed=1)
    elif what == "split":
        split = SplitData("val", split.indices, split.inputs, split.targets)
    elif what == "freeze point":
        encoder = _mlp({"until": "layer2"})
    elif what == "freeze all":
        encoder = _mlp("all")
    elif what == "frozen weights":
        with torch.no_grad():
            encoder.net[0].bias.add_(0.5)
    elif what == "input dtype":
        split = SplitData(split.name, split.indices, split.inputs.double(), split.targets)
    return encoder, split, data


@pytest.mark.parametrize("what", ["data", "rows", "split", "freeze point", "freeze all", "frozen weights",
                                  "input dtype"])
def test_the_cache_is_rebuilt_when_a_part_of_its_key_changes(what, tmp_path, extractions):
    task = _task()
    reference = FeatureCache(tmp_path, "data").view(_mlp({"until": "layer1"}), _split(task, 30))
    encoder, split, data = _changed(what, task)
    view = FeatureCache(tmp_path, data).view(encoder, split)
    assert len(extractions) == 2
    with torch.no_grad():
        torch.testing.assert_close(view.inputs, encoder.forward_frozen(split.inputs))
    if what not in ("data", "split", "input dtype"):  # those change the key, not the values
        assert not torch.equal(view.inputs, reference.inputs)


def test_a_damaged_or_incomplete_cache_is_rebuilt(tmp_path, extractions):
    task = _task()
    split, encoder = _split(task, 30), _mlp({"until": "layer1"})
    good = FeatureCache(tmp_path, "data").view(encoder, split).inputs
    (folder,) = [p for p in tmp_path.iterdir()]
    shard = folder / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # a flipped bit in the tensor bytes: still a readable file
    shard.write_bytes(bytes(data))
    assert torch.equal(FeatureCache(tmp_path, "data").view(encoder, split).inputs, good)
    assert len(extractions) == 2
    (folder / "index.json").unlink()  # a build that died before its index
    assert torch.equal(FeatureCache(tmp_path, "data").view(encoder, split).inputs, good)
    assert len(extractions) == 3
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no temporaries left
    assert torch.equal(FeatureCache(tmp_path, "data").view(encoder, split).inputs, good)
    assert len(extractions) == 3


def test_a_build_that_fails_leaves_no_temporary_folder(tmp_path, monkeypatch):
    task = _task()

    def broken(*args, **kw):
        raise RuntimeError("killed")
        yield  # pragma: no cover

    monkeypatch.setattr(feature_cache, "extract", broken)
    with pytest.raises(RuntimeError):
        FeatureCache(tmp_path, "data").view(_mlp({"until": "layer1"}), _split(task))
    assert list(tmp_path.iterdir()) == []


def test_fp16_storage_is_separate_and_rounds_only(tmp_path):
    task = _task()
    split, encoder = _split(task, 30), _mlp({"until": "layer1"})
    fp32 = FeatureCache(tmp_path, "data").view(encoder, split).inputs
    fp16 = FeatureCache(tmp_path, "data", storage="fp16").view(encoder, split).inputs
    assert fp32.dtype == torch.float32 and fp16.dtype == torch.float16
    assert len(list(tmp_path.iterdir())) == 2
    torch.testing.assert_close(fp16.float(), fp32, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(encoder.forward_trainable(fp16), encoder.forward_trainable(fp32), rtol=1e-2, atol=1e-3)


# -- runs -------------------------------------------------------------------------------------

def _frozen_config(mode: str = "fp32", freeze=None, **training) -> dict:
    config = toy_config(training={"optimizer": {"kind": "adam", "lr": 0.01}, "batch_size": 32, "epochs": 2,
                                  "early_stopping": None, "feature_cache": mode, **training})
    config["student"]["encoder"]["freeze"] = freeze or {"until": "layer1"}
    return config


def _run(raw: dict, registries, out: Path) -> Runner:
    runner = Runner(validate_config(raw, registries, base_dir=Path(".")), registries, out)
    runner.run()
    return runner


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The toy pipeline (two subset teachers, M1, M2 from all three, M3 on the unlabeled pool,
    evaluation) with M1's first layer frozen: on cached features and running it every step."""
    root = tmp_path_factory.mktemp("frozen")
    registries = PluginManager(autoload=False).registries
    mp = pytest.MonkeyPatch()
    mp.setenv("DISTILLKIT_CACHE", str(root / "cache"))
    calls, fits = [], {}
    original_extract, original_fit = feature_cache.extract, __import__("distillkit.stages").stages.fit

    def counting(encoder, split, *args, **kw):
        calls.append(split.name)
        return original_extract(encoder, split, *args, **kw)

    def recording(model, tasks, loss_fn, train, val, *args, stage="stage", **kw):
        fits[stage] = (train, model.encoder.reads_features)
        return original_fit(model, tasks, loss_fn, train, val, *args, stage=stage, **kw)

    mp.setattr(feature_cache, "extract", counting)
    mp.setattr("distillkit.stages.fit", recording)
    try:
        cached = _run(_frozen_config("fp32"), registries, root / "cached")
        first = list(calls)
        cached_fits = dict(fits)
        _run(_frozen_config("fp32"), registries, root / "again")
        again = calls[len(first):]
        uncached = _run(_frozen_config("off"), registries, root / "uncached")
    finally:
        mp.undo()
    return {"root": root, "cached": cached, "uncached": uncached, "extractions": first, "again": again,
            "fits": cached_fits, "registries": registries}


STAGES = ("teachers/cluster", "teachers/quadrant", "m1", "m2", "m3")


def _weights(run_dir: Path, stage: str):
    return load_model_state(run_dir / "stages" / stage / "model.safetensors")[0]


def test_a_pipeline_on_cached_features_gives_the_weights_of_running_the_frozen_part(runs):
    for stage in STAGES:
        a, b = _weights(runs["cached"].run_dir, stage), _weights(runs["uncached"].run_dir, stage)
        assert set(a) == set(b)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=f"{stage} {key}")
    a = json.loads((runs["cached"].run_dir / "metrics.json").read_text())
    b = json.loads((runs["uncached"].run_dir / "metrics.json").read_text())
    assert a["report"] == b["report"]
    # every stage really trained on features (the control for the comparison above)
    assert all(reads for _, reads in runs["fits"].values())


def test_frozen_weights_are_those_of_the_initialised_student_in_every_model(runs):
    config = runs["cached"].config
    torch.manual_seed(hash_seed(config.seed, "m1", "m1", "init"))
    initial = build_student(config.student, runs["cached"].tasks, runs["registries"]).state_dict()
    for stage in ("m1", "m2", "m3"):
        weights = _weights(runs["cached"].run_dir, stage)
        for key in ("encoder.net.0.weight", "encoder.net.0.bias"):
            assert torch.equal(weights[key], initial[key]), (stage, key)
        assert not torch.equal(weights["encoder.net.3.weight"], initial["encoder.net.3.weight"])


def test_features_are_computed_once_per_frozen_part_and_split_and_reused_by_the_next_run(runs):
    # M1: train/val/test; each subset teacher (its own random frozen layer): three more; M2
    # (initialised from M1, same frozen layer) none; M3: the unlabeled pool only.
    assert sorted(runs["extractions"]) == sorted(["train", "val", "test"] * 3 + ["unlabeled"])
    assert runs["again"] == []  # a second run over the same data reads the shared cache
    assert len(list((runs["root"] / "cache" / "features").iterdir())) == 10


def test_m3_trains_on_the_features_of_the_unlabeled_rows(runs):
    runner = runs["cached"]
    train, reads = runs["fits"]["m3"]
    raw = runner.splits["unlabeled"]
    model = load_model(runner.run_dir / "stages" / "m1" / "model.safetensors", runs["registries"]).model
    assert reads and len(train) == len(raw) and np.array_equal(train.indices, raw.indices)
    with torch.no_grad():
        torch.testing.assert_close(train.inputs, model.encoder.forward_frozen(raw.inputs))
    m2_train, _ = runs["fits"]["m2"]
    assert np.array_equal(m2_train.indices, runner.splits["train"].indices)


def test_a_model_trained_on_features_predicts_the_same_from_raw_inputs(runs):
    runner = runs["cached"]
    loaded = load_model(runner.run_dir / "stages" / "m3" / "model.safetensors", runs["registries"])
    model, test = loaded.model, runner.splits["test"]
    assert loaded.model.encoder.frozen_blocks == 1
    assert not model.encoder.net[0].weight.requires_grad and model.encoder.net[3].weight.requires_grad
    cache = FeatureCache(runs["root"] / "cache" / "features", runner.data_fingerprint)
    view = cache.view(model.encoder, test)
    with torch.no_grad():
        raw = {t: p["probs"] for t, p in ((t, loaded.tasks[t].predict(model.heads[t], model.features(test.inputs)))
                                          for t in loaded.tasks)}
        with reading_features([model]):
            feats = model.features(view.inputs)
        cached = {t: loaded.tasks[t].predict(model.heads[t], feats)["probs"] for t in loaded.tasks}
    for t in raw:
        torch.testing.assert_close(cached[t], raw[t], rtol=0, atol=1e-5)


def test_a_bad_freeze_point_is_reported_before_any_data_is_loaded(tmp_path, registries, monkeypatch):
    config = validate_config(_frozen_config(freeze={"until": "layer3"}), registries, file="toy.yaml")

    def no_data(self):
        raise AssertionError("data loaded before the freeze point was checked")

    monkeypatch.setattr(Runner, "prepare_data", no_data)
    with pytest.raises(DistillkitError) as err:
        Runner(config, registries, tmp_path / "run").run()
    assert err.value.where == "toy.yaml: student.encoder.freeze.until"
    assert "Blocks, in order: layer1, layer2." in err.value.message


def test_augmentation_with_a_frozen_feature_cache_is_refused_by_the_planner(registries):
    augment = {"kind": "gaussian_noise", "std": 0.1}
    config = validate_config(_frozen_config(augment=augment), registries, file="toy.yaml")
    with pytest.raises(DistillkitError, match=r"stages.m1.training.augment: .*feature_cache: off"):
        plan(config, registries)
    raw = _frozen_config("off", augment=augment)
    for stage in raw["stages"].values():
        if stage["kind"] == "distill":
            stage["teacher_outputs"] = {"mode": "online"}
    plan(validate_config(raw, registries), registries)  # the frozen part runs every step: accepted
