"""Tests of the procedural fundus generator (the eye_fundus plugin's embedded data set)."""

import collections
import re

import numpy as np
import pytest

try:
    import eye_fundus  # noqa: F401  (installed from plugins/eye_fundus by the packaging)
except ImportError:  # running from a source checkout that is not installed
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "plugins"))

from eye_fundus.synthetic import (
    BROAD_CLASSES,
    SyntheticFundus,
    fine_label_catalogue,
    generate_fundus,
    write_example_grid,
)

SIZE = 64


@pytest.fixture(scope="module")
def data() -> SyntheticFundus:
    return generate_fundus(num_patients=100, num_unlabeled=12, image_size=SIZE, seed=5, workers=1)


def _labeled(data):
    return [i for i in range(len(data.images)) if data.labeled[i]]


def test_shapes_and_types(data):
    n = len(data.images)
    assert data.images.dtype == np.uint8 and data.images.shape == (n, SIZE, SIZE, 3)
    assert len(data.patient_id) == len(data.eye) == len(data.broad_label) == n
    assert len(data.fine_label) == len(data.diagnosis_text) == n
    assert data.labeled.dtype == bool and data.labeled.shape == (n,)
    assert 100 <= data.labeled.sum() <= 400  # 1-4 images per patient
    assert all(re.fullmatch(r"p\d{5}", p) for p, lab in zip(data.patient_id, data.labeled) if lab)


def test_deterministic_across_calls_and_workers():
    kwargs = dict(num_patients=30, num_unlabeled=6, image_size=32, seed=11)
    a = generate_fundus(workers=1, **kwargs)
    b = generate_fundus(workers=2, **kwargs)  # >= 64 images: goes through the process pool
    c = generate_fundus(workers=1, **kwargs)
    assert len(a.images) >= 64
    for other in (b, c):
        assert np.array_equal(a.images, other.images)
        assert a.patient_id == other.patient_id and a.eye == other.eye
        assert a.fine_label == other.fine_label and a.diagnosis_text == other.diagnosis_text
    d = generate_fundus(workers=1, **{**kwargs, "seed": 12})
    assert not np.array_equal(a.images[:10], d.images[:10])


def test_growing_the_dataset_keeps_earlier_images():
    small = generate_fundus(num_patients=6, num_unlabeled=5, image_size=32, seed=2, workers=1)
    large = generate_fundus(num_patients=9, num_unlabeled=5, image_size=32, seed=2, workers=1)
    n_small = int(small.labeled.sum())
    assert np.array_equal(small.images[:n_small], large.images[:n_small])
    assert small.fine_label[:n_small] == large.fine_label[:n_small]
    assert small.diagnosis_text[:n_small] == large.diagnosis_text[:n_small]
    # The unlabelled pool does not depend on the number of labelled patients.
    assert np.array_equal(small.images[n_small:], large.images[~large.labeled])


