"""The eye plugin's dataset sources: synthetic (cached) and manifest (decoded once)."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from distillkit.data import DataContext, Dataset, SplitParams, split_indices
from distillkit.errors import DistillkitError
from eye_fundus import datasets
from eye_fundus.datasets import ManifestSource, SyntheticFundusSource

FUNDUS_MIX = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "fundus-mix"


def fake_generator(calls: list):
    """A tiny stand-in for ``generate_fundus``: 2 labeled patients (3 images), 2 pool images."""

    def generate(num_patients, num_unlabeled, image_size, num_fine_classes, seed, workers):
        calls.append(seed)
        n = 5
        images = np.zeros((n, image_size, image_size, 3), dtype=np.uint8)
        images[..., 0], images[..., 1] = np.arange(n)[:, None, None], 100 + seed  # R = index, G = seed
        images[..., 2] = 200
        return SimpleNamespace(
            images=images,
            patient_id=["p00000", "p00000", "p00001", "u00000", "u00001"],
            eye=["left", "right", "left", "left", "right"],
            broad_label=["DR", "DR", "normal", None, None],
            fine_label=["DR | mild | left", "DR | mild | right", "normal | healthy fundus | left", None, None],
            diagnosis_text=["mild diabetic retinopathy", "mild diabetic retinopathy", "normal fundus", None, None],
            labeled=np.array([True, True, True, False, False]),
        )

    return generate


def context(tmp_path: Path) -> DataContext:
    return DataContext(cache_dir=tmp_path / "cache", base_dir=tmp_path, where="data")


def synthetic(tmp_path, **params) -> SyntheticFundusSource:
    params = {"image_size": 16, **params}
    return SyntheticFundusSource(SyntheticFundusSource.Params(**params), context(tmp_path))


def test_synthetic_dataset_layout_and_cache(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(datasets, "_generate_fundus", fake_generator(calls))
    data = synthetic(tmp_path).load()
    assert isinstance(data, Dataset) and data.source == "synthetic_fundus"
    assert data.inputs.shape == (5, 3, 16, 16) and data.inputs.dtype == torch.uint8
    # channels first: channel 0 holds the image index, channel 1 the seed marker, channel 2 = 200
    assert data.inputs[3, 0].unique().tolist() == [3] and (data.inputs[:, 1] == 100).all()
    assert (data.inputs[:, 2] == 200).all()
    assert data.labels["broad_label"] == ["DR", "DR", "normal", None, None]
    assert data.labels["diagnosis_text"][2] == "normal fundus"
    assert data.groups == ["p00000", "p00000", "p00001", "u00000", "u00001"]
    assert data.ids == ["synthetic/p00000/0", "synthetic/p00000/1", "synthetic/p00001/0",
                        "synthetic/u00000/0", "synthetic/u00001/0"]
    assert data.pool.tolist() == [False, False, False, True, True]
    assert calls == [0]

    again = synthetic(tmp_path).load()  # a new source object, same params: read from the cache
    assert calls == [0]
    assert torch.equal(again.inputs, data.inputs) and again.labels == data.labels and again.ids == data.ids

    other = synthetic(tmp_path, seed=3).load()  # other params: another cache entry
    assert calls == [0, 3] and (other.inputs[:, 1] == 103).all()


def test_synthetic_cache_half_written_is_regenerated(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(datasets, "_generate_fundus", fake_generator(calls))
    synthetic(tmp_path).load()
    (npy,) = (tmp_path / "cache" / "synthetic_fundus").glob("*.npy")
    npy.write_bytes(npy.read_bytes()[:100])
    data = synthetic(tmp_path).load()
    assert calls == [0, 0] and data.inputs.shape == (5, 3, 16, 16)


def test_synthetic_params_are_strict(tmp_path):
    with pytest.raises(ValidationError):
        SyntheticFundusSource.Params(num_patient=10)  # typo: unknown key
    with pytest.raises(ValidationError):
        SyntheticFundusSource.Params(image_size=4)
    assert SyntheticFundusSource.Params().kind == "synthetic_fundus"


def test_synthetic_with_the_real_generator(tmp_path):
    pytest.importorskip("eye_fundus.synthetic")
    source = synthetic(tmp_path, num_patients=3, num_unlabeled=2, image_size=32, seed=1)
    data = source.load()
    n = len(data)
    assert data.inputs.shape == (n, 3, 32, 32) and int(data.pool.sum()) == 2
    assert all(data.labels["broad_label"][i] is not None for i in np.flatnonzero(~data.pool))
    assert all(data.labels["fine_label"][i] is None for i in np.flatnonzero(data.pool))
    assert data.ids[0].startswith("synthetic/p00000/")
    assert torch.equal(synthetic(tmp_path, num_patients=3, num_unlabeled=2, image_size=32, seed=1).load().inputs,
                       data.inputs)


# -- manifest ---------------------------------------------------------------------------------


def make_manifest(folder: Path, rows: list[tuple], name="manifest.csv") -> Path:
    """Write images (solid colours) and a manifest; a row is (image, patient, broad, fine, text, split, colour)."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    path = folder / name
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "patient_id", "broad_label", "fine_label", "diagnosis_text", "suggested_split"])
        for image, patient, broad, fine, text, split, colour in rows:
            if colour is not None:
                Image.new("RGB", (40, 30), colour).save(folder / image)
            writer.writerow([image, patient, broad, fine, text, split])
    return path


