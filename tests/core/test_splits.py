"""Patient-level splits: disjoint, nested across p, deterministic, and fitted on training labels only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distillkit.builtin.classification import ClassificationParams, ClassificationTask
from distillkit.builtin.toy import ToyBlobs, ToyBlobsParams
from distillkit.data import DataContext, Dataset, SplitParams, prepare_splits, split_indices
from distillkit.errors import DistillkitError

MAX_GROUP = 4


def _patients(num_patients=60, num_pool=10, labels=None) -> Dataset:
    """Patient i has 1 + i % 4 images; ``num_pool`` extra images are unlabeled by nature."""
    groups = []
    for i in range(num_patients):
        groups += [f"patient{i:03d}"] * (1 + i % MAX_GROUP)
    pool = [False] * len(groups) + [True] * num_pool
    groups += [f"pool{i}" for i in range(num_pool)]
    n = len(groups)
    if labels is None:
        labels = {"dx": [None if pool[i] else f"d{i % 3}" for i in range(n)]}
    return Dataset(inputs=torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 2), labels=labels, groups=groups,
                   ids=[f"img{i}" for i in range(n)], pool=np.array(pool), source="patients.csv")


@pytest.fixture
def patients() -> Dataset:
    return _patients()


@pytest.fixture
def toy(tmp_path) -> Dataset:
    context = DataContext(cache_dir=tmp_path, base_dir=tmp_path)
    return ToyBlobs(ToyBlobsParams(num_labeled=300, num_unlabeled=40), context).load()


def _groups(dataset: Dataset, rows) -> set[str]:
    return {dataset.groups[i] for i in rows}


def _task(name="dx", **kw) -> ClassificationTask:
    return ClassificationTask(name, ClassificationParams(hidden=0, **kw))


@pytest.mark.parametrize("which", ["patients", "toy"])
def test_splits_are_disjoint_by_patient_and_cover_everything(which, request):
    dataset = request.getfixturevalue(which)
    idx = split_indices(dataset, SplitParams(train_fraction=0.3, seed=3))
    names = ("train", "val", "test", "unlabeled")
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not set(idx[a]) & set(idx[b]), (a, b)
            assert not _groups(dataset, idx[a]) & _groups(dataset, idx[b]), (a, b)
    assert sorted(np.concatenate([idx[s] for s in names]).tolist()) == list(range(len(dataset)))
    # every pool item is unlabeled; no pool item is in a labeled split
    pool = set(np.flatnonzero(dataset.pool).tolist())
    assert pool <= set(idx["unlabeled"].tolist())
    for s in ("train", "val", "test"):
        assert not pool & set(idx[s].tolist())
        assert list(idx[s]) == sorted(idx[s]) and idx[s].dtype == np.int64


@pytest.mark.parametrize("which", ["patients", "toy"])
def test_training_sets_are_nested_and_val_test_do_not_depend_on_p(which, request):
    dataset = request.getfixturevalue(which)
    by_p = {p: split_indices(dataset, SplitParams(train_fraction=p, seed=11)) for p in (0.15, 0.30, 0.45, 0.70)}
    assert set(by_p[0.15]["train"]) < set(by_p[0.30]["train"]) < set(by_p[0.45]["train"]) < set(by_p[0.70]["train"])
    for p in (0.30, 0.45, 0.70):
        assert np.array_equal(by_p[p]["val"], by_p[0.15]["val"])
        assert np.array_equal(by_p[p]["test"], by_p[0.15]["test"])


def test_splits_are_deterministic_by_seed(patients):
    a = split_indices(patients, SplitParams(seed=5, train_fraction=0.45))
    b = split_indices(patients, SplitParams(seed=5, train_fraction=0.45))
    c = split_indices(patients, SplitParams(seed=6, train_fraction=0.45))
    for s in a:
        assert np.array_equal(a[s], b[s])
    assert not np.array_equal(a["test"], c["test"])
    assert not np.array_equal(a["train"], c["train"])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("p", [0.15, 0.30, 0.45, 0.60])
def test_fractions_are_within_one_patient_of_the_request(patients, p, seed):
    idx = split_indices(patients, SplitParams(val=0.15, test=0.15, train_fraction=p, seed=seed))
    n = int((~patients.pool).sum())
    assert n == 150
    for split, fraction in (("test", 0.15), ("val", 0.15), ("train", p)):
        # a split takes whole patients until it reaches its share: it overshoots by less than one patient
        assert fraction * n <= len(idx[split]) < fraction * n + MAX_GROUP, (split, len(idx[split]))


def test_largest_training_fraction_takes_all_remaining_patients(patients):
    idx = split_indices(patients, SplitParams(val=0.15, test=0.15, train_fraction=0.70, seed=0))
    n = int((~patients.pool).sum())
    # val and test may each overshoot by less than a patient, which p = 0.70 gives up
    assert 0.70 * n - 2 * MAX_GROUP < len(idx["train"]) <= 0.70 * n
    assert len(idx["train"]) + len(idx["val"]) + len(idx["test"]) == n
    assert len(idx["unlabeled"]) == int(patients.pool.sum())


def test_unused_labeled_rows_join_the_unlabeled_pool_only_when_asked(patients):
    used = split_indices(patients, SplitParams(train_fraction=0.30, seed=4, unused_to_unlabeled=True))
    kept = split_indices(patients, SplitParams(train_fraction=0.30, seed=4, unused_to_unlabeled=False))
    pool = set(np.flatnonzero(patients.pool).tolist())
    labeled = set(np.flatnonzero(~patients.pool).tolist())
    leftover = labeled - set(used["train"]) - set(used["val"]) - set(used["test"])
    assert len(leftover) > 30
    assert set(used["unlabeled"].tolist()) == pool | leftover
    assert set(kept["unlabeled"].tolist()) == pool
    for s in ("train", "val", "test"):
        assert np.array_equal(used[s], kept[s])


def test_items_without_a_group_are_their_own_patient():
    dataset = _patients(num_patients=40, num_pool=0)
    dataset.groups = [""] * len(dataset)  # no patient ids at all
    idx = split_indices(dataset, SplitParams(train_fraction=0.5, seed=0))
    n = len(dataset)
    for split, fraction in (("test", 0.15), ("val", 0.15), ("train", 0.5)):
        assert len(idx[split]) == int(np.ceil(fraction * n - 1e-9))


def test_class_list_comes_from_the_training_split_only():
    base = _patients()
    idx = split_indices(base, SplitParams(train_fraction=0.30, seed=2))
    # 'rare' occurs only in one validation patient; 'held' only in test
    labels = list(base.labels["dx"])
    val_row, test_row = int(idx["val"][0]), int(idx["test"][-1])
    labels[val_row], labels[test_row] = "rare", "held"
    dataset = _patients(labels={"dx": labels})
    task = _task(unknown_labels="skip")
    splits = prepare_splits(dataset, SplitParams(train_fraction=0.30, seed=2), {"dx": task})
    assert task.classes == ["d0", "d1", "d2"]
    val = splits["val"]
    pos = int(np.flatnonzero(val.indices == val_row)[0])
    assert not bool(val.targets["dx"]["present"][pos])
    assert int(val.targets["dx"]["present"].sum()) == len(val) - 1
    # every other row is encoded against the training class list
    expected = [task.classes.index(labels[i]) for i in val.indices if i != val_row]
    got = val.targets["dx"]["y"][val.targets["dx"]["present"]].tolist()
    assert got == expected
    assert val.raw_labels["dx"][pos] == "rare"
    test = splits["test"]
    assert not bool(test.targets["dx"]["present"][int(np.flatnonzero(test.indices == test_row)[0])])

    strict = _task(unknown_labels="error")
    with pytest.raises(DistillkitError, match="'rare'") as info:
        prepare_splits(dataset, SplitParams(train_fraction=0.30, seed=2), {"dx": strict})
    assert "val split" in info.value.where


def test_a_label_seen_only_outside_training_at_any_p_is_not_a_class(toy):
    task = _task("cluster")
    splits = prepare_splits(toy, SplitParams(train_fraction=0.15, seed=0), {"cluster": task})
    train_labels = {toy.labels["cluster"][i] for i in splits["train"].indices}
    assert task.classes == sorted(train_labels)
    y = splits["train"].targets["cluster"]["y"]
    assert [task.classes[j] for j in y.tolist()] == [toy.labels["cluster"][i] for i in splits["train"].indices]


def test_missing_labels_are_not_present(toy):
    task = _task("quadrant")
    splits = prepare_splits(toy, SplitParams(seed=1), {"quadrant": task})
    for name in ("train", "val", "test"):
        split = splits[name]
        present = split.targets["quadrant"]["present"].tolist()
        assert present == [toy.labels["quadrant"][i] is not None for i in split.indices]
        assert 0 < present.count(False) < len(present)


def test_unlabeled_split_carries_no_targets(toy):
    tasks = {"cluster": _task("cluster"), "quadrant": _task("quadrant")}
    splits = prepare_splits(toy, SplitParams(train_fraction=0.3, seed=0), tasks)
    unlabeled = splits["unlabeled"]
    assert unlabeled.targets is None
    assert unlabeled.raw_labels == {}
    assert torch.equal(unlabeled.inputs, toy.inputs[torch.from_numpy(unlabeled.indices)])
    for name in ("train", "val", "test"):
        assert set(splits[name].targets) == {"cluster", "quadrant"}
        assert torch.equal(splits[name].inputs, toy.inputs[torch.from_numpy(splits[name].indices)])


def test_an_empty_split_is_a_user_error():
    # 3 labeled items of one patient: test takes the patient, val and train stay empty
    dataset = Dataset(inputs=torch.zeros(3, 2), labels={"dx": ["a", "b", "a"]}, groups=["p1"] * 3,
                      ids=["0", "1", "2"], pool=np.zeros(3, bool), source="tiny.csv")
    with pytest.raises(DistillkitError, match=r"the (train|val) split is empty \(3 labeled items in 1 ") as info:
        split_indices(dataset, SplitParams())
    assert info.value.where == "tiny.csv"
    # two patients: test and val get one each, nothing is left for training
    two = Dataset(inputs=torch.zeros(4, 2), labels={"dx": ["a"] * 4}, groups=["p1", "p1", "p2", "p2"],
                  ids=list("abcd"), pool=np.zeros(4, bool), source="two.csv")
    with pytest.raises(DistillkitError, match="the train split is empty"):
        split_indices(two, SplitParams())
    with pytest.raises(DistillkitError):
        prepare_splits(dataset, SplitParams(), {"dx": _task()})


def test_a_dataset_without_labeled_items_is_a_user_error():
    dataset = Dataset(inputs=torch.zeros(4, 2), labels={"dx": [None] * 4}, groups=["p"] * 4,
                      ids=list("abcd"), pool=np.ones(4, bool), source="pool.csv")
    with pytest.raises(DistillkitError, match="no labeled items"):
        split_indices(dataset, SplitParams())


def test_a_task_reading_an_unknown_field_is_a_user_error(patients):
    with pytest.raises(DistillkitError, match="'diagnosis'") as info:
        prepare_splits(patients, SplitParams(), {"dx": _task(field="diagnosis")})
    assert info.value.where == "tasks.dx.field"


def test_a_task_without_training_labels_is_a_user_error(patients):
    labels = {"dx": patients.labels["dx"], "empty": [None] * len(patients)}
    dataset = _patients(labels=labels)
    with pytest.raises(DistillkitError, match="no training item has a label for task 'empty'"):
        prepare_splits(dataset, SplitParams(), {"dx": _task(), "empty": _task("empty")})


def test_fractions_that_exceed_one_are_rejected():
    with pytest.raises(ValueError, match="exceeds 1"):
        SplitParams(val=0.2, test=0.2, train_fraction=0.7)


def test_pool_images_of_held_out_patients_stay_out_of_the_unlabeled_split():
    """A patient's unlabeled images follow the patient: into the pool if it trains, nowhere if it is held out."""
    base = _patients(num_patients=40, num_pool=0)
    n = len(base)
    # every patient also has one image that is unlabeled by nature
    patients = sorted(set(base.groups))
    groups = base.groups + patients
    pool = np.concatenate([base.pool, np.ones(len(patients), bool)])
    dataset = Dataset(inputs=torch.zeros(len(groups), 2), labels={"dx": base.labels["dx"] + [None] * len(patients)},
                      groups=groups, ids=[f"img{i}" for i in range(len(groups))], pool=pool, source="patients.csv")
    for unused in (True, False):
        idx = split_indices(dataset, SplitParams(train_fraction=0.3, seed=1, unused_to_unlabeled=unused))
        held_out = _groups(dataset, idx["val"]) | _groups(dataset, idx["test"])
        pool_rows = {n + j for j in range(len(patients))}
        expected_pool = {i for i in pool_rows if groups[i] not in held_out}
        assert set(idx["unlabeled"].tolist()) & pool_rows == expected_pool
        assert not _groups(dataset, idx["unlabeled"]) & held_out
        # the training patients' pool images are there (distilling on them leaks nothing)
        assert {groups[i] for i in expected_pool} >= _groups(dataset, idx["train"])
