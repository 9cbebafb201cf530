"""The data set: patients, their images and labels; rendering in worker processes."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from eye_fundus.synthetic.catalogue import BROAD_CLASSES, EYES, FineClass, _catalogue
from eye_fundus.synthetic.grammar import diagnosis_text
from eye_fundus.synthetic.render import _render_image


@dataclass(frozen=True)
class SyntheticFundus:
    """A generated data set: labelled patients first, then the unlabelled pool."""

    images: np.ndarray  # uint8, shape (N, S, S, 3), RGB
    patient_id: list[str]
    eye: list[str]  # "left" | "right"
    broad_label: list[str | None]  # None for the unlabeled pool
    fine_label: list[str | None]
    diagnosis_text: list[str | None]
    labeled: np.ndarray  # bool (N,)


@dataclass(frozen=True)
class _ImageSpec:
    stream: int  # 0 = labelled patients, 1 = unlabelled pool
    patient: int
    visit: int  # image index within the patient
    fine: FineClass


_LABELED, _UNLABELED = 0, 1
_IMAGES_PER_PATIENT = (0.25, 0.35, 0.25, 0.15)  # P(1..4 images); mean 2.3
_SAME_CONDITION_BOTH_EYES = 0.7  # most eye diseases are bilateral and symmetric


def _plan_patient(seed: int, stream: int, patient: int, catalogue) -> list[_ImageSpec]:
    """Broad diagnosis, eyes and fine class of every image of one patient."""
    rng = np.random.default_rng([seed, stream, patient, 0])
    broad = BROAD_CLASSES[int(rng.integers(len(BROAD_CLASSES)))]
    n_images = 1 + int(rng.choice(4, p=_IMAGES_PER_PATIENT))
    of_broad = [f for f in catalogue if f.broad == broad and f.eye == "left"]
    w = np.array([f.weight for f in of_broad])
    w = w / w.sum()
    first = int(rng.choice(len(of_broad), p=w))
    second = first if rng.random() < _SAME_CONDITION_BOTH_EYES else int(rng.choice(len(of_broad), p=w))
    first_eye = EYES[int(rng.integers(2))]
    other_eye = EYES[1 - EYES.index(first_eye)]
    condition = {first_eye: of_broad[first].attributes, other_eye: of_broad[second].attributes}
    if broad == "melanoma":  # a uveal melanoma is unilateral: repeat visits of one eye
        eyes = [first_eye] * n_images
    else:
        eyes = [first_eye, other_eye] + [EYES[int(rng.integers(2))] for _ in range(2)]
    lookup = {(f.attributes, f.eye): f for f in catalogue if f.broad == broad}
    return [_ImageSpec(stream, patient, k, lookup[(condition[eyes[k]], eyes[k])])
            for k in range(n_images)]


def _plan(num_patients: int, num_unlabeled: int, seed: int, catalogue) -> list[_ImageSpec]:
    specs = []
    for p in range(num_patients):
        specs.extend(_plan_patient(seed, _LABELED, p, catalogue))
    pool, q = [], 0
    while len(pool) < num_unlabeled:
        pool.extend(_plan_patient(seed, _UNLABELED, q, catalogue))
        q += 1
    return specs + pool[:num_unlabeled]


def generate_fundus(num_patients: int = 600, num_unlabeled: int = 600, image_size: int = 128,
                    num_fine_classes: int = 60, seed: int = 0, workers: int = 0) -> SyntheticFundus:
    """Generate a labelled set of ``num_patients`` patients plus an unlabelled pool.

    Each patient has 1-4 images (both eyes and/or repeat visits) sharing one broad
    diagnosis; broad classes are drawn uniformly.  The ``num_unlabeled`` pool images come
    from the same distribution with patient ids ``u00000...`` and ``None`` labels.
    ``seed`` must be a non-negative integer.  ``workers`` = number of processes (0 = auto,
    ``min(2, cpu_count)``; 1 = in-process); the result does not depend on it.
    """
    if seed < 0 or num_patients < 0 or num_unlabeled < 0 or image_size < 16:
        raise ValueError("seed, num_patients, num_unlabeled must be >= 0 and image_size >= 16")
    catalogue = _catalogue(int(num_fine_classes), int(seed))
    specs = _plan(num_patients, num_unlabeled, seed, catalogue)
    images = _render_all(specs, image_size, seed, workers)
    labeled = np.array([s.stream == _LABELED for s in specs], dtype=bool)
    prefix = {_LABELED: "p", _UNLABELED: "u"}
    captions = []
    for s in specs:
        if s.stream == _LABELED:
            rng = np.random.default_rng([seed, s.stream, s.patient, 3, s.visit])
            captions.append(diagnosis_text(s.fine, rng))
        else:
            captions.append(None)
    return SyntheticFundus(
        images=images,
        patient_id=[f"{prefix[s.stream]}{s.patient:05d}" for s in specs],
        eye=[s.fine.eye for s in specs],
        broad_label=[s.fine.broad if s.stream == _LABELED else None for s in specs],
        fine_label=[s.fine.name if s.stream == _LABELED else None for s in specs],
        diagnosis_text=captions,
        labeled=labeled,
    )


def _render_all(specs: list[_ImageSpec], size: int, seed: int, workers: int) -> np.ndarray:
    jobs = [(s.stream, s.patient, s.visit, s.fine.eye, s.fine.broad, s.fine.attributes)
            for s in specs]
    if workers <= 0:
        workers = min(2, os.cpu_count() or 1)
    out = np.empty((len(jobs), size, size, 3), dtype=np.uint8)
    if workers == 1 or len(jobs) < 64:
        for i, job in enumerate(jobs):
            out[i] = _render_image(size, seed, *job)
        return out
    import multiprocessing as mp

    # Chunks of consecutive images keep a patient's visits together (the per-eye vessel
    # tree is cached); the result never depends on how the jobs are split.
    bounds = np.linspace(0, len(jobs), workers * 4 + 1).astype(int)
    spans = [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    with mp.get_context().Pool(workers) as pool:
        blocks = pool.imap(_render_chunk, [(size, seed, jobs[a:b]) for a, b in spans])
        for (a, b), block in zip(spans, blocks):
            out[a:b] = block
    return out


def _render_chunk(args) -> np.ndarray:
    size, seed, jobs = args
    return np.stack([_render_image(size, seed, *job) for job in jobs])