def test_black_outside_the_field_of_view(data):
    corners = data.images[:, [0, 0, -1, -1], [0, -1, 0, -1], :]
    assert corners.max() == 0
    assert data.images[:, :3, :3].max() == 0
    centre = data.images[:, SIZE // 2 - 4: SIZE // 2 + 4, SIZE // 2 - 4: SIZE // 2 + 4]
    assert centre.mean() > 40  # the retina itself is lit


def test_left_and_right_eyes_are_mirrored(data):
    """The optic disc (brightest region) lies on the image's right for right eyes."""
    lum = data.images.astype(float).mean(axis=-1).reshape(len(data.images), -1)
    k = SIZE * SIZE // 100
    brightest = np.argsort(lum, axis=1)[:, -k:]
    col = (brightest % SIZE).mean(axis=1)
    eye = np.array(data.eye)
    assert (col[eye == "right"] > SIZE / 2).mean() > 0.7
    assert (col[eye == "left"] < SIZE / 2).mean() > 0.7


def _box_sum(a, k):
    c = np.cumsum(np.cumsum(np.pad(a, ((k + 1, k), (k + 1, k))), 0), 1)
    return c[2 * k + 1:, 2 * k + 1:] - c[: -2 * k - 1, 2 * k + 1:] - c[2 * k + 1:, : -2 * k - 1] + c[: -2 * k - 1, : -2 * k - 1]


def _pale_cup_area(image):
    """Pixels of the whitish plateau (cup) around the optic disc, found as the brightest
    disc-sized blob; measured in the blue channel, where the cup outshines the rim."""
    size = image.shape[0]
    lum = image.astype(float).mean(axis=-1)
    r, c = np.unravel_index(np.argmax(_box_sum(lum, max(round(0.06 * size), 1))), lum.shape)
    w = round(0.1 * size)
    blue = image[max(r - w, 0): r + w + 1, max(c - w, 0): c + w + 1, 2].astype(float)
    return (blue > blue.max() - 0.2 * (blue.max() - blue.min())).sum()


def test_glaucoma_has_a_larger_cup(data):
    broad = np.array(data.broad_label, dtype=object)
    area = np.array([_pale_cup_area(im) for im in data.images])
    glaucoma, normal = area[broad == "glaucoma"], area[broad == "normal"]
    assert len(glaucoma) >= 15 and len(normal) >= 15
    assert glaucoma.mean() > 1.3 * normal.mean()


def test_diagnosis_text(data):
    captions = [data.diagnosis_text[i] for i in _labeled(data)]
    for text in captions:
        assert re.fullmatch(r"[a-z0-9]+( [a-z0-9]+)*", text), text
        assert 4 <= len(text.split()) <= 14, text
    vocabulary = {w for text in captions for w in text.split()}
    assert len(vocabulary) >= 150
    # Tied to the label: the eye of the fine label is named.
    for i in _labeled(data):
        eye = data.eye[i]
        words = set(data.diagnosis_text[i].split())
        assert eye in words or ({"od", "dexter"} if eye == "right" else {"os", "sinister"}) & words


def test_fine_catalogue_has_a_long_tail():
    catalogue = fine_label_catalogue(60)
    names = [f.name for f in catalogue]
    assert len(set(names)) == len(names) >= 60
    assert {f.broad for f in catalogue} == set(BROAD_CLASSES)
    weights = np.array([f.weight for f in catalogue])
    assert weights.sum() == pytest.approx(1.0)
    assert weights.max() / weights.min() > 10
    for broad in BROAD_CLASSES:  # broad classes stay balanced
        assert sum(f.weight for f in catalogue if f.broad == broad) == pytest.approx(0.2)
    assert len(fine_label_catalogue(320)) >= 320
    assert "DR | proliferative | with macular edema | right" in names


def test_fine_labels_in_the_dataset(data):
    idx = _labeled(data)
    counts = collections.Counter(data.fine_label[i] for i in idx)
    assert len(counts) >= 30
    assert max(counts.values()) / min(counts.values()) >= 5
    for i in idx:
        parts = data.fine_label[i].split(" | ")
        assert parts[0] == data.broad_label[i] and parts[-1] == data.eye[i]
    broad_counts = collections.Counter(data.broad_label[i] for i in idx)
    assert set(broad_counts) == set(BROAD_CLASSES)
    assert min(broad_counts.values()) > 0.4 * max(broad_counts.values())


def test_images_of_a_patient_share_the_broad_label(data):
    by_patient = collections.defaultdict(set)
    for i in _labeled(data):
        by_patient[data.patient_id[i]].add(data.broad_label[i])
    assert len(by_patient) == 100
    assert all(len(labels) == 1 for labels in by_patient.values())
    per_patient = collections.Counter(data.patient_id[i] for i in _labeled(data))
    assert set(per_patient.values()) <= {1, 2, 3, 4} and max(per_patient.values()) > 1


def test_unlabeled_pool(data):
    pool = [i for i in range(len(data.images)) if not data.labeled[i]]
    assert len(pool) == 12
    assert pool == list(range(len(data.images) - 12, len(data.images)))  # labelled first
    for i in pool:
        assert re.fullmatch(r"u\d{5}", data.patient_id[i])
        assert data.broad_label[i] is None and data.fine_label[i] is None and data.diagnosis_text[i] is None
        assert data.eye[i] in ("left", "right")


def test_example_grid(tmp_path):
    from PIL import Image

    path = tmp_path / "grid.png"
    write_example_grid(path, per_class=2, image_size=32, seed=0)
    grid = Image.open(path)
    assert grid.mode == "RGB" and grid.height >= 5 * 32 and grid.width >= 2 * 32
