"""Synthetic medical anomaly-detection benchmark in the release's BMAD folder layout.

The real benchmark (METHOD.md section 6) is large and has to be downloaded; this module draws a
small stand-in procedurally so that a newcomer or CI can run the whole MVFA pipeline on a CPU in
minutes, with a tiny randomly initialised CLIP backbone. Six image families mirror the six
benchmark datasets (same names, same folders, masks for the same three):

    <out>/<Name>_AD/{valid,test}/{good,Ungood}/img/0000.png
    <out>/<Name>_AD/{valid,test}/Ungood/anomaly_mask/0000.png      (Brain, Liver, Retina_RESC)

Every image is drawn from its own ``numpy.random.Generator`` seeded by
``(seed, dataset index, split, label, image index)``, so one seed always writes byte-identical
files, and asking for a subset of datasets or other counts does not change the other images.
Geometry is defined in normalised coordinates (``[-1, 1]`` across the image) so any image size
gives the same picture; only the noise grain and the sharpness of edges are given in pixels.

Anomalies are deliberately large (about 3-15 % of the image) and contrasted: the point is a
benchmark a learning model can visibly solve, not a hard one. Pixel masks cover exactly the
pixels a lesion changed (its soft edge included); image-wide effects drawn after the lesion
(gain, gamma, noise) are applied to normal and abnormal images alike.

Command line::

    python -m dataset.synthetic --out data_synth --seed 0 --size 64 [--datasets Brain Chest]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

__all__ = [
    "SYNTHETIC_DATASETS",
    "SyntheticDataset",
    "brain_image",
    "liver_image",
    "retina_resc_image",
    "retina_oct2017_image",
    "chest_image",
    "histopathology_image",
    "generate_benchmark",
    "main",
]

Sample = tuple[np.ndarray, "np.ndarray | None"]
FamilyFn = Callable[[np.random.Generator, int, bool], Sample]

# ----------------------------------------------------------------------------------------------
# Release layout
# ----------------------------------------------------------------------------------------------
SPLITS = ("valid", "test")
NORMAL_DIR = "good"
ABNORMAL_DIR = "Ungood"
IMAGE_DIR = "img"
MASK_DIR = "anomaly_mask"
MASK_ON = 255
MIN_IMAGE_SIZE = 32  # below this the anatomy (skull ring, retinal layers, nuclei) is sub-pixel
DEFAULT_N_VALID = (12, 12)
DEFAULT_N_TEST = (16, 16)
PARTIAL_SUFFIX = ".partial"  # temporary sibling folders; never match a loader's `*_AD` glob

# Image side the pixel-valued constants below (edge widths, grain, nucleus radii) were tuned at;
# at other sizes they scale with the image so the picture stays the same.
REFERENCE_SIZE = 64
# Width (reference pixels) of the soft ramp at a lesion's border; the mask includes the ramp.
LESION_EDGE_PX = 1.2


# ----------------------------------------------------------------------------------------------
# Drawing helpers
# ----------------------------------------------------------------------------------------------
def _pixel(size: int) -> float:
    """Normalised length of one pixel (the image spans [-1, 1])."""
    return 2.0 / size


def _ref_px(size: int, n_ref_pixels: float) -> float:
    """A length given in reference-size pixels, in pixels of this image."""
    return n_ref_pixels * size / REFERENCE_SIZE


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y down, x right), both in [-1, 1]."""
    c = (np.arange(size, dtype=np.float64) + 0.5) * _pixel(size) - 1.0
    return np.meshgrid(c, c, indexing="ij")


