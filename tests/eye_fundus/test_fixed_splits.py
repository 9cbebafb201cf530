"""Fixed splits from a manifest column: fixed rows stay put, the rest is split by patient, conflicts are errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from distillkit.data import Dataset, SplitParams, split_indices
from distillkit.errors import DistillkitError
from eye_fundus.manifest import ManifestColumns, read_manifest

HEADER = "image,patient_id,broad_label,split\n"
FIXED = ManifestColumns(fields={"broad_label": "broad_label"}, split="split", fixed_splits=True)


def _manifest(tmp_path: Path, rows: list[str]) -> Path:
    path = tmp_path / "m.csv"
    path.write_text(HEADER + "".join(r + "\n" for r in rows))
    return path


def _dataset(rows) -> Dataset:
    n = len(rows)
    return Dataset(inputs=torch.zeros(n, 1), labels=rows.labels, groups=rows.groups, ids=rows.names, pool=rows.pool,
                   source=str(rows.path), fixed=rows.fixed, fixed_source=f"{rows.path}: column 'split'")


def _mixed_manifest(tmp_path: Path) -> Path:
    rows = []
    for p in range(60):  # 60 free patients, two images each
        rows += [f"f{p}_a.jpg,free{p},{'ab'[p % 2]},", f"f{p}_b.jpg,free{p},{'ab'[p % 2]},"]
    rows += [f"t{p}.jpg,tst{p},a,test" for p in range(5)]       # fixed to test
    rows += ["t0_extra.jpg,tst0,b,"]                              # unfixed row of a test patient: follows it
    rows += [f"v{p}.jpg,val{p},b,VAL" for p in range(3)]         # fixed to val (case-insensitive)
    rows += [f"r{p}.jpg,trn{p},a,train" for p in range(4)]       # fixed to train
    rows += ["r0_pool.jpg,trn0,,unlabeled", "u.jpg,,a,unlabeled"]  # pool rows beside train / on their own
    return _manifest(tmp_path, rows)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_fixed_rows_land_where_fixed_and_the_rest_is_split_by_patient(tmp_path, seed):
    rows = read_manifest(_mixed_manifest(tmp_path), FIXED)
    dataset = _dataset(rows)
    idx = split_indices(dataset, SplitParams(val=0.2, test=0.2, train_fraction=0.6, seed=seed))
    where = {rows.names[i]: s for s, ix in idx.items() for i in ix}
    assert all(where[f"t{p}.jpg"] == "test" for p in range(5)) and where["t0_extra.jpg"] == "test"
    assert all(where[f"v{p}.jpg"] == "val" for p in range(3))
    assert all(where[f"r{p}.jpg"] == "train" for p in range(4))
    assert where["r0_pool.jpg"] == "unlabeled" and where["u.jpg"] == "unlabeled"
    assert dataset.labels["broad_label"][rows.names.index("u.jpg")] is None  # pool rows carry no label
    # the free patients: whole patients per split, fractions of the 120 free rows (24 each, patient-rounded)
    free = {s: {rows.groups[i] for i in ix if rows.groups[i].startswith("free")} for s, ix in idx.items()}
    assert not (free["train"] & free["val"]) and not (free["train"] & free["test"]) and not (free["val"] & free["test"])
    assert len(free["train"]) + len(free["val"]) + len(free["test"]) == 60
    assert 2 * len(free["test"]) in (24, 26) and 2 * len(free["val"]) in (24, 26)


def test_without_fixed_splits_the_column_only_pools(tmp_path):
    rows = read_manifest(_mixed_manifest(tmp_path), ManifestColumns(fields={"broad_label": "broad_label"}, split="split"))
    assert rows.fixed is None
    idx = split_indices(_dataset(rows), SplitParams(val=0.2, test=0.2, train_fraction=0.6, seed=0))
    where = {rows.names[i]: s for s, ix in idx.items() for i in ix}
    assert {where[f"t{p}.jpg"] for p in range(5)} != {"test"}  # re-split as before


def _error(tmp_path: Path, rows: list[str]) -> str:
    with pytest.raises(DistillkitError) as err:
        read_manifest(_manifest(tmp_path, rows), FIXED)
    return str(err.value)


def test_an_unknown_value_names_the_line_value_file_and_column(tmp_path):
    text = _error(tmp_path, ["a.jpg,p1,a,train", "b.jpg,p2,a,tset"])
    assert text.startswith(f"{tmp_path / 'm.csv'}:line 3:")
    assert "'tset'" in text and "column 'split'" in text and "Did you mean 'test'?" in text


def test_a_patient_in_two_fixed_splits_is_named(tmp_path):
    rows = [f"x{p}_1.jpg,x{p},a,train" for p in range(7)] + [f"x{p}_2.jpg,x{p},a,test" for p in range(7)]
    text = _error(tmp_path, rows + ["ok.jpg,fine,a,val"])
    assert text.startswith(f"{tmp_path / 'm.csv'}: column 'split':")
    assert "7 patients are fixed to more than one split" in text
    assert "'x0' (test and train)" in text and "'x4'" in text and "'x5'" not in text and "and 2 more" in text
    assert "'fine'" not in text


@pytest.mark.parametrize("rows, reason", [
    (["a.jpg,p1,a,unlabeled", "b.jpg,p1,a,test"], "unlabeled and test"),
    (["a.jpg,p1,a,unlabeled", "b.jpg,p1,a,"], "unlabeled and (by patient grouping) a random split"),
])
def test_a_pool_row_beside_a_held_out_or_random_row_is_a_conflict(tmp_path, rows, reason):
    text = _error(tmp_path, rows)
    assert f"'p1' ({reason})" in text and "1 patient is" in text


def test_pool_beside_train_is_fine(tmp_path):
    rows = read_manifest(_manifest(tmp_path, ["a.jpg,p1,a,unlabeled", "b.jpg,p1,a,train"]), FIXED)
    assert rows.fixed == ["unlabeled", "train"]


def test_fixed_splits_needs_a_split_column(tmp_path):
    with pytest.raises(DistillkitError, match="fixed_splits needs a split column"):
        read_manifest(_manifest(tmp_path, ["a.jpg,p1,a,train"]),
                      ManifestColumns(fields={"broad_label": "broad_label"}, fixed_splits=True))


def test_the_core_splitter_checks_conflicts_too():
    dataset = Dataset(inputs=torch.zeros(2, 1), labels={"y": ["a", "b"]}, groups=["p", "p"], ids=["0", "1"],
                      pool=np.zeros(2, bool), source="mem", fixed=["val", "test"], fixed_source="mem: column 's'")
    with pytest.raises(DistillkitError, match=r"^mem: column 's': 1 patient is fixed to more than one split: 'p'"):
        split_indices(dataset, SplitParams())


def test_a_balanced_sampler_on_a_caption_task_is_a_config_error():
    """(Class imbalance) a balanced sampler needs a classification task; the caption task is not one."""
    from distillkit.config import ConfigErrors, validate_config
    from distillkit.plugins import PluginManager
    from tests.tiny_runs import tiny_eye_config

    config = tiny_eye_config()
    config["training"]["sampler"] = {"kind": "balanced", "task": "text"}
    with pytest.raises(ConfigErrors) as err:
        validate_config(config, PluginManager().registries, file="eye.yaml")
    text = str(err.value)
    assert text.startswith("eye.yaml:") and "training.sampler.task" in text and "'text' is a caption task" in text
    config["training"]["sampler"] = {"kind": "balanced", "task": "broad"}
    assert validate_config(config, PluginManager().registries).training.sampler.task == "broad"
