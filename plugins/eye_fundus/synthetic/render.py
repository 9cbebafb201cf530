"""Rendering of one image: framing, optic disc, findings, camera nuisances."""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageFilter

from eye_fundus.synthetic.anatomy import _eye_anatomy
from eye_fundus.synthetic.findings import _findings
from eye_fundus.synthetic.geometry import _FOV_RADIUS, _Frame, _darken, _grid, _mix, _smooth_noise, _splat

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
