"""Procedural generator of fundus-like colour photographs (the plugin's embedded dataset).

The eye_fundus plugin reproduces "Multi-Task Knowledge Distillation for Eye Disease
Prediction" (WACV 2021), whose data set is private.  So that the plugin runs with no
download, this module draws synthetic retinal photographs together with the three
targets of the paper:

* T1 - broad disease, one of :data:`BROAD_CLASSES`;
* T2 - a fine sub-category ("DR | proliferative | with macular edema | right"): the
  sub-type, severity, location and eye of the finding, see :func:`fine_label_catalogue`;
* T3 - an ophthalmologist-style diagnosis sentence produced by a small grammar that is
  tied to the fine label ("proliferative diabetic retinopathy with macular edema of
  the right eye").

Every image is a pure function of ``(seed, patient index, image index)``: each image
seeds its own ``np.random.default_rng`` and never touches global random state, so a
data set is identical on every machine and for any number of worker processes, and
growing ``num_patients`` only appends images.  Drawing is vectorised with numpy
(lesions are splatted as batches of Gaussian or disc stamps, vessels are drawn with
Pillow at twice the resolution), which keeps generation at a few milliseconds per
128 px image.  See ``docs/synthetic_data.md`` for pictures and the measured difficulty.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

__all__ = [
    "BROAD_CLASSES",
    "FineClass",
    "SyntheticFundus",
    "diagnosis_text",
    "fine_label_catalogue",
    "generate_fundus",
    "write_example_grid",
]

BROAD_CLASSES = ("normal", "DR", "AMD", "glaucoma", "melanoma")
EYES = ("left", "right")

# --------------------------------------------------------------------------------------
# Fine classes
# --------------------------------------------------------------------------------------

# Axes of the fine sub-categories, per broad class.  The first axis varies fastest when
# the catalogue is enumerated, so a small ``num_fine_classes`` keeps the most important
# distinctions (DR severity before DR lesion quadrant).  ``None`` is the unremarkable
# value of an axis and is left out of the label.  Every value changes the drawing.
_FINE_AXES: dict[str, tuple[tuple[str, tuple[str | None, ...]], ...]] = {
    "normal": (
        ("finding", ("healthy fundus", "tessellated fundus", "tilted optic disc",
                     "peripapillary crescent", "large physiological cup")),
        ("pigmentation", (None, "light pigmentation", "dark pigmentation")),
    ),
    "DR": (
        ("severity", ("mild nonproliferative", "moderate nonproliferative",
                      "severe nonproliferative", "proliferative")),
        ("edema", ("without macular edema", "with macular edema")),
        ("quadrant", (None, "superior predominant", "inferior predominant",
                      "nasal predominant", "temporal predominant")),
        ("laser", (None, "with laser scars")),
    ),
    "AMD": (
        ("stage", ("early dry", "intermediate dry", "geographic atrophy", "wet active",
                   "disciform scar")),
        ("location", (None, "extrafoveal")),
        ("pigment", (None, "with pigment changes")),
    ),
    "glaucoma": (
        ("severity", ("suspect", "mild", "moderate", "severe")),
        ("rim", ("inferior rim thinning", "superior rim thinning", "diffuse rim thinning",
                 "temporal rim thinning")),
        ("atrophy", (None, "with peripapillary atrophy")),
    ),
    "melanoma": (
        ("quadrant", ("superior temporal quadrant", "inferior temporal quadrant",
                      "superior nasal quadrant", "inferior nasal quadrant")),
        ("size", ("medium", "small", "large")),
        ("site", (None, "ciliary body")),
        ("fluid", (None, "with subretinal fluid")),
    ),
}
# Share of the fine conditions given to each broad class (DR is the most varied in the
# paper: 130 of its 237 caption words).
_CLASS_SHARE = {"normal": 0.12, "DR": 0.26, "AMD": 0.20, "glaucoma": 0.20, "melanoma": 0.22}
_ZIPF_EXPONENT = 1.2


@dataclass(frozen=True)
class FineClass:
    """One fine sub-category (T2 label) with its broad label and frequency weight.

    ``weight`` is the probability of the class among labelled images (weights of all
    classes sum to one; each broad class holds one fifth).
    """

    name: str
    broad: str
    eye: str
    attributes: tuple[tuple[str, str | None], ...]
    weight: float

    def get(self, axis: str) -> str | None:
        """Value of one axis of the sub-category (``None`` when unremarkable)."""
        return dict(self.attributes).get(axis)


def _conditions(broad: str) -> list[tuple[tuple[str, str | None], ...]]:
    """All attribute combinations of a broad class, first axis varying fastest."""
    axes = _FINE_AXES[broad]
    combos = itertools.product(*[values for _, values in reversed(axes)])
    return [tuple(zip([a for a, _ in axes], reversed(c))) for c in combos]


def _allocate_conditions(n_conditions: int) -> dict[str, int]:
    caps = {b: len(_conditions(b)) for b in BROAD_CLASSES}
    if n_conditions > sum(caps.values()):
        raise ValueError(f"at most {2 * sum(caps.values())} fine classes are available")
    alloc = {b: 1 for b in BROAD_CLASSES}
    while sum(alloc.values()) < n_conditions:
        open_ = [b for b in BROAD_CLASSES if alloc[b] < caps[b]]
        alloc[max(open_, key=lambda b: _CLASS_SHARE[b] * n_conditions - alloc[b])] += 1
    return alloc


def _fine_name(broad: str, attributes, eye: str) -> str:
    return " | ".join([broad, *[v for _, v in attributes if v is not None], eye])


@lru_cache(maxsize=16)
def _catalogue(num_fine_classes: int, seed: int) -> tuple[FineClass, ...]:
    if num_fine_classes < 10:
        raise ValueError("num_fine_classes must be >= 10 (one condition x two eyes per class)")
    alloc = _allocate_conditions(math.ceil(num_fine_classes / 2))
    jitter_rng = np.random.default_rng([seed, 99])
    out = []
    for broad in BROAD_CLASSES:
        conds = _conditions(broad)[: alloc[broad]]
        # Zipf-like long tail inside each broad class, so broad classes stay balanced
        # while some sub-categories have only a handful of images.
        ranks = np.arange(1, len(conds) + 1, dtype=float)
        w = ranks ** -_ZIPF_EXPONENT * np.exp(0.2 * jitter_rng.standard_normal(len(conds)))
        w = w / w.sum() / len(BROAD_CLASSES) / 2.0
        for attrs, wi in zip(conds, w):
            for eye in EYES:
                out.append(FineClass(_fine_name(broad, attrs, eye), broad, eye, attrs,
                                     float(wi)))
    return tuple(out)


def fine_label_catalogue(num_fine_classes: int = 60, seed: int = 0) -> list[FineClass]:
    """The fine sub-categories (at least ``num_fine_classes``, rounded up to whole eye
    pairs), each with its broad label and its frequency weight.

    Classes combine sub-type, severity, location and eye.  Weights follow a Zipf law
    inside each broad class (``seed`` jitters them slightly); every broad class gets one
    fifth of the mass.  At most 390 fine classes exist (the paper had 320).
    """
    return list(_catalogue(int(num_fine_classes), int(seed)))


# --------------------------------------------------------------------------------------
# Data set and patient plan
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Geometry helpers
# --------------------------------------------------------------------------------------

_FOV_RADIUS = 0.96  # of the half image width


@lru_cache(maxsize=8)
def _grid(size: int):
    """Normalised pixel-centre coordinates in [-1, 1] (built once per image size)."""
    c = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    x = np.broadcast_to(c[None, :], (size, size))
    y = np.broadcast_to(c[:, None], (size, size))
    r = np.hypot(x, y)
    theta = np.arctan2(y, x)
    fov = np.clip((_FOV_RADIUS - r) * size / 2.0 + 0.5, 0.0, 1.0)
    for a in (r, theta, fov):
        a.flags.writeable = False
    return x, y, r, theta, fov


class _Frame:
    """Maps eye coordinates to pixels.

    Eye coordinates: origin at the fovea, ``u`` towards the nasal side, ``v`` superior, in
    units of half the image width.  Right eyes show the nasal side (and the optic disc) on
    the image's right, left eyes are mirrored.  Scale, roll and offset vary per image
    (field of view, macula position, partly cut-off disc).
    """

    def __init__(self, size, eye, scale, roll, offset):
        self.size, self.scale = size, scale
        self.sgn = 1.0 if eye == "right" else -1.0
        self.cos, self.sin = math.cos(roll), math.sin(roll)
        self.ox, self.oy = offset

    def to_px(self, u, v):
        a, b = self.sgn * np.asarray(u, float), -np.asarray(v, float)
        x = self.scale * (self.cos * a - self.sin * b) + self.ox
        y = self.scale * (self.sin * a + self.cos * b) + self.oy
        return (x + 1.0) * self.size / 2.0 - 0.5, (y + 1.0) * self.size / 2.0 - 0.5

    def px(self, length):
        return np.asarray(length, float) * self.scale * self.size / 2.0

    def angle(self, eye_angle):
        """Image angle (atan2(row, col)) of an eye-coordinate direction."""
        a, b = self.sgn * np.cos(eye_angle), -np.sin(eye_angle)
        return np.arctan2(self.sin * a + self.cos * b, self.cos * a - self.sin * b)

    def warp(self, canvas: Image.Image, extent: float) -> np.ndarray:
        """Resample an eye-space canvas (half-width ``extent`` eye units, ``size / 2`` px per
        eye unit) into this image frame; returns (C, S, S) in [0, 1]."""
        s, S = self.scale, self.size
        g, c, sn = self.sgn / s, self.cos, self.sin
        ax, ay = -1.0 - self.ox, -1.0 - self.oy
        # Inverse of to_px: continuous output pixel coordinates -> canvas coordinates.
        coeffs = (g * c, g * sn, S / 2 * (g * (c * ax + sn * ay) + extent),
                  -sn / s, c / s, S / 2 * ((c * ay - sn * ax) / s + extent))
        out = canvas.transform((S, S), Image.AFFINE, coeffs, resample=Image.BILINEAR)
        return np.moveaxis(np.asarray(out, float), -1, 0) / 255.0


def _splat(size, cx, cy, sx, sy=None, angle=None, amp=1.0, disc=False):
    """Sum of elliptic Gaussian (or soft-edged disc) stamps, as one (size, size) map.

    Centres ``cx, cy`` and radii ``sx`` (major), ``sy`` (minor) are in pixels, ``angle`` is
    the image angle of the major axis.  All stamps are evaluated in one batch and
    accumulated with ``np.bincount``, so hundreds of lesions cost a fraction of a ms.
    """
    cx, cy = np.atleast_1d(np.asarray(cx, float)), np.atleast_1d(np.asarray(cy, float))
    n = cx.size
    if n == 0:
        return np.zeros((size, size))
    sx = np.broadcast_to(np.maximum(np.asarray(sx, float), 0.5), (n,))
    sy = sx if sy is None else np.broadcast_to(np.maximum(np.asarray(sy, float), 0.5), (n,))
    ang = np.broadcast_to(np.asarray(0.0 if angle is None else angle, float), (n,))
    amp = np.broadcast_to(np.asarray(amp, float), (n,))
    half = int(min(math.ceil((1.2 if disc else 3.0) * max(sx.max(), sy.max())) + 1, size))
    off = np.arange(-half, half + 1)
    ix, iy = np.round(cx).astype(int), np.round(cy).astype(int)
    cols = ix[:, None] + off[None, :]
    rows = iy[:, None] + off[None, :]
    dx = (cols - cx[:, None])[:, None, :]
    dy = (rows - cy[:, None])[:, :, None]
    c, s = np.cos(ang)[:, None, None], np.sin(ang)[:, None, None]
    a = (dx * c + dy * s) / sx[:, None, None]
    b = (dy * c - dx * s) / sy[:, None, None]
    r2 = a * a + b * b
    if disc:  # ~1 px soft edge whatever the radius
        val = np.clip((1.0 - np.sqrt(r2)) * sy[:, None, None] + 0.5, 0.0, 1.0)
    else:
        val = np.exp(-0.5 * r2)
    val = val * amp[:, None, None]
    rr = np.broadcast_to(rows[:, :, None], val.shape)
    cc = np.broadcast_to(cols[:, None, :], val.shape)
    ok = (rr >= 0) & (rr < size) & (cc >= 0) & (cc < size) & (val > 1e-3)
    flat = np.bincount((rr * size + cc)[ok], weights=val[ok], minlength=size * size)
    return flat.reshape(size, size)


def _support(mask):
    """Bounding box (row slice, col slice) of the non-zero part of a mask, or None.

    Lesion masks are mostly empty, so blending only inside their support saves most of
    the per-image arithmetic."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


