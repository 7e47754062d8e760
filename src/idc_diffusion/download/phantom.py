"""Phantom pixels for the synthetic series: a *tissue label map* per body part (an int array)
and per-modality renderers from tissue to stored values (CT Hounsfield units, MR
intensities, radiograph attenuation). Pure functions, deterministic given their generator.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from enum import IntEnum
from typing import Any

import numpy as np


class Tissue(IntEnum):
    """Tissue classes of the phantoms (values index the lookup tables below)."""

    AIR = 0
    FAT = 1
    SOFT = 2
    MUSCLE = 3
    LUNG = 4
    VESSEL = 5
    BONE = 6
    MARROW = 7
    GRAY = 8
    WHITE = 9
    CSF = 10
    LIVER = 11
    KIDNEY = 12


def _lut(values: Mapping[Tissue, float]) -> np.ndarray:
    """A lookup table indexed by Tissue (tissues not given: 0)."""
    table = np.zeros(len(Tissue), dtype=np.float64)
    for tissue, value in values.items():
        table[tissue] = value
    return table


T = Tissue
CT_HU = _lut({T.AIR: -1000, T.FAT: -100, T.SOFT: 40, T.MUSCLE: 50, T.LUNG: -850,
              T.VESSEL: 40, T.BONE: 900, T.MARROW: 300, T.GRAY: 40, T.WHITE: 30,
              T.CSF: 5, T.LIVER: 60, T.KIDNEY: 35})  # fmt: skip
MR_T1 = _lut({T.AIR: 0, T.FAT: 1400, T.SOFT: 600, T.MUSCLE: 450, T.LUNG: 40,
              T.VESSEL: 150, T.BONE: 60, T.MARROW: 1100, T.GRAY: 650, T.WHITE: 950,
              T.CSF: 180, T.LIVER: 700, T.KIDNEY: 550})  # fmt: skip
MU_REL = _lut({T.AIR: 0.0, T.FAT: 0.9, T.SOFT: 1.0, T.MUSCLE: 1.05, T.LUNG: 0.2,
               T.VESSEL: 1.0, T.BONE: 2.2, T.MARROW: 1.3, T.GRAY: 1.0, T.WHITE: 1.0,
               T.CSF: 1.0, T.LIVER: 1.05, T.KIDNEY: 1.03})  # fmt: skip

REGIONS = {
    "chest": ("CHEST", "LUNG", "THORAX", "CHESTABDOMEN", "CHEST_TO_PELVIS"),
    "head": ("HEAD", "BRAIN", "SKULL", "HEADNECK", "HEAD AND NECK"),
    "abdomen": ("ABDOMEN", "ABDOMENPELVIS", "LIVER", "KIDNEY", "PANCREAS", "PELVIS"),
    "breast": ("BREAST",),
}
# (field of view in mm, z extent in mm)
GEOMETRY = {"head": (230.0, 150.0), "chest": (350.0, 300.0), "abdomen": (350.0, 250.0)}
DEFAULT_GEOMETRY = (350.0, 200.0)


# ---------------------------------------------------------------- small helpers


def region_of(body_part: str | None, description: str | None = None) -> str:
    """Map BodyPartExamined (falling back to SeriesDescription) to a phantom region."""
    for text in (body_part, description):
        key = (text or "").upper()
        for region, names in REGIONS.items():
            if any(name in key for name in names):
                return region
    return "generic"


def series_rng(seed: int, series_uid: str, *extra: int) -> np.random.Generator:
    """A random generator determined by seed, SeriesInstanceUID and extra integers."""
    digest = int.from_bytes(hashlib.sha256(series_uid.encode()).digest()[:8], "little")
    return np.random.default_rng([int(seed), digest, *extra])


def grid(n: int, fov_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x right, y down/posterior) in mm of an n x n image."""
    axis = (np.arange(n) - (n - 1) / 2) * (fov_mm / n)
    return np.meshgrid(axis, axis, indexing="xy")


def ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float) -> np.ndarray:
    """Boolean mask of the ellipse centred at (cx, cy) with semi-axes a, b (mm)."""
    if a <= 0 or b <= 0:
        return np.zeros(np.broadcast(x, y).shape, dtype=bool)
    return ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 <= 1.0


def box_blur(image: np.ndarray, radius: int = 1) -> np.ndarray:
    """Mean filter over a (2r+1)^2 window, edges replicated (softens label boundaries)."""
    if radius < 1:
        return image.astype(np.float64)
    padded = np.pad(image.astype(np.float64), radius, mode="edge")
    out = np.zeros(image.shape, dtype=np.float64)
    size = 2 * radius + 1
    for dy in range(size):
        for dx in range(size):
            out += padded[dy : dy + image.shape[0], dx : dx + image.shape[1]]
    return out / size**2


def _bump(t: float, lo: float, hi: float) -> float:
    """0 outside [lo, hi], rising smoothly to 1 in the middle (sine arch)."""
    if t <= lo or t >= hi:
        return 0.0
    return math.sin(math.pi * (t - lo) / (hi - lo))


# ---------------------------------------------------------------- tissue label maps


def body_labels(
    x: np.ndarray, y: np.ndarray, a: float, b: float, fat_mm: float = 12.0
) -> np.ndarray:
    """Generic trunk cross-section: fat rim around muscle/soft tissue, air outside."""
    labels = np.full(x.shape, Tissue.AIR, dtype=np.int8)
    labels[ellipse(x, y, 0, 0, a, b)] = Tissue.FAT
    labels[ellipse(x, y, 0, 0, a - fat_mm, b - fat_mm)] = Tissue.MUSCLE
    labels[ellipse(x, y, 0, 0, a - 2.5 * fat_mm, b - 2.5 * fat_mm)] = Tissue.SOFT
    return labels


def add_spine(labels: np.ndarray, x: np.ndarray, y: np.ndarray, cy: float, r: float) -> None:
    """Vertebral body (cortex + marrow) and spinous process, posterior midline (in place)."""
    labels[ellipse(x, y, 0, cy, r, r * 0.9)] = Tissue.BONE
    labels[ellipse(x, y, 0, cy, r * 0.7, r * 0.6)] = Tissue.MARROW
    labels[ellipse(x, y, 0, cy + 1.6 * r, r * 0.3, r * 0.7)] = Tissue.BONE


def chest_labels(x: np.ndarray, y: np.ndarray, t: float, params: Mapping[str, Any]) -> np.ndarray:
    """Axial chest slice at relative height t (0 = lung bases, 1 = apices)."""
    s = params["scale"]
    a, b = 160 * s * (1 - 0.25 * max(t - 0.85, 0)), 115 * s
    labels = body_labels(x, y, a, b)
    lung = _bump(t, -0.05, 1.05)
    for side in (-1, 1):  # patient right lung is image left (side -1)
        la, lb = 55 * s * lung**0.5, 80 * s * lung**0.5
        labels[ellipse(x, y, side * 62 * s, -5 * s, la, lb)] = Tissue.LUNG
    for vx, vy, vr in params["vessels"]:  # pulmonary vessels, only where there is lung
        inside = ellipse(x, y, vx * s, vy * s, vr * (0.5 + lung), vr * (0.5 + lung))
        labels[inside & (labels == Tissue.LUNG)] = Tissue.VESSEL
    heart = _bump(t, 0.0, 0.65)
    labels[ellipse(x, y, 18 * s, -25 * s, 45 * s * heart, 38 * s * heart)] = Tissue.SOFT
    labels[ellipse(x, y, -10 * s, -20 * s, 12 * s, 12 * s)] = Tissue.VESSEL  # aorta
    for k in range(-3, 4):  # ribs: oblique, so each cuts a slice only over some heights
        if math.sin(2 * math.pi * (9 * t + 0.12 * abs(k))) < -0.2:
            continue
        angle = math.pi / 2 + k * 0.42
        rx, ry = (a - 22) * math.cos(angle), (b - 18) * math.sin(angle)
        for sx in (rx, -rx):
            labels[ellipse(x, y, sx, -ry, 6 * s, 4 * s)] = Tissue.BONE
    labels[ellipse(x, y, 0, -(b - 16), 10 * s, 5 * s)] = Tissue.BONE  # sternum
    add_spine(labels, x, y, cy=(b - 38) * 0.95, r=17 * s)
    return labels