ROWS = [
    ("img/a_left.png", "pa", "DR", "DR grade 2", "moderate retinopathy", "train", (10, 0, 0)),
    ("img/a_right.png", "pa", "normal", "normal fundus", "", "train", (20, 0, 0)),
    ("img/b.png", "pb", "glaucoma", "", "", "val", (30, 0, 0)),
    ("img/c.png", "", "cataract", "cataract", "cataract", "train", (40, 0, 0)),
    ("img/pool.png", "", "", "", "", "unlabeled", (50, 0, 0)),
]


def manifest_source(tmp_path, **params) -> ManifestSource:
    params = {"path": "data/manifest.csv", "image_size": 16, **params}
    return ManifestSource(ManifestSource.Params(**params), context(tmp_path))


def test_manifest_source_loads_images_and_labels(tmp_path):
    make_manifest(tmp_path / "data", ROWS)
    source = manifest_source(tmp_path, split_column="suggested_split")
    data = source.load()
    assert data.inputs.shape == (5, 3, 16, 16) and data.inputs.dtype == torch.uint8
    assert [int(data.inputs[i, 0, 8, 8]) for i in range(5)] == [10, 20, 30, 40, 50]
    assert (data.inputs[:, :, 0] == 0).all()  # 40x30 -> 16x12 centred: black bars top and bottom
    assert data.labels == {
        "broad_label": ["DR", "normal", "glaucoma", "cataract", None],
        "fine_label": ["DR grade 2", "normal fundus", None, "cataract", None],
        "diagnosis_text": ["moderate retinopathy", None, None, "cataract", None],
    }
    assert data.ids == [r[0] for r in ROWS]
    assert data.groups[:3] == ["pa", "pa", "pb"] and data.groups[3] == "image:img/c.png"
    assert data.pool.tolist() == [False, False, False, False, True]
    assert data.source.endswith("manifest.csv")


def test_manifest_patients_stay_in_one_split(tmp_path):
    rows = []
    for p in range(12):
        for eye in ("left", "right"):
            rows.append((f"img/p{p}_{eye}.png", f"p{p}", "DR" if p % 2 else "normal", "", "", "", (p, p, p)))
    make_manifest(tmp_path / "data", rows)
    data = manifest_source(tmp_path).load()
    split = split_indices(data, SplitParams(val=0.25, test=0.25, train_fraction=0.5, seed=0))
    where = {}
    for name, idx in split.items():
        for i in idx:
            assert where.setdefault(data.groups[i], name) == name, "a patient was cut across splits"
    assert sum(len(v) for v in split.values()) == 24


def test_manifest_bad_image_error_and_skip(tmp_path):
    rows = list(ROWS) + [("img/missing.png", "pz", "DR", "x", "y", "train", None)]
    make_manifest(tmp_path / "data", rows)
    with pytest.raises(DistillkitError) as info:
        manifest_source(tmp_path).load()
    assert info.value.where.endswith("manifest.csv:line 7") and "missing.png" in info.value.message

    source = manifest_source(tmp_path, on_bad_image="skip")
    data = source.load()
    assert len(data) == 5 and "img/missing.png" not in data.ids
    assert data.labels["broad_label"][-1] is None and data.groups[-1] == "image:img/pool.png"
    assert any("skipped 1 of 6" in w for w in source.warnings)