# Images are composed channel-first, (3, S, S), so every blend runs over long rows.
def _mix(img, mask, colour, opacity=1.0):
    """Blend ``img`` towards ``colour`` where ``mask`` (clipped to [0, 1]) is on."""
    box = _support(mask)
    if box is None:
        return
    m = np.clip(mask[box] * opacity, 0.0, 1.0)
    for ch, value in enumerate(colour):
        sub = img[ch][box]
        sub += m * (value - sub)


def _darken(img, mask, factor):
    """Multiply ``img`` by ``factor`` (a scalar or one per channel) where ``mask`` is on."""
    box = _support(mask)
    if box is None:
        return
    m = np.clip(mask[box], 0.0, 1.0)
    for ch, f in enumerate(np.broadcast_to(np.asarray(factor, float), (3,))):
        img[ch][box] *= 1.0 - (1.0 - f) * m


@lru_cache(maxsize=32)
def _interpolator(size: int, cells: int) -> np.ndarray:
    """(size, cells) Gaussian interpolation weights, rows of unit L2 norm."""
    centres = (np.arange(cells) + 0.5) / cells
    pos = (np.arange(size) + 0.5) / size
    w = np.exp(-0.5 * ((pos[:, None] - centres[None, :]) * cells / 0.8) ** 2)
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    w.flags.writeable = False
    return w


def _smooth_noise(rng, size, cells):
    """Smooth noise field with zero mean and unit variance: a coarse ``cells`` x ``cells``
    Gaussian grid interpolated to ``size`` x ``size`` (two small matrix products)."""
    w = _interpolator(size, cells)
    return w @ rng.standard_normal((cells, cells)) @ w.T


def _uniform_in_sector(rng, n, centre, r_max, a0=-math.pi, a1=math.pi, r_min=0.0):
    """``n`` points (u, v) uniform in an annular sector around ``centre``."""
    ang = rng.uniform(a0, a1, n)
    rad = np.sqrt(rng.uniform(r_min ** 2 / r_max ** 2, 1.0, n)) * r_max
    return centre[0] + rad * np.cos(ang), centre[1] + rad * np.sin(ang)


# --------------------------------------------------------------------------------------
# Per-eye anatomy (shared by all visits of one eye)
# --------------------------------------------------------------------------------------

_DISC_UV = (0.5, 0.04)  # optic disc ~2.5 disc diameters nasal to the fovea
_ARCADES = np.array([  # heading (deg), curvature (deg per unit length), length, width
    (100.0, 62.0, 1.55, 1.0),    # superior temporal arcade: arches over the macula
    (-100.0, -62.0, 1.55, 1.0),  # inferior temporal arcade
    (60.0, -15.0, 0.8, 0.8),     # superior nasal
    (-60.0, 15.0, 0.8, 0.8),     # inferior nasal
    (175.0, 8.0, 0.3, 0.45),     # small papillomacular vessel
    (10.0, 0.0, 0.6, 0.55),      # nasal
])
_VEIN_WIDTH, _ARTERY_WIDTH = 0.020, 0.014
_CANVAS_EXTENT = 1.9  # eye-space canvas covers |u|, |v| <= this


