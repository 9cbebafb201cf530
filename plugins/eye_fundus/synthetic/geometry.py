"""Image-space helpers: the coordinate grid, the field of view, splats and blends."""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image

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