def head_labels(x: np.ndarray, y: np.ndarray, t: float, params: Mapping[str, Any]) -> np.ndarray:
    """Axial head slice at relative height t (0 = skull base, 1 = vertex)."""
    s = params["scale"] * max(math.sqrt(max(1 - (1.15 * t - 0.1) ** 2, 0.0)), 0.15)
    labels = np.full(x.shape, Tissue.AIR, dtype=np.int8)
    a, b = 75 * s, 92 * s
    labels[ellipse(x, y, 0, 0, a, b)] = Tissue.FAT  # scalp
    labels[ellipse(x, y, 0, 0, a - 4, b - 4)] = Tissue.BONE  # skull
    labels[ellipse(x, y, 0, 0, a - 10, b - 10)] = Tissue.CSF  # subarachnoid space
    labels[ellipse(x, y, 0, 0, a - 12, b - 12)] = Tissue.GRAY
    labels[ellipse(x, y, 0, 0, a - 19, b - 19)] = Tissue.WHITE
    vent = _bump(t, 0.3, 0.8)
    for side in (-1, 1):
        labels[ellipse(x, y, side * 9 * s, -8 * s, 6 * s * vent, 26 * s * vent)] = Tissue.CSF
    deep = _bump(t, 0.2, 0.6)  # basal ganglia / thalami
    for side in (-1, 1):
        labels[ellipse(x, y, side * 20 * s, 8 * s, 9 * s * deep, 12 * s * deep)] = Tissue.GRAY
    return labels


def abdomen_labels(x: np.ndarray, y: np.ndarray, t: float, params: Mapping[str, Any]) -> np.ndarray:
    """Axial abdominal slice at relative height t (0 = pelvis, 1 = diaphragm)."""
    s = params["scale"]
    a, b = 165 * s, 120 * s
    labels = body_labels(x, y, a, b, fat_mm=18.0)
    liver = _bump(t, 0.35, 1.3)
    labels[ellipse(x, y, -60 * s, -15 * s, 75 * s * liver, 65 * s * liver)] = Tissue.LIVER
    kidney = _bump(t, 0.2, 0.7)
    for side in (-1, 1):
        labels[ellipse(x, y, side * 65 * s, 45 * s, 22 * s * kidney, 32 * s * kidney)] = (
            Tissue.KIDNEY
        )
    labels[ellipse(x, y, 35 * s * (1 - t), 0, 30 * s, 25 * s)] = Tissue.SOFT  # bowel
    labels[ellipse(x, y, 12 * s, 35 * s, 10 * s, 10 * s)] = Tissue.VESSEL  # aorta
    add_spine(labels, x, y, cy=70 * s, r=20 * s)
    return labels


def generic_labels(x: np.ndarray, y: np.ndarray, t: float, params: Mapping[str, Any]) -> np.ndarray:
    """A body ellipse with a central bone, varying slowly along z."""
    s = params["scale"] * (0.9 + 0.1 * math.cos(2 * math.pi * t))
    labels = body_labels(x, y, 150 * s, 110 * s)
    labels[ellipse(x, y, 0, 20 * s, 18 * s, 16 * s)] = Tissue.BONE
    labels[ellipse(x, y, 0, 20 * s, 11 * s, 9 * s)] = Tissue.MARROW
    return labels


LABELERS = {
    "chest": chest_labels,
    "head": head_labels,
    "abdomen": abdomen_labels,
    "breast": generic_labels,
    "generic": generic_labels,
}