def _walks(rng, starts, headings, curvatures, lengths, step=0.035, wiggle=9.0):
    """A batch of random walks with drift (vessel paths).

    Returns ``(points (n, m + 1, 2), headings (n, m + 1) in degrees, last (n,))``; walk ``i``
    is ``points[i, : last[i] + 1]``."""
    n = len(starts)
    last = np.maximum((np.asarray(lengths) / step).astype(int), 2)
    m = int(last.max()) if n else 2
    turns = np.radians(np.asarray(curvatures)[:, None] * step + wiggle * math.sqrt(step) * rng.standard_normal((n, m)))
    head = np.radians(np.asarray(headings))[:, None] + np.cumsum(turns, axis=1)
    pts = np.empty((n, m + 1, 2))
    pts[:, 0] = starts
    pts[:, 1:, 0] = np.asarray(starts)[:, None, 0] + np.cumsum(step * np.cos(head), axis=1)
    pts[:, 1:, 1] = np.asarray(starts)[:, None, 1] + np.cumsum(step * np.sin(head), axis=1)
    return pts, np.degrees(np.concatenate([head[:, :1], head], axis=1)), last


def _branches(rng, parents, per_parent, angle, length, curvature_sd=40.0):
    """Child walks spawned at random points along a batch of parent walks; also returns
    the parent index of every child."""
    pts, deg, last = parents
    owner = np.repeat(np.arange(len(last)), per_parent)
    j = rng.integers(np.maximum((last[owner] + 1) // 6, 1), np.maximum(last[owner] - 1, 2))
    side = np.where(rng.random(owner.size) < 0.5, 1.0, -1.0)
    heads = deg[owner, j] + side * rng.uniform(*angle, owner.size)
    walks = _walks(rng, pts[owner, j], heads, rng.normal(0, curvature_sd, owner.size),
                   rng.uniform(*length, owner.size))
    return walks, owner


@lru_cache(maxsize=64)
def _eye_anatomy(seed: int, stream: int, patient: int, eye: str, size: int) -> dict:
    """Disc, pigment and vessel tree of one eye, the vessels rasterised in eye space."""
    shared = np.random.default_rng([seed, stream, patient, 1])
    pigment = float(shared.uniform(0.0, 1.0))
    rng = np.random.default_rng([seed, stream, patient, 1, 1 + EYES.index(eye)])
    disc_r = float(rng.uniform(0.11, 0.14))
    disc_uv = (_DISC_UV[0] + float(rng.normal(0, 0.02)), _DISC_UV[1] + float(rng.normal(0, 0.02)))

    # Trunks: every arcade once as an artery and once as a (wider, darker) vein.
    k = len(_ARCADES)
    arcade = np.tile(_ARCADES, (2, 1))
    is_vein = np.repeat([0, 1], k)
    base_width = np.where(is_vein, _VEIN_WIDTH, _ARTERY_WIDTH)
    trunks = _walks(rng, np.tile(disc_uv, (2 * k, 1)),
                    arcade[:, 0] + rng.normal(0, 6, 2 * k) + np.where(is_vein, 6.0, -6.0),
                    arcade[:, 1] * rng.uniform(0.85, 1.15, 2 * k), arcade[:, 2] * rng.uniform(0.9, 1.1, 2 * k))
    branches, owner1 = _branches(rng, trunks, np.where(arcade[:, 2] > 0.5, rng.integers(3, 6, 2 * k), 0),
                                 (30, 65), (0.2, 0.55))
    twigs, owner2 = _branches(rng, branches, rng.random(owner1.size) < 0.6, (30, 60), (0.1, 0.3))
    levels = ((trunks, is_vein, base_width * arcade[:, 3]),
              (branches, is_vein[owner1], base_width[owner1] * 0.6),
              (twigs, is_vein[owner1][owner2], base_width[owner1][owner2] * 0.38))

    extent = _CANVAS_EXTENT
    side = int(round(2 * extent * size))
    layers = [Image.new("L", (side, side), 0) for _ in range(3)]
    draws = [ImageDraw.Draw(layer) for layer in layers]
    lines = []
    for (pts, _, last), vein, width in levels:
        flat = ((pts * np.array([1.0, -1.0]) + extent) * size).reshape(len(last), -1).tolist()
        lines += [(w * size, v, xy[: 2 * (n + 1)]) for w, v, xy, n in zip(width, vein, flat, last)]
    # Thick vessels last, so a faint thin vessel never punches a hole in a trunk.
    for w, vein, xy in sorted(lines, key=lambda line: line[0]):
        # Canvas px (2 per image px at unit scale); sub-pixel vessels are drawn 1 px wide
        # with proportionally lower opacity.
        draws[vein].line(xy, fill=int(255 * min(w, 1.0)), width=max(int(round(w)), 1), joint="curve")
    pts, _, last = trunks
    return {"pigment": pigment, "disc_r": disc_r, "disc_uv": disc_uv,
            "disc_tilt": float(rng.normal(0, 0.15)), "normal_cdr": float(rng.uniform(0.2, 0.4)),
            "macula_depth": float(rng.uniform(0.2, 0.4)),
            "main_vessels": [pts[i, : last[i] + 1] for i in (0, 1, k, k + 1)],  # temporal arcades
            # Drawn at 2 canvas px per image px, then box-reduced: anti-aliased vessels.
            "vessels": Image.merge("RGB", layers).reduce(2), "extent": extent,
            "tessellation": float(rng.uniform(0.0, 0.3))}


def _draw_polylines(size, frame, lines) -> np.ndarray:
    """Anti-aliased opacity map of polylines ``(points_uv, width)`` (2x supersampled)."""
    big = Image.new("L", (2 * size, 2 * size), 0)
    draw = ImageDraw.Draw(big)
    for pts, width in lines:
        px, py = frame.to_px(pts[:, 0], pts[:, 1])
        xy = np.stack([(px + 0.5) * 2.0, (py + 0.5) * 2.0], axis=1)
        w2 = float(frame.px(width)) * 2.0
        # Sub-pixel vessels are drawn 1 px wide with proportionally lower opacity.
        draw.line(xy.ravel().tolist(), fill=int(255 * min(w2, 1.0)), width=max(int(round(w2)), 1), joint="curve")
    return np.asarray(big, float).reshape(size, 2, size, 2).mean(axis=(1, 3)) / 255.0


# --------------------------------------------------------------------------------------
# Rendering of one image
# --------------------------------------------------------------------------------------

# Camera profiles: channel gains (colour cast), vignetting, veiling haze, sensor noise
# and blur probability, so the device is a nuisance factor as in the paper.
_CAMERAS = (
    dict(gain=(1.00, 0.92, 0.80), falloff=0.35, haze=0.02, noise=0.010, blur=0.3),
    dict(gain=(0.92, 1.02, 1.05), falloff=0.25, haze=0.04, noise=0.012, blur=0.4),
    dict(gain=(1.05, 1.05, 0.70), falloff=0.45, haze=0.03, noise=0.015, blur=0.4),
    dict(gain=(1.12, 0.82, 0.78), falloff=0.60, haze=0.09, noise=0.025, blur=0.7),
)
# How strongly findings show; each image also draws its own visibility in [0.45, 1].
_LESION_GAIN = 0.75
_GLAUCOMA_CDR = {"suspect": (0.55, 0.65), "mild": (0.6, 0.7), "moderate": (0.7, 0.8),
                 "severe": (0.8, 0.9)}
_RIM_DIRECTION = {"inferior": -90.0, "superior": 90.0, "temporal": 180.0, "diffuse": None}
_QUADRANT_ANGLE = {"superior temporal": 135.0, "superior nasal": 45.0,
                   "inferior nasal": -45.0, "inferior temporal": -135.0}
_DR_SECTOR = {"superior": 90.0, "inferior": -90.0, "nasal": 0.0, "temporal": 180.0}


def _render_image(size, seed, stream, patient, visit, eye, broad, attributes) -> np.ndarray:
    """One uint8 RGB image (S, S, 3); a pure function of its arguments."""
    rng = np.random.default_rng([seed, stream, patient, 2, visit])
    attrs = dict(attributes)
    anat = _eye_anatomy(seed, stream, patient, eye, size)
    frame = _frame_for(rng, size, eye)
    pigment = anat["pigment"]
    if attrs.get("pigmentation") == "light pigmentation":
        pigment = 0.05
    elif attrs.get("pigmentation") == "dark pigmentation":
        pigment = 1.0
    vis = rng.uniform(0.45, 1.0) * _LESION_GAIN

    # Choroidal background: orange-red, darker with more pigment, mottled texture.
    light, dark = np.array([0.95, 0.52, 0.26]), np.array([0.62, 0.25, 0.10])
    img = np.empty((3, size, size))
    img[:] = (light + (dark - light) * pigment)[:, None, None]
    img *= 1.0 + 0.05 * _smooth_noise(rng, size, 6)
    tess = anat["tessellation"] * (1.0 - pigment)
    if attrs.get("finding") == "tessellated fundus":
        tess += 0.5
    if tess > 0.02:  # choroidal vessels seen through a thin RPE, dark interspaces between
        ribbons = np.exp(-(_smooth_noise(rng, size, 18) / 0.55) ** 2)
        _darken(img, tess * (1.0 - ribbons), (0.7, 0.56, 0.6))

    # Macula: darker spot at the fovea with a faint foveal reflex.
    mx, my = frame.to_px(0.0, 0.0)
    _darken(img, _splat(size, mx, my, frame.px(0.13)), 1.0 - anat["macula_depth"])
    if rng.random() < 0.5:
        _mix(img, _splat(size, mx, my, frame.px(0.012)), (1.0, 0.9, 0.7), 0.35)

    deep, superficial = _findings(rng, size, frame, broad, attrs, anat, vis)
    for draw_layer in deep:
        draw_layer(img)
    cup = _draw_disc(img, rng, size, frame, broad, attrs, anat, vis)
    arteries, veins, _ = frame.warp(anat["vessels"], anat["extent"])
    hidden = 1.0 - 0.6 * cup  # vessels dip into the cup and are partly hidden there
    _darken(img, arteries * hidden, (0.80, 0.52, 0.50))
    _darken(img, veins * hidden, (0.55, 0.28, 0.33))
    for draw_layer in superficial:
        draw_layer(img)
    return _camera(img, rng, size)


def _frame_for(rng, size, eye) -> _Frame:
    """Field of view, roll and framing (macula position jitter, partly cut-off disc)."""
    sgn = 1.0 if eye == "right" else -1.0
    offset = rng.normal(0.0, 0.06, 2)
    kind = rng.random()
    if kind < 0.15:  # disc-centred photograph
        offset[0] -= sgn * rng.uniform(0.15, 0.3)
    elif kind < 0.30:  # superior or inferior field
        offset[1] += rng.choice([-1.0, 1.0]) * rng.uniform(0.12, 0.25)
    elif kind < 0.38:  # temporal field: the disc is partly cut off at the border
        offset[0] += sgn * rng.uniform(0.3, 0.45)
    return _Frame(size, eye, rng.uniform(0.9, 1.1), rng.normal(0.0, 0.06), offset)


def _draw_disc(img, rng, size, frame, broad, attrs, anat, vis) -> np.ndarray:
    """Optic disc, cup, rim thinning and peripapillary atrophy; returns the cup mask."""
    cx, cy = frame.to_px(*anat["disc_uv"])
    rd = float(frame.px(anat["disc_r"]))
    elong, tilt = 1.08, anat["disc_tilt"]
    finding = attrs.get("finding")
    if finding == "tilted optic disc":
        elong, tilt = 1.4, 0.5 * frame.sgn
    half = int(math.ceil(3.2 * rd * elong)) + 2  # room for atrophy and the RNFL wedge
    r0, c0 = int(round(float(cy))), int(round(float(cx)))
    rs = slice(max(r0 - half, 0), min(r0 + half + 1, size))
    cs = slice(max(c0 - half, 0), min(c0 + half + 1, size))
    cup_full = np.zeros((size, size))
    if rs.start >= rs.stop or cs.start >= cs.stop:
        return cup_full  # disc entirely outside the image
    py, px = np.mgrid[rs, cs]
    dx, dy = px - cx, py - cy
    ct, st = math.cos(tilt), math.sin(tilt)
    a, b = (dx * ct + dy * st) / rd, (dy * ct - dx * st) / (rd * elong)
    rho, ang = np.hypot(a, b), np.arctan2(dy, dx)
    patch = img[:, rs, cs]
    temporal = float(frame.angle(math.pi))

    # Cup-to-disc ratio and the sector where the neuroretinal rim is thinned (ISNT).
    cdr, notch_dir = anat["normal_cdr"], None
    if finding == "large physiological cup":
        cdr = rng.uniform(0.5, 0.62)
    if broad == "glaucoma":
        cdr = rng.uniform(*_GLAUCOMA_CDR[attrs["severity"]])
        direction = _RIM_DIRECTION[attrs["rim"].split()[0]]
        if direction is not None:
            notch_dir = float(frame.angle(math.radians(direction)))
    cup_r = np.full(rho.shape, cdr)
    if notch_dir is not None:
        cup_r = cdr * (1.0 + 0.35 * np.clip(np.cos(ang - notch_dir), 0, None) ** 3)
    cup_r = np.minimum(cup_r, 0.94)

    # Peripapillary atrophy / crescent: pale band outside the disc, mostly temporal.
    ppa = 0.0
    if attrs.get("atrophy") or finding == "peripapillary crescent":
        ppa = rng.uniform(0.25, 0.5)
    elif finding == "tilted optic disc":
        ppa = 0.25
    if ppa > 0:
        weight = np.clip(np.cos(ang - temporal), 0, None) ** 1.5
        band = np.clip((1.0 + ppa * weight - rho) * rd, 0, 1) * (rho > 0.97)
        _mix(patch, band, (0.88, 0.76, 0.62), 0.85)
        _darken(patch, np.exp(-((rho - 1.0 - ppa * weight) * rd) ** 2) * weight, (0.6, 0.5, 0.45))

    disc = np.clip((1.0 - rho) * rd + 0.5, 0, 1)
    rim_colour = (0.98, 0.70, 0.50) if broad != "glaucoma" else (0.98, 0.76, 0.60)  # pallor
    _mix(patch, disc, rim_colour, 0.9)
    cup = np.clip((cup_r - rho) * rd / 1.5 + 0.5, 0, 1) * disc
    _mix(patch, cup, (1.0, 0.95, 0.82), 0.9)
    if notch_dir is not None:
        # Retinal nerve-fibre-layer defect: faint dark wedge leaving the notch.
        wedge = np.exp(-(((ang - notch_dir + np.pi) % (2 * np.pi)) - np.pi) ** 2 / 0.08)
        _darken(patch, wedge * np.clip(rho - 1.1, 0, 1) * (rho < 3.0) * 0.6 * vis, (0.8, 0.75, 0.75))
    cup_full[rs, cs] = cup
    return cup_full


def _camera(img, rng, size) -> np.ndarray:
    """Illumination, colour cast, haze, reflections, dust, noise, blur, field of view."""
    cam = _CAMERAS[int(rng.integers(len(_CAMERAS)))]
    x, y, r, theta, fov = _grid(size)
    cos_t, sin_t, rim3, inside = _grid_extras(size)
    cx, cy = rng.normal(0.0, 0.15, 2)
    rc2 = ((x - cx) ** 2 + (y - cy) ** 2) / _FOV_RADIUS ** 2
    falloff = cam["falloff"] * rng.uniform(0.6, 1.4)
    light = rng.uniform(0.75, 1.2) * (1.0 - falloff * np.minimum(rc2, 1.7))
    light *= 1.0 + 0.07 * _smooth_noise(rng, size, 4)
    img *= light
    img *= (np.asarray(cam["gain"]) * np.exp(rng.normal(0.0, 0.05, 3)))[:, None, None]

    # Veiling glare plus a haze that grows towards the periphery of the field.
    haze = cam["haze"] * rng.uniform(0.3, 2.0) + 0.3 * rng.uniform(0, 1) ** 3 * rim3
    for ch, value in enumerate((0.75, 0.70, 0.66)):
        img[ch] += haze * (value - img[ch])
    if rng.random() < 0.35:  # specular arc reflex near the rim of the field
        # Polynomial bumps in radius and angle: no transcendental calls per pixel.
        t0 = rng.uniform(-np.pi, np.pi)
        ring = np.maximum(1.0 - ((r - rng.uniform(0.75, 0.92)) / 0.08) ** 2, 0.0) ** 2
        facing = np.maximum(cos_t * math.cos(t0) + sin_t * math.sin(t0), 0.0) ** 4
        img += rng.uniform(0.15, 0.4) * ring * facing
    if rng.random() < 0.15:  # lens flare spot
        fx, fy = rng.uniform(0.2, 0.8, 2) * size
        img += rng.uniform(0.1, 0.3) * _splat(size, fx, fy, rng.uniform(0.04, 0.1) * size)
    if rng.random() < 0.5:  # dust on the optics: soft dark blobs
        n = int(rng.integers(1, 6))
        blobs = _splat(size, rng.uniform(0.15, 0.85, n) * size, rng.uniform(0.15, 0.85, n) * size,
                       rng.uniform(0.006, 0.02, n) * size, amp=rng.uniform(0.2, 0.5, n))
        _darken(img, blobs, 0.5)
    # Sensor noise (uniform, unit variance: cheaper to draw than Gaussian).
    img += (cam["noise"] * rng.uniform(0.5, 1.5) * math.sqrt(12.0)) * (rng.random((size, size)) - 0.5)
    img *= fov
    # Gamma through a lookup table: cheaper than a float power.
    lut = ((np.arange(1024) / 1023.0) ** rng.uniform(0.85, 1.15) * 255.0 + 0.5).astype(np.uint8)
    out = lut[(np.clip(img, 0.0, 1.0) * 1023.0 + 0.5).astype(np.uint16)]
    out = np.ascontiguousarray(out.transpose(1, 2, 0))
    if rng.random() < cam["blur"]:  # defocus
        radius = rng.uniform(0.3, 1.4) * size / 128.0
        out = np.asarray(Image.fromarray(out).filter(ImageFilter.BoxBlur(radius))) * inside
    return out


@lru_cache(maxsize=8)
def _grid_extras(size: int):
    x, y, r, theta, fov = _grid(size)
    extras = (np.cos(theta), np.sin(theta), np.minimum(r / _FOV_RADIUS, 1.0) ** 3,
              (fov > 0)[..., None].astype(np.uint8))
    for a in extras:
        a.flags.writeable = False
    return extras


# --------------------------------------------------------------------------------------
# Findings (Table 1 of the paper)
# --------------------------------------------------------------------------------------


class _Layers:
    """Findings collected as deferred blends: 'deep' ones go under the retinal vessels
    (choroid, RPE), 'superficial' ones over them (haemorrhages, exudates)."""

    def __init__(self):
        self.deep, self.superficial = [], []

    def mix(self, mask, colour, opacity, deep=False):
        (self.deep if deep else self.superficial).append(lambda img: _mix(img, mask, colour, opacity))

    def darken(self, mask, factor, deep=False):
        (self.deep if deep else self.superficial).append(lambda img: _darken(img, mask, factor))


def _spots(size, frame, u, v, sigma, amp=1.0, minor=None, angle=None, disc=False):
    """Splat lesions given in eye coordinates (sizes in eye units)."""
    px, py = frame.to_px(u, v)
    return _splat(size, px, py, frame.px(sigma), None if minor is None else frame.px(minor),
                  angle, amp, disc)


def _findings(rng, size, frame, broad, attrs, anat, vis):
    layers = _Layers()
    draw = {"DR": _diabetic_retinopathy, "AMD": _macular_degeneration,
            "melanoma": _melanoma}.get(broad)
    if draw is not None:
        draw(layers, rng, size, frame, attrs, anat, vis)
    if broad != "AMD" and rng.random() < 0.15:  # incidental small hard drusen (age)
        u, v = _uniform_in_sector(rng, int(rng.integers(2, 7)), (0.0, 0.0), 0.35)
        layers.mix(_spots(size, frame, u, v, rng.uniform(0.006, 0.01, u.size)), (0.95, 0.82, 0.5),
                   0.5, deep=True)
    if broad != "melanoma" and rng.random() < 0.06:  # incidental flat choroidal naevus
        u, v = _uniform_in_sector(rng, 1, (0.0, 0.0), 0.8, r_min=0.3)
        layers.mix(_spots(size, frame, u, v, rng.uniform(0.04, 0.07)), (0.45, 0.4, 0.32), 0.5,
                   deep=True)
    return layers.deep, layers.superficial


def _dr_positions(rng, n, attrs, disc_uv):
    """Lesion positions over the posterior pole, concentrated in the named quadrant."""
    u, v = _uniform_in_sector(rng, n, (0.1, 0.0), 0.85)
    q = attrs.get("quadrant")
    if q is not None and n:
        centre = math.radians(_DR_SECTOR[q.split()[0]])
        inside = rng.random(n) < 0.8
        qu, qv = _uniform_in_sector(rng, n, (0.1, 0.0), 0.85, centre - 0.8, centre + 0.8, 0.15)
        u, v = np.where(inside, qu, u), np.where(inside, qv, v)
    # Keep lesions off the optic disc.
    far = np.hypot(u - disc_uv[0], v - disc_uv[1]) > 0.16
    return u[far], v[far]


_DR_COUNTS = {  # (microaneurysms, dot-blot, flame, hard exudates, cotton-wool spots)
    "mild nonproliferative": ((4, 12), (0, 3), (0, 1), (0, 3), (0, 1)),
    "moderate nonproliferative": ((10, 25), (4, 12), (0, 4), (2, 12), (0, 2)),
    "severe nonproliferative": ((20, 40), (14, 30), (3, 8), (5, 20), (2, 6)),
    "proliferative": ((15, 35), (8, 25), (2, 7), (4, 18), (1, 5)),
}


def _diabetic_retinopathy(layers, rng, size, frame, attrs, anat, vis):
    n_ma, n_dot, n_flame, n_ex, n_cws = [int(rng.integers(a, b + 1)) for a, b in _DR_COUNTS[attrs["severity"]]]
    disc = anat["disc_uv"]
    if attrs.get("laser"):  # panretinal photocoagulation: pigmented rings with pale centres
        n = int(rng.integers(40, 90))
        u, v = _uniform_in_sector(rng, n, (0.1, 0.0), 1.15, r_min=0.55)
        rad = rng.uniform(0.018, 0.028, n)
        layers.darken(_spots(size, frame, u, v, rad, disc=True) * 0.7 * vis, (0.35, 0.27, 0.2), deep=True)
        layers.mix(_spots(size, frame, u, v, rad * 0.6, disc=True), (0.95, 0.85, 0.65), 0.7 * vis, deep=True)
    red = (0.38, 0.14, 0.13)
    u, v = _dr_positions(rng, n_ma, attrs, disc)
    layers.darken(_spots(size, frame, u, v, rng.uniform(0.005, 0.008, u.size), 0.9 * vis), red)
    u, v = _dr_positions(rng, n_dot, attrs, disc)
    layers.darken(_spots(size, frame, u, v, rng.uniform(0.012, 0.025, u.size), 1.3 * vis), red)
    u, v = _dr_positions(rng, n_flame, attrs, disc)
    if u.size:  # flame haemorrhages follow the nerve fibres, i.e. point to the disc
        px, py = frame.to_px(u, v)
        dx, dy = frame.to_px(*disc)
        layers.darken(_spots(size, frame, u, v, rng.uniform(0.03, 0.05, u.size), 1.1 * vis,
                             minor=rng.uniform(0.008, 0.012, u.size), angle=np.arctan2(py - dy, px - dx)), red)
    u, v = _dr_positions(rng, n_ex, attrs, disc)
    exudate = (1.0, 0.92, 0.48)
    layers.mix(_spots(size, frame, u, v, rng.uniform(0.006, 0.014, u.size), 1.6), exudate, 0.9 * vis)
    if attrs["edema"] == "with macular edema":  # thickening plus a circinate exudate ring
        layers.mix(_spots(size, frame, 0.0, 0.0, 0.16), (0.85, 0.75, 0.62), 0.25 * vis)
        n = int(rng.integers(12, 40))
        a = rng.uniform(-1.0, 1.0) * np.pi + rng.normal(0, 1.1, n)
        rad = rng.uniform(0.08, 0.22) * rng.uniform(0.8, 1.2, n)
        layers.mix(_spots(size, frame, rad * np.cos(a), rad * np.sin(a), rng.uniform(0.006, 0.014, n), 1.6),
                   exudate, 0.95 * vis)
    # Cotton-wool spots: fluffy white patches along the arcades.
    main = anat["main_vessels"]
    if n_cws:
        pts = np.concatenate(main)[rng.integers(0, sum(len(p) for p in main), n_cws)]
        pts = pts + rng.normal(0, 0.03, pts.shape)
        layers.mix(_spots(size, frame, pts[:, 0], pts[:, 1], rng.uniform(0.02, 0.035, n_cws), 1.2,
                          minor=rng.uniform(0.014, 0.022, n_cws), angle=rng.uniform(0, np.pi, n_cws)),
                   (0.96, 0.93, 0.86), 0.8 * vis)
    if attrs["severity"] == "proliferative":
        _new_vessels(layers, rng, size, frame, anat, vis)


def _new_vessels(layers, rng, size, frame, anat, vis):
    """Neovascularisation of the disc / elsewhere: tangles of fine tortuous vessels."""
    centres = []
    if rng.random() < 0.6:
        centres.append(np.asarray(anat["disc_uv"]))
    if not centres or rng.random() < 0.5:
        arcade = anat["main_vessels"][int(rng.integers(len(anat["main_vessels"])))]
        centres.append(arcade[int(rng.integers(len(arcade) // 4, len(arcade)))])
    starts = np.concatenate([c + rng.normal(0, 0.03, (int(rng.integers(6, 12)), 2)) for c in centres])
    n = len(starts)
    pts, _, last = _walks(rng, starts, rng.uniform(0, 360, n), rng.normal(0, 150, n), rng.uniform(0.06, 0.16, n),
                          step=0.012, wiggle=90.0)
    tangle = _draw_polylines(size, frame, [(p[: i + 1], 0.008) for p, i in zip(pts, last)])
    layers.darken(tangle * vis * 1.4, (0.55, 0.25, 0.25))
    if rng.random() < 0.4:  # pre-retinal (boat-shaped) haemorrhage
        c = centres[-1]
        layers.darken(_spots(size, frame, c[0], c[1] - 0.05, 0.07, 1.6 * vis, minor=0.045, angle=0.0, disc=True),
                      (0.35, 0.1, 0.1))
    if rng.random() < 0.35:  # fibrovascular tissue: whitish veil over the new vessels
        c = centres[0]
        layers.mix(_spots(size, frame, c[0], c[1], 0.06), (0.9, 0.85, 0.8), 0.35 * vis)


def _macular_degeneration(layers, rng, size, frame, attrs, anat, vis):
    stage = attrs["stage"]
    centre = (0.0, 0.0)
    if attrs.get("location") == "extrafoveal":
        a = rng.uniform(0, 2 * np.pi)
        d = rng.uniform(0.16, 0.24)
        centre = (d * math.cos(a), d * math.sin(a))
    drusen = {"early dry": (6, 18, 0.008, 0.013, 0.15), "intermediate dry": (18, 45, 0.012, 0.024, 0.22),
              "geographic atrophy": (8, 20, 0.01, 0.02, 0.25), "wet active": (5, 15, 0.01, 0.02, 0.22),
              "disciform scar": (0, 8, 0.01, 0.018, 0.25)}[stage]
    n = int(rng.integers(drusen[0], drusen[1] + 1))
    u, v = _uniform_in_sector(rng, n, centre, drusen[4])
    layers.mix(_spots(size, frame, u, v, rng.uniform(drusen[2], drusen[3], n), 1.3),
               (0.98, 0.86, 0.5), 0.75 * vis, deep=True)
    cu, cv = centre
    if stage == "geographic atrophy":  # sharply demarcated pale patches showing choroid
        k = int(rng.integers(1, 4))
        gu, gv = cu + rng.normal(0, 0.04, k), cv + rng.normal(0, 0.04, k)
        area = np.clip(_spots(size, frame, gu, gv, rng.uniform(0.06, 0.12, k), disc=True), 0, 1)
        layers.mix(area, (0.95, 0.72, 0.55), 0.85 * vis, deep=True)
        ridges = np.exp(-(_smooth_noise(rng, size, 10) / 0.3) ** 2)
        layers.darken(area * ridges * 0.6 * vis, (0.75, 0.45, 0.4), deep=True)
    elif stage == "wet active":  # grey-green membrane, blood, exudate and fluid
        layers.mix(_spots(size, frame, cu, cv, 0.14), (0.9, 0.7, 0.5), 0.25 * vis, deep=True)
        layers.mix(_spots(size, frame, cu, cv, rng.uniform(0.04, 0.06)), (0.5, 0.5, 0.38), 0.7 * vis, deep=True)
        k = int(rng.integers(1, 4))
        hu, hv = cu + rng.normal(0, 0.07, k), cv + rng.normal(0, 0.07, k)
        layers.darken(_spots(size, frame, hu, hv, rng.uniform(0.03, 0.06, k), 1.5 * vis), (0.35, 0.13, 0.12))
        a = rng.uniform(0, 2 * np.pi, 12)
        rr = rng.uniform(0.1, 0.16, 12)
        layers.mix(_spots(size, frame, cu + rr * np.cos(a), cv + rr * np.sin(a), 0.01, 1.5),
                   (1.0, 0.92, 0.5), 0.8 * vis)
    elif stage == "disciform scar":  # white fibrous scar with pigmented margin
        rad = rng.uniform(0.09, 0.15)
        layers.darken(_spots(size, frame, cu, cv, rad * 1.15, disc=True) * 0.6 * vis, (0.4, 0.3, 0.25), deep=True)
        layers.mix(_spots(size, frame, cu, cv, rad, disc=True), (0.93, 0.9, 0.82), 0.85 * vis, deep=True)
    if attrs.get("pigment"):  # clumps of hyperpigmentation and depigmented spots
        n = int(rng.integers(8, 22))
        u, v = _uniform_in_sector(rng, n, centre, 0.22)
        layers.darken(_spots(size, frame, u, v, rng.uniform(0.006, 0.014, n), 1.5 * vis), (0.3, 0.24, 0.2), deep=True)
        u, v = _uniform_in_sector(rng, n // 2, centre, 0.22)
        layers.mix(_spots(size, frame, u, v, rng.uniform(0.015, 0.03, n // 2)), (0.95, 0.78, 0.6), 0.4 * vis, deep=True)


_MELANOMA_RADIUS = {"small": (0.08, 0.11), "medium": (0.12, 0.17), "large": (0.18, 0.26)}


def _melanoma(layers, rng, size, frame, attrs, anat, vis):
    """Pigmented dome-shaped mass with orange lipofuscin and a sub-retinal fluid halo."""
    vis = 0.6 + 0.4 * vis  # tumours are conspicuous (melanoma recall 0.97 in the paper)
    ang = math.radians(_QUADRANT_ANGLE[attrs["quadrant"].replace(" quadrant", "")] + rng.normal(0, 10))
    # A ciliary-body tumour shows at the far periphery, partly cut off by the field stop.
    dist = rng.uniform(0.72, 0.88) if attrs.get("site") == "ciliary body" else rng.uniform(0.4, 0.68)
    cu, cv = dist * math.cos(ang), dist * math.sin(ang)
    rad = rng.uniform(*_MELANOMA_RADIUS[attrs["size"]])
    fluid = 0.5 if attrs.get("fluid") else 0.2
    # Sub-retinal fluid gravitates inferiorly.
    layers.mix(_spots(size, frame, cu, cv - 0.3 * rad * fluid, rad * 1.5), (0.93, 0.72, 0.5), fluid * vis, deep=True)
    k = int(rng.integers(2, 4))  # a few overlapping lobes give an irregular outline
    lu, lv = cu + rng.normal(0, 0.2 * rad, k), cv + rng.normal(0, 0.2 * rad, k)
    lobes = np.clip(_spots(size, frame, lu, lv, rad * rng.uniform(0.8, 1.0, k), disc=True), 0, 1)
    tone = rng.uniform(0.0, 1.0)  # from slate grey-green to dark brown
    colour = np.array([0.40, 0.40, 0.30]) * (1 - tone) + np.array([0.32, 0.22, 0.15]) * tone
    layers.mix(lobes, colour, 0.85 * vis, deep=True)
    # Dome shading: light from above-left on the elevated mass.
    hu, hv = frame.to_px(cu, cv)
    hl = _splat(size, hu - frame.px(0.3 * rad), hv - frame.px(0.3 * rad), frame.px(0.45 * rad))
    layers.mix(lobes * hl, (0.7, 0.65, 0.5), 0.35 * vis, deep=True)
    n = int(rng.integers(5, 20))  # orange lipofuscin flecks on the tumour surface
    fu, fv = _uniform_in_sector(rng, n, (cu, cv), 0.7 * rad)
    layers.mix(_spots(size, frame, fu, fv, rng.uniform(0.006, 0.014, n), 1.4) * lobes,
               (1.0, 0.58, 0.18), 0.8 * vis, deep=True)


# --------------------------------------------------------------------------------------
# Diagnosis text (T3): a small grammar tied to the fine label
# --------------------------------------------------------------------------------------

_EYE_PHRASES = {
    "right": ("right eye", "of the right eye", "in the right eye", "od", "right side", "oculus dexter"),
    "left": ("left eye", "of the left eye", "in the left eye", "os", "left side", "oculus sinister"),
}
_NORMAL_FINDING = {
    "healthy fundus": ("normal fundus", "healthy fundus", "normal retina", "unremarkable fundus examination",
                       "no retinopathy seen", "normal optic disc and macula", "no abnormality detected"),
    "tessellated fundus": ("tessellated fundus", "tigroid fundus", "myopic tessellation",
                           "visible choroidal vessels"),
    "tilted optic disc": ("tilted optic disc", "tilted disc", "oblique optic disc insertion"),
    "peripapillary crescent": ("peripapillary crescent", "temporal myopic crescent",
                               "scleral crescent at disc margin"),
    "large physiological cup": ("large physiological cup", "physiologic cupping",
                                "large symmetric optic cup", "enlarged cup with healthy rim"),
}
_NORMAL_PIGMENT = {"light pigmentation": ("lightly pigmented", "blond fundus"),
                   "dark pigmentation": ("darkly pigmented", "heavily pigmented fundus")}
_NORMAL_EXTRA = ("otherwise normal", "no diabetic retinopathy", "routine screening",
                 "follow up in one year", "benign variant")
_DR_SEVERITY = {
    "mild nonproliferative": ("mild nonproliferative", "mild non proliferative", "early background",
                              "minimal nonproliferative"),
    "moderate nonproliferative": ("moderate nonproliferative", "moderate non proliferative",
                                  "moderate background"),
    "severe nonproliferative": ("severe nonproliferative", "severe non proliferative", "preproliferative",
                                "very severe nonproliferative"),
    "proliferative": ("proliferative", "active proliferative", "high risk proliferative"),
}
_DR_ABBREVIATION = {"mild nonproliferative": "mild npdr", "moderate nonproliferative": "moderate npdr",
                    "severe nonproliferative": "severe npdr", "proliferative": "pdr"}
_DR_SIGNS = {
    "mild nonproliferative": ("scattered microaneurysms", "few microaneurysms"),
    "moderate nonproliferative": ("dot blot hemorrhages and hard exudates", "scattered intraretinal hemorrhages"),
    "severe nonproliferative": ("hemorrhages in four quadrants", "multiple cotton wool spots"),
    "proliferative": ("with neovascularization", "new vessels present", "fibrovascular proliferation"),
}
_DIABETES = ("type 2 diabetes mellitus with", "type 1 diabetes mellitus with", "diabetes mellitus type 2 with",
             "insulin dependent diabetic with")
_DR_EDEMA = {
    "with macular edema": ("with macular edema", "with diabetic macular edema",
                           "with clinically significant macular edema", "with center involving macular edema",
                           "and maculopathy"),
    "without macular edema": ("without macular edema", "without macular involvement", "no macular edema",
                              "macula dry"),
}
_DR_QUADRANT = ("predominantly {q}", "mainly in the {q} retina", "{q} quadrant involvement")
_DR_LASER = ("status post panretinal photocoagulation", "with laser scars", "after prp laser",
             "treated with scatter laser photocoagulation")
_AMD_NAMES = ("age related macular degeneration", "senile macular degeneration", "macular degeneration",
              "degeneration of macula", "armd")
_AMD_STAGE = {  # (adjectives before the name, phrases after it)
    "early dry": (("early nonexudative", "early dry", "mild nonexudative"),
                  ("with small drusen", "with few hard drusen", "early stage")),
    "intermediate dry": (("intermediate nonexudative", "intermediate dry", "nonexudative"),
                         ("with large soft drusen", "with confluent drusen", "intermediate stage")),
    "geographic atrophy": (("advanced dry", "atrophic", "advanced nonexudative"),
                           ("with geographic atrophy", "with central atrophy", "advanced atrophic stage")),
    "wet active": (("exudative", "wet", "neovascular"),
                   ("with active choroidal neovascularization", "with subretinal hemorrhage",
                    "with active cnv and fluid")),
    "disciform scar": (("end stage exudative", "inactive wet", "advanced exudative"),
                       ("with disciform scar", "with fibrovascular scar", "with subretinal fibrosis")),
}
_AMD_LOCATION = {None: ("subfoveal", "involving the fovea", "center involving"),
                 "extrafoveal": ("extrafoveal", "sparing the fovea", "juxtafoveal lesion")}
_AMD_PIGMENT = ("with pigmentary changes", "with pigment clumping", "with retinal pigment epithelium changes",
                "with hyperpigmentation")
_GLAUCOMA_SUSPECT = ("glaucoma suspect", "suspected glaucoma", "suspicious cupping of optic disc",
                     "open angle glaucoma suspect", "preperimetric glaucoma")
_GLAUCOMA_NAMES = ("primary open angle glaucoma", "open angle glaucoma", "chronic open angle glaucoma",
                   "poag", "chronic glaucoma")
_GLAUCOMA_STAGE = {"mild": ("mild stage", "early stage", "mild"), "moderate": ("moderate stage", "moderate"),
                   "severe": ("severe stage", "advanced stage", "severe")}
_GLAUCOMA_STAGE_ADJ = {"mild": ("mild", "early"), "moderate": ("moderate",), "severe": ("severe", "advanced")}
_GLAUCOMA_CDR_WORDS = {"suspect": "point six", "mild": "point seven", "moderate": "point eight",
                       "severe": "point nine"}
_CDR_PHRASES = ("cup to disc ratio {r}", "vertical cup disc ratio {r}", "cd ratio {r}")
_GLAUCOMA_RIM = {
    "inferior": ("inferior rim thinning", "inferior notching of the rim", "thin inferior neuroretinal rim"),
    "superior": ("superior rim thinning", "superior notching of the rim", "thin superior neuroretinal rim"),
    "temporal": ("temporal rim thinning", "temporal rim loss", "thin temporal neuroretinal rim"),
    "diffuse": ("diffuse rim loss", "concentric cupping", "generalized rim thinning"),
}
_GLAUCOMA_ATROPHY = ("with peripapillary atrophy", "with beta zone peripapillary atrophy",
                     "peripapillary atrophy present")
_MELANOMA_CHOROID = ("choroidal malignant melanoma", "malignant melanoma of the choroid", "melanoma of choroid",
                     "uveal melanoma", "choroidal malignant melanoma of the uvea", "malignant melanoma of uvea")
_MELANOMA_CILIARY = ("malignant melanoma of ciliary body", "ciliary body melanoma",
                     "melanoma of the ciliary body", "ciliochoroidal melanoma")
_MELANOMA_SIZE = {"small": ("small lesion", "small pigmented lesion", "small tumor"),
                  "medium": ("medium sized tumor", "medium size lesion", "moderately elevated mass"),
                  "large": ("large tumor", "large dome shaped mass", "large mushroom shaped tumor")}
_MELANOMA_COMPASS = {"superior temporal": "superotemporal", "inferior temporal": "inferotemporal",
                     "superior nasal": "superonasal", "inferior nasal": "inferonasal"}
_MELANOMA_FLUID = ("with subretinal fluid", "with overlying orange pigment and subretinal fluid",
                   "with exudative retinal detachment", "with serous detachment")
_MAX_WORDS, _MIN_WORDS = 14, 4


def diagnosis_text(fine: FineClass, rng: np.random.Generator) -> str:
    """An ophthalmologist-style diagnosis (T3) for a fine class.

    The grammar picks synonyms, optional qualifiers and word order, so the sentence is
    tied to the fine label without being a function of it.  Lower case words separated by
    single spaces, 4-14 words.
    """
    a = fine.get
    # A caption is a list of slots, each a tuple of interchangeable phrases.
    if fine.broad == "normal":
        slots = [_NORMAL_FINDING[a("finding")]]
        if a("pigmentation"):
            slots.insert(int(rng.integers(2)), _NORMAL_PIGMENT[a("pigmentation")])
        optional = [_NORMAL_EXTRA] if rng.random() < 0.4 else []
    elif fine.broad == "DR":
        sev, form = a("severity"), rng.random()
        if form < 0.55:
            slots = [tuple(f"{s} diabetic retinopathy" for s in _DR_SEVERITY[sev])]
        elif form < 0.8:
            slots = [tuple(f"diabetic retinopathy {s} stage" for s in _DR_SEVERITY[sev])]
        else:
            slots = [(_DR_ABBREVIATION[sev],)]
        if rng.random() < 0.35:
            slots.insert(0, _DIABETES)
        if a("edema") == "with macular edema" or rng.random() < 0.7:
            slots.append(_DR_EDEMA[a("edema")])
        if a("quadrant"):
            slots.append(tuple(t.format(q=a("quadrant").split()[0]) for t in _DR_QUADRANT))
        if a("laser"):
            slots.append(_DR_LASER)
        optional = [_DR_SIGNS[sev]] if rng.random() < 0.3 else []
    elif fine.broad == "AMD":
        adjectives, posts = _AMD_STAGE[a("stage")]
        name = _pick(rng, _AMD_NAMES)
        if rng.random() < 0.5:
            slots = [tuple(f"{adj} {name}" for adj in adjectives)]
            if rng.random() < 0.4:
                slots.append(posts)
        else:
            slots = [(name,), posts]
        if a("location"):
            slots.append(_AMD_LOCATION[a("location")])
        if a("pigment"):
            slots.append(_AMD_PIGMENT)
        optional = [_AMD_LOCATION[None]] if not a("location") and rng.random() < 0.4 else []
    elif fine.broad == "glaucoma":
        sev = a("severity")
        if sev == "suspect":
            slots = [_GLAUCOMA_SUSPECT]
        elif rng.random() < 0.6:
            slots = [_GLAUCOMA_NAMES, _GLAUCOMA_STAGE[sev]]
        else:
            slots = [tuple(f"{adj} {n}" for adj in _GLAUCOMA_STAGE_ADJ[sev] for n in _GLAUCOMA_NAMES)]
        if rng.random() < 0.6:
            slots.append(_GLAUCOMA_RIM[a("rim").split()[0]])
        if a("atrophy"):
            slots.append(_GLAUCOMA_ATROPHY)
        cdr = tuple(t.format(r=_GLAUCOMA_CDR_WORDS[sev]) for t in _CDR_PHRASES)
        optional = [cdr] if rng.random() < 0.35 else []
    else:  # melanoma
        quadrant = a("quadrant").replace(" quadrant", "")
        compass = _MELANOMA_COMPASS[quadrant]
        slots = [_MELANOMA_CILIARY if a("site") == "ciliary body" else _MELANOMA_CHOROID,
                 (f"{quadrant} quadrant", f"in the {quadrant} quadrant", compass, f"{compass} lesion")]
        if rng.random() < 0.4:
            slots.reverse()
        if rng.random() < 0.6:
            slots.append(_MELANOMA_SIZE[a("size")])
        if a("fluid"):
            slots.append(_MELANOMA_FLUID)
        optional = [("with orange lipofuscin pigment",)] if rng.random() < 0.25 else []
    eye = _EYE_PHRASES[fine.eye]
    slots.insert(0 if rng.random() < 0.2 else len(slots), eye)
    chosen = [_pick(rng, slot) for slot in slots]

    def n_words(phrases):
        return sum(len(p.split()) for p in phrases)

    # Over the length budget: drop the diabetes preamble, then use the shortest synonyms.
    if n_words(chosen) > _MAX_WORDS and _DIABETES in slots:
        i = slots.index(_DIABETES)
        del slots[i], chosen[i]
    for i in np.argsort([-len(c.split()) for c in chosen], kind="stable"):
        if n_words(chosen) <= _MAX_WORDS:
            break
        chosen[i] = min(slots[i], key=lambda p: len(p.split()))
    for slot in optional:  # optional qualifiers only where the length budget allows
        extra = _pick(rng, slot)
        if n_words(chosen) + len(extra.split()) <= _MAX_WORDS:
            # Before a trailing eye phrase ("... with small drusen left eye").
            chosen.insert(len(chosen) - 1 if slots[-1] is eye else len(chosen), extra)
    words = " ".join(chosen).split()
    if len(words) < _MIN_WORDS:
        words += ["on", "fundus", "examination"]
    return " ".join(words[:_MAX_WORDS])


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


# --------------------------------------------------------------------------------------
# Example grid for the documentation
# --------------------------------------------------------------------------------------


def write_example_grid(path, per_class: int = 4, image_size: int = 128, seed: int = 0) -> None:
    """Write a PNG grid: one row per broad class, ``per_class`` images per row, each
    captioned with its fine label (class name on the left).  Images are those of the
    default data set with this ``seed`` (distinct patients and fine labels preferred)."""
    catalogue = _catalogue(60, int(seed))
    specs = _plan(40 * per_class, 0, seed, catalogue)  # planning is cheap; render few
    font = ImageFont.load_default()
    label_w, line_h, pad = 80, 11, 6
    tile_w, tile_h = image_size + pad, image_size + 4 * line_h + pad
    grid = Image.new("RGB", (label_w + per_class * tile_w, len(BROAD_CLASSES) * tile_h), "white")
    draw = ImageDraw.Draw(grid)
    for row, broad in enumerate(BROAD_CLASSES):
        draw.text((4, row * tile_h + image_size // 2), broad, fill="black", font=font)
        chosen, patients, labels = [], set(), set()
        for spec in specs:
            if spec.fine.broad == broad and spec.patient not in patients and spec.fine.name not in labels:
                chosen.append(spec)
                patients.add(spec.patient)
                labels.add(spec.fine.name)
            if len(chosen) == per_class:
                break
        for col, spec in enumerate(chosen):
            x0, y0 = label_w + col * tile_w, row * tile_h
            f = spec.fine
            image = _render_image(image_size, seed, spec.stream, spec.patient, spec.visit, f.eye, f.broad,
                                  f.attributes)
            grid.paste(Image.fromarray(image), (x0, y0))
            lines = []
            for part in f.name.split(" | ")[1:]:  # wrap each label part to the tile width
                words = part.split()
                while words:
                    k = len(words)
                    while k > 1 and draw.textlength(" ".join(words[:k]), font=font) > image_size:
                        k -= 1
                    lines.append(" ".join(words[:k]))
                    words = words[k:]
            for k, line in enumerate(lines[:4]):
                draw.text((x0, y0 + image_size + 1 + line_h * k), line, fill="black", font=font)
    grid.save(path, optimize=True)