def _pose(rng: np.random.Generator, size: int, shift: float, scale: tuple[float, float],
          max_rot: float) -> tuple[np.ndarray, np.ndarray]:
    """Grid seen through a random similarity transform: the anatomy moves, scales, rotates."""
    yy, xx = _grid(size)
    dy, dx = rng.uniform(-shift, shift, 2)
    s = rng.uniform(*scale)
    a = rng.uniform(-max_rot, max_rot)
    ca, sa = np.cos(a), np.sin(a)
    y0, x0 = yy - dy, xx - dx
    return (ca * y0 - sa * x0) / s, (sa * y0 + ca * x0) / s


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_px: float | Sequence[float]) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to zero mean and unit standard deviation."""
    n = ndimage.gaussian_filter(rng.standard_normal(shape), sigma_px, mode="reflect")
    n -= n.mean()
    return n / (n.std() + 1e-12)


def _harmonics(rng: np.random.Generator, amplitude: float, orders: Sequence[int] = (2, 3, 4, 5)) -> list[tuple[int, float, float]]:
    """Random low-order Fourier terms that make a round outline irregular."""
    return [(k, amplitude * rng.uniform(0.3, 1.0) / (k - 1), rng.uniform(0, 2 * np.pi)) for k in orders]


def _radius_field(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float,
                  angle: float = 0.0, harmonics: Sequence[tuple[int, float, float]] = ()) -> np.ndarray:
    """Elliptical radius: 1 on the (irregular) outline, 0 at the centre."""
    ca, sa = np.cos(angle), np.sin(angle)
    v = (ca * (yy - cy) - sa * (xx - cx)) / ry
    u = (sa * (yy - cy) + ca * (xx - cx)) / rx
    rho = np.hypot(u, v)
    if harmonics:
        theta = np.arctan2(v, u)
        outline = 1.0 + sum(a * np.cos(k * theta + ph) for k, a, ph in harmonics)
        rho = rho / np.maximum(outline, 0.3)
    return rho


def _inside_px(rho: np.ndarray, radius: float, size: int) -> np.ndarray:
    """Approximate signed depth inside a shape, in pixels (> 0 inside), from its radius field."""
    return (1.0 - rho) * radius / _pixel(size)


def _ramp(depth_px: np.ndarray, size: int, edge_ref_px: float = LESION_EDGE_PX) -> np.ndarray:
    """Soft alpha from a depth-inside field: 0 outside, rising to 1 over `edge_ref_px`."""
    return np.clip(depth_px / _ref_px(size, edge_ref_px), 0.0, 1.0)


def _blend(img: np.ndarray, value: np.ndarray | float, alpha: np.ndarray) -> np.ndarray:
    return img * (1.0 - alpha) + value * alpha


def _finish_grey(rng: np.random.Generator, img: np.ndarray, size: int, gain: tuple[float, float],
                 gamma: tuple[float, float], noise: tuple[float, float]) -> np.ndarray:
    """Per-image scanner variation (gain, gamma, grain) and conversion to uint8."""
    img = np.clip(img, 0.0, 1.0) ** rng.uniform(*gamma) * rng.uniform(*gain)
    grain = rng.standard_normal(img.shape) * rng.uniform(*noise)
    grain = ndimage.gaussian_filter(grain, _ref_px(size, 0.35))
    return _to_uint8(img + grain)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def _mask(depth_px: np.ndarray) -> np.ndarray:
    return np.where(depth_px > 0, MASK_ON, 0).astype(np.uint8)


def _ensure_mask(depth_px: np.ndarray, fallback_px: np.ndarray) -> np.ndarray:
    """Depth field of a lesion clipped to its organ; if clipping removed it, keep it unclipped."""
    return depth_px if (depth_px > 0).any() else fallback_px


# ----------------------------------------------------------------------------------------------
# Brain: MRI (FLAIR-like) axial slice
# ----------------------------------------------------------------------------------------------
BRAIN_HEAD_RY = (0.80, 0.90)          # head half-height (normalised)
BRAIN_HEAD_ASPECT = (0.76, 0.88)      # width / height
BRAIN_SKULL = (0.955, 0.885)          # outer and inner skull radius (fractions of the head radius)
BRAIN_SURFACE = 0.86                  # mean brain surface radius
BRAIN_WM_RADIUS = (0.62, 0.72)        # mean grey/white-matter boundary radius
BRAIN_INTENSITY = {"scalp": 0.62, "skull": 0.06, "csf": 0.08, "gm": 0.56, "wm": 0.44}
BRAIN_LESION_RADIUS = (0.21, 0.33)    # image-normalised, so about 3-9 % of the image
BRAIN_BRIGHT_LESION = (0.86, 0.97)    # FLAIR hyperintensity (oedema / tumour)
BRAIN_DARK_LESION = (0.10, 0.20)      # necrosis / resection cavity
BRAIN_P_BRIGHT = 0.7


def brain_image(rng: np.random.Generator, size: int, abnormal: bool) -> Sample:
    """Axial MRI slice: scalp, dark skull, gyrated cortex, white matter, lateral ventricles."""
    yy, xx = _pose(rng, size, shift=0.06, scale=(0.92, 1.04), max_rot=0.15)
    ry = rng.uniform(*BRAIN_HEAD_RY)
    rx = ry * rng.uniform(*BRAIN_HEAD_ASPECT)
    d = _radius_field(yy, xx, 0.0, 0.0, ry, rx, harmonics=_harmonics(rng, 0.025))
    fold = _smooth_noise(rng, (size, size), _ref_px(size, 1.6))
    deep = _smooth_noise(rng, (size, size), _ref_px(size, 3.0))
    brain_r = BRAIN_SURFACE + 0.02 * fold
    wm_r = rng.uniform(*BRAIN_WM_RADIUS) + 0.07 * deep
    I = BRAIN_INTENSITY
    img = np.zeros((size, size))
    img[d < 1.0] = I["scalp"]
    img[d < BRAIN_SKULL[0]] = I["skull"]
    img[d < BRAIN_SKULL[1]] = I["csf"]
    brain = d < brain_r
    img[brain] = I["gm"]
    img[d < wm_r] = I["wm"]
    # Sulci: zero crossings of a smooth field make thin curvy lines; keep them in the cortex.
    sulci = (np.abs(fold) < 0.22) & brain & (d > wm_r - 0.06)
    img[sulci] = I["csf"] + 0.1
    # Lateral ventricles (butterfly) and the interhemispheric fissure, in the head's frame.
    v, u = yy / ry, xx / rx
    vs = rng.uniform(0.75, 1.35)
    for side in (-1.0, 1.0):
        vent = _radius_field(v, u, -0.06, side * 0.13 * vs, 0.30 * vs, 0.075 * vs, angle=-side * 0.32,
                             harmonics=_harmonics(rng, 0.04))
        img[vent < 1.0] = I["csf"]
    img[(np.abs(u - 0.02 * np.sin(3 * v)) < 0.018 + 0.5 * _pixel(size) / rx) & brain & (np.abs(v) > 0.42)] = I["csf"]
    texture = 1.0 + 0.05 * _smooth_noise(rng, (size, size), _ref_px(size, 0.7))
    bias = 1.0 + 0.08 * _smooth_noise(rng, (size, size), size / 4)
    img = ndimage.gaussian_filter(img * texture * bias, _ref_px(size, 0.5))

    mask = None
    if abnormal:
        # Lesion centre somewhere in the parenchyma, clipped to the brain so it never crosses the skull.
        rad, ang = 0.55 * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
        ly, lx = _back_to_image(rad * np.sin(ang) * ry, rad * np.cos(ang) * rx, yy, xx, size)
        r = rng.uniform(*BRAIN_LESION_RADIUS)
        rho = _radius_field(*_grid(size), ly, lx, r * rng.uniform(0.75, 1.0), r, rng.uniform(0, np.pi),
                            _harmonics(rng, 0.18))
        raw = _inside_px(rho, r, size)
        depth = _ensure_mask(np.minimum(raw, (brain_r - d) * ry / _pixel(size)), raw)
        alpha = _ramp(depth, size)
        if rng.uniform() < BRAIN_P_BRIGHT:
            value = rng.uniform(*BRAIN_BRIGHT_LESION) * (1.0 + 0.06 * _smooth_noise(rng, (size, size), _ref_px(size, 1.0)))
            if rng.uniform() < 0.4:  # ring-enhancing tumour with a dark necrotic core
                value = np.where(rho < rng.uniform(0.4, 0.6), rng.uniform(*BRAIN_DARK_LESION), value)
        else:
            value = rng.uniform(*BRAIN_DARK_LESION)
        img = _blend(img, value, alpha)
        mask = _mask(depth)
    return _finish_grey(rng, img, size, gain=(0.85, 1.1), gamma=(0.85, 1.2), noise=(0.015, 0.04)), mask


def _back_to_image(y_anat: float, x_anat: float, yy: np.ndarray, xx: np.ndarray, size: int) -> tuple[float, float]:
    """Image-grid position of the pixel whose anatomical (posed) coordinate is nearest a point."""
    k = int(np.argmin((yy - y_anat) ** 2 + (xx - x_anat) ** 2))
    gy, gx = _grid(size)
    return float(gy.flat[k]), float(gx.flat[k])


# ----------------------------------------------------------------------------------------------
# Liver: contrast CT, axial abdomen
# ----------------------------------------------------------------------------------------------
LIVER_BODY = {"ry": (0.60, 0.72), "rx": (0.86, 0.95)}
LIVER_HU = {"air": 0.0, "fat": 0.24, "muscle": 0.50, "bowel": 0.44, "liver": 0.62, "vessel": 0.82,
            "bone": 0.95, "marrow": 0.70, "kidney": 0.78, "gas": 0.03, "table": 0.35}
LIVER_TUMOUR_RADIUS = (0.16, 0.26)
LIVER_TUMOUR_COUNT = (1, 3)           # inclusive range
LIVER_TUMOUR_VALUE = (0.26, 0.38)     # hypodense against the enhanced parenchyma


def liver_image(rng: np.random.Generator, size: int, abnormal: bool) -> Sample:
    """Abdominal CT slice: fat, muscle wall, liver on the image left, spine, aorta, bowel gas."""
    yy, xx = _pose(rng, size, shift=0.05, scale=(0.93, 1.04), max_rot=0.06)
    H = LIVER_HU
    by, bx = rng.uniform(*LIVER_BODY["ry"]), rng.uniform(*LIVER_BODY["rx"])
    body = _radius_field(yy, xx, 0.0, 0.0, by, bx, harmonics=_harmonics(rng, 0.03))
    fat_t = rng.uniform(0.06, 0.14)
    img = np.full((size, size), H["air"])
    img[np.abs(yy - by - 0.12) < 0.03] = H["table"]
    img[body < 1.0] = H["fat"]
    img[body < 1.0 - fat_t] = H["muscle"]
    inner = body < 1.0 - fat_t - 0.07
    bowel = H["bowel"] + 0.05 * _smooth_noise(rng, (size, size), _ref_px(size, 1.5))
    img[inner] = bowel[inner]
    # Spine (vertebral body + posterior elements), aorta and a kidney, anchored to the body.
    sy = by * 0.62
    vert = _radius_field(yy, xx, sy, 0.0, 0.15, 0.14)
    img[vert < 1.0] = H["bone"]
    img[vert < 0.75] = H["marrow"]
    img[_radius_field(yy, xx, sy + 0.17, 0.0, 0.08, 0.05) < 1.0] = H["bone"]
    img[_radius_field(yy, xx, sy - 0.24, 0.07, 0.065, 0.065) < 1.0] = H["vessel"]
    kid = _radius_field(yy, xx, sy - 0.05, 0.36, 0.16, 0.09, angle=0.4)
    img[kid < 1.0] = H["kidney"]
    img[kid < 0.45] = H["fat"] + 0.1
    # Stomach with gas on the image right.
    gas = _radius_field(yy, xx, -0.25 * by, 0.45, 0.18, 0.22, harmonics=_harmonics(rng, 0.1))
    img[(gas < 1.0) & inner] = H["gas"]
    # Liver: large irregular organ on the image left (the patient's right), clipped to the cavity.
    ly, lx = rng.uniform(-0.18, 0.0) * by, rng.uniform(-0.42, -0.32)
    lr_y, lr_x = rng.uniform(0.42, 0.56), rng.uniform(0.42, 0.52)
    liver_rho = _radius_field(yy, xx, ly, lx, lr_y, lr_x, rng.uniform(-0.3, 0.3), _harmonics(rng, 0.1))
    cavity_px = _inside_px(body, min(by, bx), size) - (fat_t + 0.07) * min(by, bx) / _pixel(size)
    liver_px = np.minimum(_inside_px(liver_rho, min(lr_y, lr_x), size), cavity_px)
    liver = liver_px > 0
    img[liver] = H["liver"]
    vessels = (np.abs(_smooth_noise(rng, (size, size), _ref_px(size, 2.5))) < 0.12) & (liver_px > 2)
    img[vessels] = H["vessel"] - 0.08
    texture = 1.0 + 0.04 * _smooth_noise(rng, (size, size), _ref_px(size, 0.6))
    img = ndimage.gaussian_filter(img * texture, _ref_px(size, 0.5))

    mask = None
    if abnormal:
        gy, gx = _grid(size)
        depth = np.full((size, size), -np.inf)
        # Sample tumour centres among liver pixels well inside the organ.
        inside = np.flatnonzero(liver_px.ravel() > max(liver_px.max() * 0.35, 1.0))
        for _ in range(rng.integers(LIVER_TUMOUR_COUNT[0], LIVER_TUMOUR_COUNT[1] + 1)):
            k = int(inside[rng.integers(len(inside))]) if len(inside) else int(np.argmax(liver_px))
            r = rng.uniform(*LIVER_TUMOUR_RADIUS)
            rho = _radius_field(gy, gx, gy.flat[k], gx.flat[k], r * rng.uniform(0.8, 1.0), r,
                                rng.uniform(0, np.pi), _harmonics(rng, 0.12))
            depth = np.maximum(depth, _inside_px(rho, r, size))
        depth = _ensure_mask(np.minimum(depth, liver_px), depth)
        value = rng.uniform(*LIVER_TUMOUR_VALUE) * (1.0 + 0.08 * _smooth_noise(rng, (size, size), _ref_px(size, 1.2)))
        img = _blend(img, value, _ramp(depth, size, 1.8))
        mask = _mask(depth)
    return _finish_grey(rng, img, size, gain=(0.9, 1.08), gamma=(0.9, 1.15), noise=(0.02, 0.045)), mask


# ----------------------------------------------------------------------------------------------
# Retina OCT (shared B-scan renderer for RESC and OCT2017)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _OctStyle:
    """Look of one OCT device/dataset. Layers are listed from the RPE upwards: (name, thickness
    fraction of the neurosensory retina, reflectivity)."""

    layers: tuple[tuple[str, float, float], ...]
    thickness: tuple[float, float]     # total neurosensory retina thickness (normalised)
    rpe: tuple[float, float]           # RPE thickness, reflectivity
    vitreous: float
    choroid: tuple[float, float]       # reflectivity just below the RPE, decay length
    choroid_texture: float             # contrast of the choroidal vessel pattern
    baseline_y: tuple[float, float]
    tilt: float
    curvature: tuple[float, float]
    speckle_looks: float               # fewer looks = grainier
    fovea: tuple[float, float] | None  # pit depth (fraction of inner layers), width; None = no pit


RESC_STYLE = _OctStyle(
    layers=(("ez", 0.05, 0.80), ("onl", 0.26, 0.30), ("opl", 0.08, 0.58), ("inl", 0.13, 0.36),
            ("ipl_gcl", 0.28, 0.58), ("rnfl", 0.20, 0.80)),
    thickness=(0.72, 0.84), rpe=(0.07, 0.95), vitreous=0.04, choroid=(0.45, 0.22), choroid_texture=0.35,
    baseline_y=(0.36, 0.46), tilt=0.06, curvature=(-0.1, 0.1), speckle_looks=5.0, fovea=None)

OCT2017_STYLE = _OctStyle(
    layers=(("ez", 0.07, 0.90), ("onl", 0.30, 0.28), ("opl", 0.09, 0.62), ("inl", 0.12, 0.35),
            ("ipl_gcl", 0.24, 0.62), ("rnfl", 0.18, 0.92)),
    thickness=(0.34, 0.44), rpe=(0.06, 1.0), vitreous=0.16, choroid=(0.55, 0.10), choroid_texture=0.15,
    baseline_y=(0.14, 0.26), tilt=0.12, curvature=(-0.1, 0.3), speckle_looks=2.5, fovea=(0.85, 0.18))

RESC_FLUID_RX = (0.30, 0.50)
RESC_FLUID_RY = (0.11, 0.18)
RESC_FLUID_VALUE = (0.01, 0.05)
OCT2017_DRUSEN_HEIGHT = (0.12, 0.20)
OCT2017_DRUSEN_WIDTH = (0.14, 0.24)
OCT2017_FLUID_HEIGHT = (0.20, 0.32)
OCT2017_FLUID_WIDTH = (0.35, 0.55)


def _smooth_1d(rng: np.random.Generator, n: int, sigma_px: float) -> np.ndarray:
    s = ndimage.gaussian_filter1d(rng.standard_normal(n), sigma_px, mode="reflect")
    return (s - s.mean()) / (s.std() + 1e-12)


def _dome(x: np.ndarray, centre: float, half_width: float, height: float) -> np.ndarray:
    """Round-topped elevation with steep sides (a druse)."""
    return height * np.sqrt(np.clip(1.0 - ((x - centre) / half_width) ** 2, 0.0, 1.0))


def _swell(x: np.ndarray, centre: float, half_width: float, height: float) -> np.ndarray:
    """Smooth raised-cosine elevation (a fluid-filled detachment)."""
    u = np.clip((x - centre) / half_width, -1.0, 1.0)
    return height * np.cos(0.5 * np.pi * u) ** 2


def _render_oct(rng: np.random.Generator, size: int, style: _OctStyle, lift_rpe: np.ndarray | None = None,
                lift_retina: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Noise-free B-scan and its per-column layer boundaries (y of the RPE top/bottom and ILM).

    `lift_rpe` raises the RPE off Bruch's membrane (drusen); `lift_retina` raises the
    neurosensory retina off the RPE (sub-retinal fluid). Both are per-column heights.
    """
    yy, xx = _grid(size)
    x = xx[0]
    zero = np.zeros(size)
    lift_rpe = zero if lift_rpe is None else lift_rpe
    lift_retina = zero if lift_retina is None else lift_retina
    bruch = (rng.uniform(*style.baseline_y) + rng.uniform(-style.tilt, style.tilt) * x
             + rng.uniform(*style.curvature) * x ** 2 + 0.02 * _smooth_1d(rng, size, _ref_px(size, 10)))
    rpe_bottom = bruch - lift_rpe
    rpe_top = rpe_bottom - style.rpe[0] * (1 + 0.1 * _smooth_1d(rng, size, _ref_px(size, 6)))
    total = rng.uniform(*style.thickness)
    img = np.full((size, size), style.vitreous)
    below = yy >= bruch[None, :]
    depth = yy - bruch[None, :]
    choroid_tex = 1.0 + style.choroid_texture * _smooth_noise(rng, (size, size), (_ref_px(size, 0.8), _ref_px(size, 1.8)))
    img = np.where(below, style.choroid[0] * np.exp(-depth / style.choroid[1]) * choroid_tex, img)
    img = np.where((yy >= rpe_top) & (yy < rpe_bottom), style.rpe[1], img)
    img = np.where((yy >= rpe_bottom) & (yy < bruch), 0.55, img)  # drusen material
    lower = rpe_top - lift_retina
    img = np.where((yy >= lower) & (yy < rpe_top), 0.03, img)       # sub-retinal fluid
    pit = np.ones(size)
    if style.fovea is not None:
        xf = rng.uniform(-0.25, 0.25)
        pit = 1.0 - style.fovea[0] * np.exp(-0.5 * ((x - xf) / (style.fovea[1] * rng.uniform(0.8, 1.2))) ** 2)
    for name, frac, value in style.layers:
        t = frac * total * (1 + 0.12 * _smooth_1d(rng, size, _ref_px(size, 8)))
        if name in ("opl", "inl", "ipl_gcl", "rnfl"):
            t = t * pit
        elif name == "onl":
            t = t * (2.0 - pit * 0.5 - 0.5)  # the outer nuclear layer thickens in the pit
        upper = lower - t
        img = np.where((yy >= upper[None, :]) & (yy < lower[None, :]), value, img)
        lower = upper
    img = ndimage.gaussian_filter(img, _ref_px(size, 0.45))
    return img, {"bruch": bruch, "rpe_top": rpe_top, "ilm": lower}