def test_manifest_fingerprint_follows_content(tmp_path):
    path = make_manifest(tmp_path / "data", ROWS)
    first = manifest_source(tmp_path).fingerprint()
    assert manifest_source(tmp_path).fingerprint() == first
    path.write_text(path.read_text().replace("DR grade 2", "DR grade 3"))
    assert manifest_source(tmp_path).fingerprint() != first
    assert manifest_source(tmp_path, image_size=32).fingerprint() != manifest_source(tmp_path).fingerprint()


def test_manifest_missing_file_and_bad_params(tmp_path):
    with pytest.raises(DistillkitError) as info:
        manifest_source(tmp_path, path="nowhere.csv").load()
    assert info.value.where == "data.path"
    with pytest.raises(ValidationError, match="include_splits needs split_column"):
        ManifestSource.Params(path="m.csv", include_splits=["train"])
    with pytest.raises(ValidationError):
        ManifestSource.Params(path="m.csv", on_bad_image="ignore")
    with pytest.raises(ValidationError):
        ManifestSource.Params(path="m.csv", image_colum="file")


def test_manifest_custom_fields(tmp_path):
    make_manifest(tmp_path / "data", ROWS)
    data = manifest_source(tmp_path, fields={"disease": "broad_label"}).load()
    assert list(data.labels) == ["disease"] and data.labels["disease"][0] == "DR"


@pytest.mark.integration
@pytest.mark.skipif(not (FUNDUS_MIX / "manifest.csv").exists(), reason="fundus-mix is not available")
def test_fundus_mix_manifest(tmp_path):
    source = ManifestSource(
        ManifestSource.Params(path=str(FUNDUS_MIX / "manifest.csv"), image_size=64, split_column="suggested_split"),
        context(tmp_path))
    data = source.load()
    assert len(data) == 3421 and int(data.pool.sum()) == 951
    labeled = ~data.pool
    assert sorted({data.labels["broad_label"][i] for i in np.flatnonzero(labeled)}) == \
        ["DR", "cataract", "glaucoma", "normal"]
    assert data.inputs.shape == (3421, 3, 64, 64)


def test_manifest_fingerprint_follows_image_bytes_and_caches_digests(tmp_path, monkeypatch):
    import os
    import time

    from distillkit import io

    make_manifest(tmp_path / "data", ROWS)
    # a data set written a while ago (a file modified in the last seconds is hashed every time)
    settled = time.time_ns() - 3600 * 10**9
    for path in (tmp_path / "data").rglob("*.png"):
        os.utime(path, ns=(settled, settled))
    first = manifest_source(tmp_path).fingerprint()
    image = tmp_path / "data" / ROWS[0][0]
    original = image.read_bytes()
    # touching the file alone (same bytes, new mtime) re-hashes it but keeps the fingerprint
    os.utime(image, ns=(settled, settled + 5_000_000_000))
    reads: list[str] = []
    real = io._file_digest

    def counting(path):
        reads.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(io, "_file_digest", counting)
    assert manifest_source(tmp_path).fingerprint() == first
    assert reads == [image.name]  # the touched image, read once
    reads.clear()
    assert manifest_source(tmp_path).fingerprint() == first
    assert reads == []  # no image re-hashed: the cache answers by (path, size, mtime_ns)
    monkeypatch.undo()
    # replaced in place: same path, same size, other bytes (a write moves the mtime)
    changed = bytearray(original)
    changed[-20] ^= 0xFF
    image.write_bytes(bytes(changed))
    os.utime(image, ns=(settled, settled + 9_000_000_000))
    assert manifest_source(tmp_path).fingerprint() != first
    image.write_bytes(original)  # the old bytes back: the old fingerprint
    assert manifest_source(tmp_path).fingerprint() == first
    # replaced in place with another size or mtime: the cache entry is stale and re-hashed
    image.write_bytes(original + b"\0")
    assert manifest_source(tmp_path).fingerprint() != first
