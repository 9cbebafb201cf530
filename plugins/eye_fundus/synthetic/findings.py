"""Findings per disease (the paper's Table 1): DR, AMD, glaucoma, melanoma."""

from __future__ import annotations

import math

import numpy as np

from eye_fundus.synthetic.anatomy import _draw_polylines, _walks
from eye_fundus.synthetic.geometry import _darken, _mix, _smooth_noise, _splat, _uniform_in_sector

_QUADRANT_ANGLE = {"superior temporal": 135.0, "superior nasal": 45.0,
                   "inferior nasal": -45.0, "inferior temporal": -135.0}
_DR_SECTOR = {"superior": 90.0, "inferior": -90.0, "nasal": 0.0, "temporal": 180.0}


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