def _speckle(rng: np.random.Generator, img: np.ndarray, size: int, looks: float, floor: float) -> np.ndarray:
    """Multiplicative OCT speckle, slightly elongated along the scan lines (x)."""
    s = rng.gamma(looks, 1.0 / looks, img.shape)
    s = ndimage.gaussian_filter(s, (_ref_px(size, 0.35), _ref_px(size, 0.8)))
    s /= s.mean()
    return (img + floor) * s


def retina_resc_image(rng: np.random.Generator, size: int, abnormal: bool) -> Sample:
    """Macular OCT B-scan with speckle; anomaly = dark fluid pocket(s) between the layers."""
    style = RESC_STYLE
    img, b = _render_oct(rng, size, style)
    mask = None
    if abnormal:
        yy, xx = _grid(size)
        x = xx[0]
        # Work in retina-relative height t above the RPE so the pocket follows the layers.
        t = b["rpe_top"][None, :] - yy
        thick = b["rpe_top"] - b["ilm"]
        depth = np.full((size, size), -np.inf)
        for i in range(1 if rng.uniform() < 0.6 else 2):
            rx = rng.uniform(*RESC_FLUID_RX) * (0.6 if i else 1.0)
            ry = rng.uniform(*RESC_FLUID_RY) * (0.7 if i else 1.0)
            xc = rng.uniform(-0.55, 0.55)
            col = int(np.clip(np.searchsorted(x, xc), 0, size - 1))
            tc = rng.uniform(0.3, 0.6) * thick[col]
            rho = _radius_field(t, xx, tc, xc, ry, rx, harmonics=_harmonics(rng, 0.08))
            depth = np.maximum(depth, _inside_px(rho, ry, size))
        # Keep the fluid inside the neurosensory retina (above the RPE, below the ILM).
        margin = 0.02
        clip_px = np.minimum(t - margin, (thick[None, :] - margin) - t) / _pixel(size)
        depth = _ensure_mask(np.minimum(depth, clip_px), depth)
        img = _blend(img, rng.uniform(*RESC_FLUID_VALUE), _ramp(depth, size))
        mask = _mask(depth)
    img = _speckle(rng, img, size, style.speckle_looks, floor=0.015)
    return _finish_grey(rng, img, size, gain=(0.85, 1.1), gamma=(0.9, 1.15), noise=(0.01, 0.025)), mask