def phantom_params(rng: np.random.Generator) -> dict[str, Any]:
    """Per-series anatomical variation: overall size and pulmonary vessel positions."""
    vessels = []
    for side in (-1, 1):
        for _ in range(14):
            vessels.append(
                (side * rng.uniform(25, 95), rng.uniform(-70, 60), float(rng.uniform(1.5, 4.0)))
            )
    return {"scale": float(rng.uniform(0.88, 1.08)), "vessels": vessels}


# ---------------------------------------------------------------- modality renderers


def ct_slice(labels: np.ndarray, rng: np.random.Generator, noise_hu: float = 12.0) -> np.ndarray:
    """Hounsfield units of a label map, softened edges plus Gaussian noise (float)."""
    hu = box_blur(CT_HU[labels], 1)
    return np.clip(hu + rng.normal(0, noise_hu, hu.shape), -1024, 3071)


def mr_slice(labels: np.ndarray, rng: np.random.Generator, bias: float = 0.15) -> np.ndarray:
    """T1-like MR magnitudes (0..~2000) with a smooth coil bias field and Rician-ish noise."""
    n = labels.shape[0]
    ramp = np.linspace(-1, 1, n)
    field = 1 + bias * np.add.outer(ramp * rng.uniform(-1, 1), ramp * rng.uniform(-1, 1))
    signal = box_blur(MR_T1[labels], 1) * field
    noisy = np.hypot(signal + rng.normal(0, 15, signal.shape), rng.normal(0, 15, signal.shape))
    return np.clip(noisy, 0, 4095)


def chest_radiograph(
    n: int, fov_mm: float, params: Mapping[str, Any], rng: np.random.Generator, depth: int = 48
) -> np.ndarray:
    """PA chest projection: attenuation line integrals of the 3D chest phantom (0..1)."""
    axis = (np.arange(n) - (n - 1) / 2) * (fov_mm / n)
    yy = np.linspace(-130, 130, depth)
    x, y = np.meshgrid(axis, yy, indexing="xy")  # one coronal row: x across, y front-back
    rows = []
    for t in np.linspace(1.25, -0.35, n):  # image top = cranial
        labels = chest_labels(x, y, float(t), params)
        if t > 1.05:  # neck/shoulders above the thorax: narrower soft tissue column
            labels[np.abs(x) > 160 * (1.35 - t)] = Tissue.AIR
        rows.append(MU_REL[labels].sum(axis=0))
    path = box_blur(np.asarray(rows), 1)
    path = path / max(float(path.max()), 1e-6)
    return np.clip(path + rng.normal(0, 0.01, path.shape), 0, 1)


def generic_radiograph(
    n: int, fov_mm: float, params: Mapping[str, Any], rng: np.random.Generator
) -> np.ndarray:
    """A drawn 2D projection: soft-tissue column with a long bone (0..1)."""
    x, y = grid(n, fov_mm)
    s = params["scale"]
    image = 0.45 * ellipse(x, y, 0, 0, 120 * s, 170 * s).astype(float)
    image += 0.4 * ellipse(x, y, 0, 0, 22 * s, 160 * s)
    image -= 0.15 * ellipse(x, y, 0, 0, 10 * s, 150 * s)
    return np.clip(box_blur(image, 2) + rng.normal(0, 0.01, image.shape), 0, 1)


def mammogram(n: int, rng: np.random.Generator) -> np.ndarray:
    """Half-ellipse breast against the chest wall with blobby fibroglandular tissue (0..1)."""
    x, y = grid(n, 2.0)  # unit square coordinates
    breast = ellipse(x, y, -1.0, 0, 1.6, 0.85)
    dense = np.zeros(x.shape)
    for _ in range(40):
        cx, cy = rng.uniform(-1, 0.3), rng.uniform(-0.6, 0.6)
        dense += 0.08 * ellipse(x, y, cx, cy, *rng.uniform(0.04, 0.2, 2))
    image = breast * (0.35 + np.minimum(dense, 0.5)) + 0.02
    return np.clip(box_blur(image, 2) + rng.normal(0, 0.01, image.shape), 0, 1)
