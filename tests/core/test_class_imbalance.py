"""Class imbalance: balanced CE weights from the training split, and a class-balanced sampler."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distillkit.builtin.classification import ClassificationParams, ClassificationTask
from distillkit.config import ConfigErrors, validate_config
from distillkit.data import Dataset, SplitData, SplitParams, iterate_batches, prepare_splits
from distillkit.losses import KDLoss, KDLossParams, kl_rows, tempered_probs
from distillkit.training import SamplerParams, sampler_weights
from tests.conftest import toy_config


def _task(labels: list[str | None], class_weights: str = "balanced") -> ClassificationTask:
    task = ClassificationTask("t", ClassificationParams(class_weights=class_weights))
    task.fit(labels)
    return task


def test_balanced_weights_match_the_hand_computation():
    # counts a:3, b:1 -> n / (C * count) = 4 / (2 * 3) = 2/3 and 4 / (2 * 1) = 2
    task = _task(["a", "a", "a", "b", None])
    assert task.class_weights.tolist() == pytest.approx([2 / 3, 2.0])
    # three classes 6:3:1 -> 10/18, 10/9, 10/3
    task = _task(["x"] * 6 + ["y"] * 3 + ["z"])
    assert task.class_weights.tolist() == pytest.approx([10 / 18, 10 / 9, 10 / 3])


def test_none_leaves_the_loss_unweighted():
    task = _task(["a", "a", "a", "b"], class_weights="none")
    assert task.class_weights is None
    z = torch.tensor([[2.0, -1.0], [0.5, 0.25]])
    target = task.encode(["a", "b"])
    assert torch.allclose(task.hard_loss(z, target), F.cross_entropy(z, target["y"], reduction="none"))


def test_weighted_ce_in_the_kd_loss_is_torchs_weighted_mean():
    task = _task(["a", "a", "a", "b"])
    z = torch.tensor([[2.0, -1.0], [0.5, 0.25], [-1.0, 1.0], [0.0, 3.0]])
    target = task.encode(["a", "b", "b", None])  # the last row has no label
    loss, _ = KDLoss(KDLossParams())({"t": task}, {"t": z}, {"t": target}, None, 0.0, {"t": 1.0})
    w = torch.tensor([2 / 3, 2.0])
    expected = F.cross_entropy(z[:3], target["y"][:3], weight=w)  # torch: sum w_y ce / sum w_y
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    # by hand: (2/3 ce0 + 2 ce1 + 2 ce2) / (2/3 + 2 + 2)
    ce = F.cross_entropy(z[:3], target["y"][:3], reduction="none")
    hand = (2 / 3 * ce[0] + 2 * ce[1] + 2 * ce[2]) / (2 / 3 + 4)
    assert float(loss) == pytest.approx(float(hand), rel=1e-6)
    # and it is not the plain mean nor the weighted sum over the present-row count
    assert abs(float(loss) - float(F.cross_entropy(z[:3], target["y"][:3]))) > 1e-3
    assert abs(float(loss) - float((torch.tensor([2 / 3, 2, 2]) * ce).sum() / 3)) > 1e-3


def test_kl_term_is_not_weighted():
    weighted, plain = _task(["a", "a", "a", "b"]), _task(["a", "a", "a", "b"], "none")
    z = torch.tensor([[2.0, -1.0], [0.5, 0.25], [-1.0, 1.0]])
    target = weighted.encode(["a", "b", "b"])
    soft = {"t": {"probs": tempered_probs(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.3, 0.1]]), 2.0)}}
    alpha, tau = 0.7, {"t": 2.0}
    loss_w, _ = KDLoss(KDLossParams())({"t": weighted}, {"t": z}, {"t": target}, soft, alpha, tau)
    loss_p, _ = KDLoss(KDLossParams())({"t": plain}, {"t": z}, {"t": target}, soft, alpha, tau)
    kl = 4.0 * kl_rows(z, soft["t"]["probs"], 2.0).mean()
    ce_w = F.cross_entropy(z, target["y"], weight=torch.tensor([2 / 3, 2.0]))
    ce_p = F.cross_entropy(z, target["y"])
    assert float(loss_w) == pytest.approx(float((1 - alpha) * ce_w + alpha * kl), rel=1e-6)
    assert float(loss_p) == pytest.approx(float((1 - alpha) * ce_p + alpha * kl), rel=1e-6)
    # unlabeled distillation (KL only) is the same with or without class weights
    only_w, _ = KDLoss(KDLossParams())({"t": weighted}, {"t": z}, None, soft, alpha, tau)
    only_p, _ = KDLoss(KDLossParams())({"t": plain}, {"t": z}, None, soft, alpha, tau)
    assert float(only_w) == float(only_p)


def _dataset(labels: list[str | None], groups: list[str], pool: list[bool]) -> Dataset:
    n = len(labels)
    return Dataset(inputs=torch.arange(n, dtype=torch.float32)[:, None], labels={"y": labels},
                   groups=groups, ids=[str(i) for i in range(n)], pool=np.asarray(pool), source="mem")


def test_weights_come_from_the_training_split_only():
    # 40 patients (1 in 4 "b") and 10 pool rows, all "b": weights over all rows differ from train's
    labels, groups, pool = [], [], []
    for p in range(40):
        labels.append("a" if p % 4 else "b")
        groups.append(f"p{p}")
        pool.append(False)
    for p in range(10):
        labels.append("b")
        groups.append(f"u{p}")
        pool.append(True)
    dataset = _dataset(labels, groups, pool)
    task = ClassificationTask("y", ClassificationParams(class_weights="balanced"))
    splits = prepare_splits(dataset, SplitParams(val=0.25, test=0.25, train_fraction=0.5, seed=3), {"y": task})
    train = [labels[i] for i in splits["train"].indices]
    na, nb = train.count("a"), train.count("b")
    assert na + nb == len(train) and nb > 0
    expected = [len(train) / (2 * na), len(train) / (2 * nb)]
    assert task.class_weights.tolist() == pytest.approx(expected)
    everything = [v for v in labels if v is not None]
    wrong = [len(everything) / (2 * everything.count("a")), len(everything) / (2 * everything.count("b"))]
    assert task.class_weights.tolist() != pytest.approx(wrong)


def _split(y: list[int], present: list[bool]) -> SplitData:
    n = len(y)
    return SplitData("train", np.arange(n), torch.arange(n, dtype=torch.float32)[:, None],
                     targets={"t": {"y": torch.tensor(y), "present": torch.tensor(present)}})


def _draws(split: SplitData, weights, epochs: int, seed: int = 0) -> torch.Tensor:
    rows = [b.index for e in range(epochs)
            for b in iterate_batches(split, 50, shuffle=True, seed=seed, epoch=e, row_weights=weights)]
    return torch.cat(rows)


def test_balanced_sampler_draws_classes_uniformly_and_keeps_the_epoch_length():
    y = [0] * 90 + [1] * 9 + [2] * 1  # 90:9:1
    split = _split(y, [True] * 100)
    weights = sampler_weights(split, SamplerParams(kind="balanced", task="t"))
    assert float(weights.sum()) == pytest.approx(1.0)
    epoch = _draws(split, weights, 1)
    assert len(epoch) == 100  # epoch length unchanged
    drawn = _draws(split, weights, 300)  # 30,000 draws
    freq = torch.bincount(torch.tensor(y)[drawn], minlength=3).double() / len(drawn)
    # each class 1/3; the binomial sd is sqrt(1/3 * 2/3 / 30000) ~ 0.0027, so 0.015 is > 5 sd
    assert freq.tolist() == pytest.approx([1 / 3] * 3, abs=0.015)
    # the plain shuffle keeps the 90:9:1 frequencies
    plain = _draws(split, None, 3)
    assert torch.bincount(torch.tensor(y)[plain], minlength=3).tolist() == [270, 27, 3]


def test_balanced_sampler_is_deterministic_given_the_seed():
    split = _split([0] * 30 + [1] * 10, [True] * 40)
    weights = sampler_weights(split, SamplerParams(kind="balanced", task="t"))
    assert torch.equal(_draws(split, weights, 2, seed=5), _draws(split, weights, 2, seed=5))
    assert not torch.equal(_draws(split, weights, 2, seed=5), _draws(split, weights, 2, seed=6))
    # a different epoch draws a different sample
    a, b = _draws(split, weights, 2, seed=5).split(40)
    assert not torch.equal(a, b)


def test_rows_without_a_label_keep_their_share():
    # 60 labeled (50 a, 10 b) and 40 unlabeled rows: the unlabeled keep 40% of the draws
    split = _split([0] * 50 + [1] * 10 + [0] * 40, [True] * 60 + [False] * 40)
    weights = sampler_weights(split, SamplerParams(kind="balanced", task="t"))
    assert float(weights[60:].sum()) == pytest.approx(0.4)
    assert float(weights[:50].sum()) == pytest.approx(0.3)
    assert float(weights[50:60].sum()) == pytest.approx(0.3)


def test_shuffle_sampler_and_unlabeled_split_give_no_weights():
    split = _split([0, 1], [True, True])
    assert sampler_weights(split, SamplerParams()) is None
    pool = SplitData("unlabeled", np.arange(2), torch.zeros(2, 1))
    assert sampler_weights(pool, SamplerParams(kind="balanced", task="t")) is None


def _problems(config: dict, registries) -> str:
    with pytest.raises(ConfigErrors) as err:
        validate_config(config, registries, file="run.yaml")
    return str(err.value)


def test_sampler_config_errors(core_registries):
    config = toy_config()
    config["training"]["sampler"] = {"kind": "balansed", "task": "cluster"}
    text = _problems(config, core_registries)
    assert text.startswith("run.yaml:") and "training.sampler.kind" in text and "Did you mean 'balanced'?" in text

    config["training"]["sampler"] = {"kind": "balanced", "task": "clustr"}
    text = _problems(config, core_registries)
    assert "training.sampler.task" in text and "unknown task 'clustr'" in text and "Did you mean 'cluster'?" in text

    config["training"]["sampler"] = {"kind": "balanced"}
    assert "needs 'task'" in _problems(config, core_registries)

    config["training"]["sampler"] = {"kind": "balanced", "task": "cluster"}
    config["stages"]["m1"]["training"] = {"sampler": {"kind": "balanced", "task": "nope"}}
    assert "stages.m1.training.sampler.task" in _problems(config, core_registries)
    del config["stages"]["m1"]["training"]
    cfg = validate_config(config, core_registries)
    assert cfg.stages["m1"].training.sampler.task == "cluster"


def test_class_weights_value_is_validated(core_registries):
    config = toy_config()
    config["tasks"]["cluster"]["class_weights"] = "inverse"
    assert "tasks.cluster.class_weights" in _problems(config, core_registries)


def test_class_weights_and_sampler_are_part_of_the_stage_keys(core_registries):
    from distillkit.runner import plan

    def keys(config: dict) -> dict[str, str]:
        return {p.name: p.key for p in plan(validate_config(config, core_registries), core_registries)}

    base = keys(toy_config())
    weighted = toy_config()
    weighted["tasks"]["cluster"]["class_weights"] = "balanced"
    changed = keys(weighted)
    assert changed["m1"] != base["m1"] and changed["m3"] != base["m3"]
    sampled = toy_config()
    sampled["training"]["sampler"] = {"kind": "balanced", "task": "quadrant"}
    assert keys(sampled)["m1"] != base["m1"]
    explicit = toy_config()
    explicit["tasks"]["cluster"]["class_weights"] = "none"
    explicit["training"]["sampler"] = {"kind": "shuffle"}
    assert keys(explicit) == base  # the defaults are the old behaviour, spelled out


def test_a_run_with_class_weights_and_a_balanced_sampler_trains(tmp_path):
    from tests.tiny_runs import make_run, tiny_toy_config

    config = tiny_toy_config()
    config["tasks"]["cluster"]["class_weights"] = "balanced"
    config["training"]["sampler"] = {"kind": "balanced", "task": "quadrant"}
    run = make_run(config, tmp_path)  # a smoke test: the values are checked by the tests above
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics  # every stage finished, including M3 on the unlabeled pool (no labels to balance)
