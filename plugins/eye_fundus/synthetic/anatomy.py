"""Per-eye anatomy shared by all visits of one eye: disc position, vessel tree, pigmentation."""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from eye_fundus.synthetic.catalogue import EYES

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