def retina_oct2017_image(rng: np.random.Generator, size: int, abnormal: bool) -> Sample:
    """Wide-field OCT with a foveal pit and a grainy grey background; anomaly = drusen or fluid."""
    style = OCT2017_STYLE
    x = _grid(size)[1][0]
    lift_rpe = lift_retina = None
    if abnormal:
        if rng.uniform() < 0.5:  # drusen: several domes of the RPE
            lift_rpe = np.zeros(size)
            for _ in range(rng.integers(2, 5)):
                lift_rpe = np.maximum(lift_rpe, _dome(x, rng.uniform(-0.7, 0.7), rng.uniform(*OCT2017_DRUSEN_WIDTH),
                                                      rng.uniform(*OCT2017_DRUSEN_HEIGHT)))
        else:  # sub-retinal fluid lifting the retina (plus intraretinal cysts, drawn below)
            lift_retina = _swell(x, rng.uniform(-0.4, 0.4), rng.uniform(*OCT2017_FLUID_WIDTH),
                                rng.uniform(*OCT2017_FLUID_HEIGHT))
    img, b = _render_oct(rng, size, style, lift_rpe, lift_retina)
    if lift_retina is not None:
        yy, xx = _grid(size)
        t = b["rpe_top"][None, :] - lift_retina[None, :] - yy
        thick = b["rpe_top"] - lift_retina - b["ilm"]
        for _ in range(rng.integers(1, 4)):
            xc = rng.uniform(-0.5, 0.5)
            col = int(np.clip(np.searchsorted(xx[0], xc), 0, size - 1))
            r = rng.uniform(0.06, 0.10)
            rho = _radius_field(t, xx, rng.uniform(0.35, 0.6) * thick[col], xc, r, r * rng.uniform(1.0, 1.8))
            img = _blend(img, 0.03, _ramp(_inside_px(rho, r, size), size))
    img = _speckle(rng, img, size, style.speckle_looks, floor=0.03)
    return _finish_grey(rng, img, size, gain=(0.85, 1.1), gamma=(0.8, 1.1), noise=(0.02, 0.04)), None


