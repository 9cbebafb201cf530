"""Fine sub-categories (T2): axes per broad class, the catalogue and its long-tailed weights."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

BROAD_CLASSES = ("normal", "DR", "AMD", "glaucoma", "melanoma")
EYES = ("left", "right")

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