# ----------------------------------------------------------------------------------------------
# Chest: frontal radiograph
# ----------------------------------------------------------------------------------------------
CHEST_TISSUE = 0.62
CHEST_LUNG_AIR = 0.42       # how much darker aerated lung is than soft tissue
CHEST_HEART = 0.30
CHEST_RIB = 0.07
CHEST_RIB_SWEEP = 0.8       # how strongly the ribs curve down laterally
CHEST_N_RIBS = 11
# Lobar consolidation: a dense opacity filling a good part of one lung (sometimes a second, smaller
# one). Large enough that image-level (mean-pooled) training on the few-shot support can learn it
# with a tiny random backbone (tests/test_learning.py), while a patch memory of normal images
# cannot simply match it: an opacified lung patch looks like normal soft tissue.
CHEST_OPACITY = (0.40, 0.50)
CHEST_OPACITY_RADIUS = (0.35, 0.45)
CHEST_GAIN = (0.88, 1.1)     # exposure (film density) variation between images
CHEST_GAMMA = (0.85, 1.2)


def _lung_fields(yy: np.ndarray, xx: np.ndarray, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
    """Soft alphas of the two lung fields and of the heart shadow, and the diaphragm level."""
    lungs = np.zeros_like(yy)
    base = rng.uniform(0.50, 0.60)
    for side in (-1.0, 1.0):
        cx = side * rng.uniform(0.38, 0.46)
        rho = _radius_field(yy, xx, rng.uniform(-0.14, -0.06), cx, rng.uniform(0.70, 0.78), rng.uniform(0.28, 0.34),
                            angle=side * 0.08, harmonics=_harmonics(rng, 0.03))
        # Diaphragm: a dome, higher at the lung's middle, with the costophrenic angle laterally.
        dome = base + side * 0.03 - 0.16 * np.clip(1 - ((xx - cx) / 0.34) ** 2, 0, 1)
        inside = np.minimum(_inside_px(rho, 0.3, size), (dome - yy) / _pixel(size))
        inside = np.minimum(inside, (np.abs(xx) - 0.1) / _pixel(size))  # mediastinum
        lungs = np.maximum(lungs, _ramp(inside, size, 2.5))
    # The heart sits low and to the patient's left (image right) and hides the lung behind it.
    heart_rho = _radius_field(yy, xx, base - rng.uniform(0.22, 0.30), rng.uniform(0.10, 0.18), rng.uniform(0.24, 0.3),
                              rng.uniform(0.28, 0.34), angle=-0.35)
    heart = _ramp(_inside_px(heart_rho, 0.26, size), size, 3.0)
    return lungs, heart, base


def chest_image(rng: np.random.Generator, size: int, abnormal: bool) -> Sample:
    """PA chest film: dark lung fields, heart and mediastinum, ribs, clavicles; anomaly = opacities."""
    yy, xx = _pose(rng, size, shift=0.05, scale=(0.94, 1.05), max_rot=0.05)
    # Body outline: the chest fills the film except the corners above the sloping shoulders.
    half_w = rng.uniform(0.98, 1.08) - 0.6 * np.clip((-0.55 - yy) / 0.45, 0, 1) ** 1.5
    body = _ramp((half_w - np.abs(xx)) / _pixel(size), size, 2.0)
    img = 0.06 + (CHEST_TISSUE - 0.06) * body
    lungs, heart, diaphragm = _lung_fields(yy, xx, size, rng)
    lungs = lungs * (1.0 - 0.85 * heart)
    markings = np.clip(_smooth_noise(rng, (size, size), _ref_px(size, 0.8)), 0, None)
    hilum = np.exp(-((np.abs(xx) - 0.18) ** 2 + (yy + 0.05) ** 2) / 0.12)
    periphery = 1.0 - 0.15 * np.clip(np.abs(xx) - 0.3, 0, None) / 0.5
    img = img - CHEST_LUNG_AIR * lungs * periphery * (1.0 - 0.25 * markings * (0.4 + hilum))
    img = img + 0.1 * _ramp((0.09 - np.abs(xx)) / _pixel(size), size, 2.0) * (yy > -0.8)  # spine
    img = img - 0.12 * _ramp((0.03 - np.abs(xx + 0.01)) / _pixel(size), size, 1.0) * (yy < -0.2) * (yy > -0.95)  # trachea
    # Posterior ribs: arcs leaving the spine, rising a little then sweeping down laterally;
    # drawn over the thoracic cage only, faint over soft tissue and clear over aerated lung.
    ax = np.abs(xx)
    spacing = rng.uniform(0.12, 0.14)
    y_first = rng.uniform(-0.86, -0.80)
    ribs = np.zeros_like(yy)
    for k in range(CHEST_N_RIBS):
        y_rib = y_first + k * spacing - 0.15 * ax + CHEST_RIB_SWEEP * ax ** 2
        width = 0.032 + 0.002 * k
        ribs = np.maximum(ribs, _ramp((width - np.abs(yy - y_rib)) / _pixel(size), size, 1.0))
    cage = _ramp((half_w - 0.05 - ax) / _pixel(size), size, 3.0) * _ramp((diaphragm + 0.1 - yy) / _pixel(size), size, 4.0)
    img = img + CHEST_RIB * ribs * cage * (ax > 0.07) * (0.3 + lungs)
    clav_y = -0.80 + 0.25 * (ax - 0.1) - 0.5 * (ax - 0.1) ** 2
    clav = _ramp((0.035 - np.abs(yy - clav_y)) / _pixel(size), size, 1.0) * (ax > 0.08) * (ax < 0.62)
    img = img + 0.14 * clav
    img = ndimage.gaussian_filter(img, _ref_px(size, 0.5))

    if abnormal:
        gy, gx = _grid(size)
        opacity = np.zeros((size, size))
        lung_px = np.flatnonzero(lungs.ravel() > 0.95)
        for i in range(1 if rng.uniform() < 0.6 else 2):
            k = int(lung_px[rng.integers(len(lung_px))])
            r = rng.uniform(*CHEST_OPACITY_RADIUS) * (0.75 if i else 1.0)
            rho = _radius_field(gy, gx, gy.flat[k], gx.flat[k], r * rng.uniform(1.0, 1.4), r, rng.uniform(-0.4, 0.4),
                                _harmonics(rng, 0.2))
            patchy = 0.8 + 0.2 * _smooth_noise(rng, (size, size), _ref_px(size, 2.0))
            opacity = np.maximum(opacity, _ramp(_inside_px(rho, r, size), size, 4.0) * patchy)
        # Consolidation fills the airspace: it whitens lung, not the mediastinum.
        lung_img = ndimage.gaussian_filter(lungs, _ref_px(size, 0.5))
        img = img + rng.uniform(*CHEST_OPACITY) * opacity * np.clip(lung_img * 1.3, 0, 1)
    vignette = 1.0 - 0.12 * (xx ** 2 + yy ** 2)
    return _finish_grey(rng, img * vignette, size, gain=CHEST_GAIN, gamma=CHEST_GAMMA, noise=(0.01, 0.03)), None


# ----------------------------------------------------------------------------------------------
# Histopathology: H&E tile (lymph node / breast tissue look)
# ----------------------------------------------------------------------------------------------
# Optical-density stain vectors (R, G, B absorbance per unit stain).
HE_HEMATOXYLIN = np.array([0.65, 0.70, 0.29])
HE_EOSIN = np.array([0.07, 0.99, 0.11])
HISTO_NUCLEI_PER_REF_TILE = (45, 75)   # normal nuclei per 64 x 64 reference tile
HISTO_NUCLEUS_RADIUS = (1.4, 2.3)      # reference pixels
HISTO_TUMOUR_RADIUS = (0.36, 0.46)     # cluster radius, normalised (about 8-15 % of the tile)
HISTO_ATYPICAL_RADIUS = (2.2, 3.2)     # reference pixels
HISTO_ATYPICAL_STAIN = (1.7, 2.3)
HISTO_ATYPICAL_SPACING = 1.6           # centre spacing in units of the atypical radius (crowding)
HISTO_TUMOUR_HEMATOXYLIN = 0.42        # diffuse hematoxylin of the cluster's cytoplasm
HISTO_HEMATOXYLIN_STRENGTH = (0.9, 1.2)  # per-slide staining strength


def _stamp_nuclei(canvas: np.ndarray, rng: np.random.Generator, centres: np.ndarray, radii: np.ndarray,
                  stain: np.ndarray, irregularity: float, size: int) -> None:
    """Draw filled, slightly elongated nuclei (in pixel units) into a hematoxylin map (max-combine)."""
    edge = _ref_px(size, 0.8)
    for (cy, cx), r, h in zip(centres, radii, stain):
        ext = int(np.ceil(r * 1.8 + 2 * edge))
        y0, y1 = max(int(cy) - ext, 0), min(int(cy) + ext + 1, size)
        x0, x1 = max(int(cx) - ext, 0), min(int(cx) + ext + 1, size)
        if y0 >= y1 or x0 >= x1:
            continue
        ly, lx = np.mgrid[y0:y1, x0:x1] + 0.5
        rho = _radius_field(ly, lx, cy, cx, r * rng.uniform(0.6, 1.0), r, rng.uniform(0, np.pi),
                            _harmonics(rng, irregularity) if irregularity else ())
        alpha = np.clip((1.0 - rho) * r / edge, 0.0, 1.0)
        chromatin = 1.0 + 0.15 * rng.standard_normal(alpha.shape)
        np.maximum(canvas[y0:y1, x0:x1], h * alpha * chromatin, out=canvas[y0:y1, x0:x1])


def histopathology_image(rng: np.random.Generator, size: int, abnormal: bool) -> Sample:
    """H&E tile: pink collagen/cytoplasm, white spaces, small purple nuclei; anomaly = tumour cluster."""
    yy, xx = _grid(size)
    theta = rng.uniform(0, np.pi)
    warp = _smooth_noise(rng, (size, size), _ref_px(size, 4.0))
    proj = (np.cos(theta) * xx + np.sin(theta) * yy) / _pixel(size) * (REFERENCE_SIZE / size)
    fibres = np.sin(proj * rng.uniform(0.6, 1.0) + 2.5 * warp)
    eosin = 0.55 + 0.13 * fibres + 0.1 * _smooth_noise(rng, (size, size), _ref_px(size, 1.0))
    lumen_field = _smooth_noise(rng, (size, size), _ref_px(size, 4.0))
    lumen = ndimage.gaussian_filter((lumen_field > rng.uniform(1.2, 1.8)).astype(float), _ref_px(size, 0.6))
    hema = np.full((size, size), 0.06)

    tumour = np.zeros((size, size))
    if abnormal:
        cy, cx = rng.uniform(-0.55, 0.55, 2)
        r = rng.uniform(*HISTO_TUMOUR_RADIUS)
        rho = _radius_field(yy, xx, cy, cx, r * rng.uniform(0.8, 1.0), r, rng.uniform(0, np.pi), _harmonics(rng, 0.15))
        tumour = _ramp(_inside_px(rho, r, size), size, 2.0)
        lumen = lumen * (1 - tumour)
        eosin = _blend(eosin, 0.35, tumour)          # denser, amphophilic cytoplasm
        hema = _blend(hema, HISTO_TUMOUR_HEMATOXYLIN, tumour)

    # Normal nuclei: Poisson count, uniform positions, none in white spaces or inside the tumour.
    n = rng.poisson(rng.uniform(*HISTO_NUCLEI_PER_REF_TILE) * (size / REFERENCE_SIZE) ** 2)
    centres = rng.uniform(0, size, (n, 2))
    keep = [i for i, (y, x) in enumerate(centres)
            if lumen[int(y), int(x)] < 0.3 and tumour[int(y), int(x)] < 0.2]
    radii = _ref_px(size, 1.0) * rng.uniform(*HISTO_NUCLEUS_RADIUS, n)
    stain = rng.uniform(0.85, 1.25, n)
    _stamp_nuclei(hema, rng, centres[keep], radii[keep], stain[keep], 0.0, size)
    if abnormal:
        # Crowded, enlarged, hyperchromatic, pleomorphic nuclei on a jittered lattice over the cluster.
        step = HISTO_ATYPICAL_SPACING * _ref_px(size, np.mean(HISTO_ATYPICAL_RADIUS))
        ly, lx = np.mgrid[0:size:step, 0:size:step]
        pts = np.stack([ly.ravel(), lx.ravel()], 1) + rng.uniform(-0.45, 0.45, (ly.size, 2)) * step
        pts = pts[(pts >= 0).all(1) & (pts < size).all(1)]
        pts = pts[[tumour[int(y), int(x)] > 0.5 for y, x in pts]]
        big = _ref_px(size, 1.0) * rng.uniform(*HISTO_ATYPICAL_RADIUS, len(pts))
        _stamp_nuclei(hema, rng, pts, big, rng.uniform(*HISTO_ATYPICAL_STAIN, len(pts)), 0.25, size)

    eosin = eosin * (1 - lumen)
    hema = hema * (1 - 0.9 * lumen)
    # Beer-Lambert colour mixing with per-slide stain strength and hue jitter.
    h_vec = HE_HEMATOXYLIN * rng.uniform(0.85, 1.15, 3)
    e_vec = HE_EOSIN * rng.uniform(0.85, 1.15, 3)
    od = (hema[..., None] * h_vec * rng.uniform(*HISTO_HEMATOXYLIN_STRENGTH) + eosin[..., None] * e_vec * rng.uniform(0.45, 0.65))
    rgb = np.exp(-od) * rng.uniform(0.92, 1.0)
    rgb = ndimage.gaussian_filter(rgb, (_ref_px(size, 0.5), _ref_px(size, 0.5), 0))
    rgb = rgb + rng.standard_normal(rgb.shape) * rng.uniform(0.01, 0.025)
    return _to_uint8(rgb), None


# ----------------------------------------------------------------------------------------------
# Dataset table, writer, command line
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SyntheticDataset:
    """One synthetic dataset: its benchmark name, whether it has pixel masks, and its generator."""

    name: str
    has_masks: bool
    description: str
    generate: FamilyFn = field(repr=False, compare=False)

    @property
    def folder(self) -> str:
        return f"{self.name}_AD"


SYNTHETIC_DATASETS: tuple[SyntheticDataset, ...] = (
    SyntheticDataset("Brain", True, "MRI axial slice; bright/dark lesion blobs", brain_image),
    SyntheticDataset("Liver", True, "CT abdomen; hypodense tumours in the liver", liver_image),
    SyntheticDataset("Retina_RESC", True, "layered OCT B-scan; dark fluid pockets", retina_resc_image),
    SyntheticDataset("Retina_OCT2017", False, "OCT with foveal pit; drusen or fluid", retina_oct2017_image),
    SyntheticDataset("Chest", False, "chest radiograph; lung opacities", chest_image),
    SyntheticDataset("Histopathology", False, "H&E tile; atypical nuclear cluster", histopathology_image),
)
_BY_NAME = {d.name: d for d in SYNTHETIC_DATASETS}


def _check_counts(label: str, counts: tuple[int, int]) -> tuple[int, int]:
    try:
        normal, abnormal = (int(c) for c in counts)
    except (TypeError, ValueError):
        raise ValueError(f"{label} must be a pair (normal, abnormal) of counts, got {counts!r}") from None
    if normal < 0 or abnormal < 0:
        raise ValueError(f"{label} counts must be >= 0, got {counts!r}")
    return normal, abnormal


def _save_png(array: np.ndarray, path: Path) -> None:
    """Grey images go out as grey-looking RGB, like the release; masks as mode L."""
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    Image.fromarray(np.ascontiguousarray(array)).save(path, format="PNG", compress_level=6)


def _write_dataset(root: Path, spec: SyntheticDataset, ds_index: int, seed: int, size: int,
                   counts: dict[str, tuple[int, int]]) -> None:
    for split_index, split in enumerate(SPLITS):
        for label, (sub, n) in enumerate(((NORMAL_DIR, counts[split][0]), (ABNORMAL_DIR, counts[split][1]))):
            img_dir = root / split / sub / IMAGE_DIR
            img_dir.mkdir(parents=True)
            mask_dir = root / split / sub / MASK_DIR
            if label and spec.has_masks:
                mask_dir.mkdir()
            for i in range(n):
                rng = np.random.default_rng([seed, ds_index, split_index, label, i])
                image, mask = spec.generate(rng, size, bool(label))
                name = f"{i:04d}.png"
                _save_png(image, img_dir / name)
                if label and spec.has_masks:
                    if mask is None or not mask.any():
                        raise RuntimeError(f"{spec.name} generator returned no anomaly for an abnormal image")
                    Image.fromarray(mask, mode="L").save(mask_dir / name, format="PNG", compress_level=6)


def _count_existing(root: Path) -> dict[str, dict[str, int]]:
    out = {}
    for split in SPLITS:
        out[split] = {key: sum(1 for p in (root / split / sub / IMAGE_DIR).glob("*") if p.is_file())
                      if (root / split / sub / IMAGE_DIR).is_dir() else 0
                      for key, sub in (("normal", NORMAL_DIR), ("abnormal", ABNORMAL_DIR))}
    return out


def generate_benchmark(out_dir: str | os.PathLike[str], *, seed: int = 0, image_size: int = REFERENCE_SIZE,
                       n_valid: tuple[int, int] = DEFAULT_N_VALID, n_test: tuple[int, int] = DEFAULT_N_TEST,
                       datasets: Sequence[str] | None = None, overwrite: bool = False) -> dict[str, dict]:
    """Write the synthetic benchmark under `out_dir` and return what is there, per dataset.

    Each dataset is drawn into a hidden temporary sibling folder and renamed into place only
    when complete, so an interrupted run never leaves a `<Name>_AD` folder that looks finished.
    A dataset whose folder already exists is left untouched (and reported with ``written``
    False) unless `overwrite` is set.

    Returns ``{name: {"has_masks", "written", "path", "valid": {"normal", "abnormal"},
    "test": {...}}}`` with the counts of images on disk.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be an integer >= {MIN_IMAGE_SIZE}, got {image_size!r}")
    counts = {"valid": _check_counts("n_valid", n_valid), "test": _check_counts("n_test", n_test)}
    names = [d.name for d in SYNTHETIC_DATASETS] if datasets is None else list(dict.fromkeys(datasets))
    unknown = [n for n in names if n not in _BY_NAME]
    if unknown:
        raise ValueError(f"unknown synthetic dataset(s) {unknown}; choose from {list(_BY_NAME)}")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, dict] = {}
    for name in names:
        spec = _BY_NAME[name]
        ds_index = SYNTHETIC_DATASETS.index(spec)
        final = out / spec.folder
        written = False
        if overwrite or not final.exists():
            tmp = Path(tempfile.mkdtemp(prefix=f".{spec.folder}.", suffix=PARTIAL_SUFFIX, dir=out))
            try:
                _write_dataset(tmp, spec, ds_index, int(seed), int(image_size), counts)
                if final.exists():
                    # A directory cannot be renamed onto a non-empty one: move the old aside first.
                    old = Path(tempfile.mkdtemp(prefix=f".{spec.folder}.old.", suffix=PARTIAL_SUFFIX, dir=out))
                    os.replace(final, old / spec.folder)
                    os.replace(tmp, final)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.replace(tmp, final)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
            written = True
        result[name] = {"has_masks": spec.has_masks, "written": written, "path": str(final), **_count_existing(final)}
    return result


def _size_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < MIN_IMAGE_SIZE:
        raise argparse.ArgumentTypeError(f"must be >= {MIN_IMAGE_SIZE}, got {value}")
    return value


def _count_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dataset.synthetic",
                                description="Write a small synthetic medical anomaly-detection benchmark "
                                            "in the BMAD folder layout.")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--seed", type=_count_arg, default=0, help="random seed (default 0)")
    p.add_argument("--size", type=_size_arg, default=REFERENCE_SIZE, help="image side in pixels (default 64)")
    p.add_argument("--datasets", nargs="+", choices=[d.name for d in SYNTHETIC_DATASETS], metavar="NAME",
                   help="subset to write (default: all six): " + ", ".join(d.name for d in SYNTHETIC_DATASETS))
    p.add_argument("--n-valid", nargs=2, type=_count_arg, default=list(DEFAULT_N_VALID), metavar=("NORMAL", "ABNORMAL"))
    p.add_argument("--n-test", nargs=2, type=_count_arg, default=list(DEFAULT_N_TEST), metavar=("NORMAL", "ABNORMAL"))
    p.add_argument("--overwrite", action="store_true", help="rewrite datasets that already exist")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    result = generate_benchmark(args.out, seed=args.seed, image_size=args.size, n_valid=tuple(args.n_valid),
                                n_test=tuple(args.n_test), datasets=args.datasets, overwrite=args.overwrite)
    header = ("dataset", "masks", "valid N/A", "test N/A", "status")
    rows = [(name, "yes" if r["has_masks"] else "no", f"{r['valid']['normal']}/{r['valid']['abnormal']}",
             f"{r['test']['normal']}/{r['test']['abnormal']}", "written" if r["written"] else "exists, skipped")
            for name, r in result.items()]
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    print(f"-> {Path(args.out).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
