"""Procedural fundus-like images whose diabetic-retinopathy grade is purely local.

Each image is a *scene* (retina disc on a dark background, illumination, vessels,
optic disc, macula, texture) plus *lesions* (microaneurysm dots, haemorrhage blots,
hard-exudate specks). The scene comes from its own random stream and never depends
on the grade; only the number and size of lesions grow with grade. Global colour and
brightness vary far more between scenes than lesions can move them, so the task is
local texture, as it is for real fundus photographs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from transfusion.data.seeds import render_split
from transfusion.data.seeds import stream as _stream

GRADE_NAMES = ("none", "mild", "moderate", "severe", "proliferative")
# Grade frequencies loosely follow EyePACS, with the rare grades boosted so that
# small training subsets still hold every grade.
GRADE_PROBABILITIES = (0.45, 0.12, 0.22, 0.11, 0.10)
GENERATOR_VERSION = "2"


@dataclass(frozen=True)
class LesionLoad:
    """Ranges (inclusive) of lesion counts for one grade."""

    microaneurysms: tuple[int, int]
    haemorrhages: tuple[int, int]
    exudates: tuple[int, int]


LESIONS_BY_GRADE: tuple[LesionLoad, ...] = (
    LesionLoad((0, 0), (0, 0), (0, 0)),
    LesionLoad((1, 3), (0, 0), (0, 0)),
    LesionLoad((2, 6), (0, 2), (0, 1)),
    LesionLoad((4, 9), (1, 4), (1, 4)),
    LesionLoad((6, 14), (3, 8), (3, 8)),
)

# Lesion size (gaussian sigma as a fraction of the image side) and colour pull.
_MICROANEURYSM = (0.010, np.array([0.35, 0.04, 0.03]), 0.70)
_HAEMORRHAGE = (0.020, np.array([0.30, 0.03, 0.02]), 0.80)
_EXUDATE = (0.009, np.array([1.00, 0.92, 0.45]), 0.70)
# Pigment spots: lesion-sized, darker and browner, in every grade's scenes, so that
# "count the dark dots" is not enough: the colour and shape of a spot matter.
_PIGMENT = (0.011, np.array([0.22, 0.12, 0.06]), 0.65)


def render_scene(resolution: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:
    """Renders a lesion-free fundus; returns (rgb float image, retina mask, geometry)."""
    n = resolution
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64) / n
    cx, cy = 0.5 + rng.uniform(-0.03, 0.03, size=2)
    radius = rng.uniform(0.44, 0.48)
    r = np.hypot(xx - cx, yy - cy) / radius
    mask = r < 1.0

    base = np.array([rng.uniform(0.62, 0.85), rng.uniform(0.24, 0.40), rng.uniform(0.07, 0.17)])
    angle = rng.uniform(0, 2 * np.pi)
    gradient = 1.0 + rng.uniform(0.05, 0.25) * ((xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)) / radius
    vignette = 1.0 - rng.uniform(0.2, 0.45) * r**2
    brightness = rng.uniform(0.65, 1.15)
    # Low-frequency choroidal texture: a coarse random grid, bilinearly upsampled.
    coarse = rng.normal(0.0, 1.0, size=(6, 6)).astype(np.float32)
    texture = np.asarray(Image.fromarray(coarse, mode="F").resize((n, n), Image.BILINEAR), dtype=np.float64)
    shade = brightness * gradient * vignette * (1.0 + 0.05 * texture)
    image = base[None, None, :] * shade[..., None]

    side = rng.choice([-1.0, 1.0])
    disc = np.array([cx + side * radius * rng.uniform(0.45, 0.6), cy + radius * rng.uniform(-0.1, 0.1)])
    macula = np.array([cx - side * radius * 0.1, cy])

    # Vessels: arcs leaving the optic disc, drawn supersampled and downsampled for smooth edges.
    scale = 4
    canvas = Image.new("L", (n * scale, n * scale), 0)
    draw = ImageDraw.Draw(canvas)
    for k in range(int(rng.integers(6, 10))):
        heading = rng.uniform(0, 2 * np.pi)
        curvature = rng.uniform(-2.5, 2.5)
        length = rng.uniform(0.5, 1.1) * radius
        width = rng.uniform(0.010, 0.018)
        points = []
        pos = disc.copy()
        steps = 24
        for _ in range(steps + 1):
            points.append(pos.copy())
            heading += curvature / steps
            pos = pos + (length / steps) * np.array([np.cos(heading), np.sin(heading)])
        for s in range(steps):
            w = max(1, int(round(width * (1 - 0.7 * s / steps) * n * scale)))
            p0 = tuple((points[s] * n * scale).tolist())
            p1 = tuple((points[s + 1] * n * scale).tolist())
            draw.line([p0, p1], fill=int(170 + 85 * (k % 2)), width=w)
    vessels = np.asarray(canvas.resize((n, n), Image.BOX), dtype=np.float64) / 255.0
    vessel_colour = np.array([0.45, 0.06, 0.05]) * brightness
    image = image * (1 - 0.55 * vessels[..., None]) + vessel_colour * 0.55 * vessels[..., None]

    disc_r = np.hypot(xx - disc[0], yy - disc[1]) / (radius * rng.uniform(0.13, 0.17))
    disc_w = np.exp(-(disc_r**4))
    image = image + disc_w[..., None] * (np.array([0.98, 0.85, 0.55]) * brightness - image) * 0.85
    mac_r = np.hypot(xx - macula[0], yy - macula[1]) / (radius * 0.25)
    image = image * (1 - 0.25 * np.exp(-(mac_r**2)))[..., None]

    geometry = {"centre": np.array([cx, cy]), "radius": radius, "disc": disc}
    for _ in range(int(rng.integers(0, 5))):
        _paint_spot(image, geometry, _PIGMENT, rng)
    image = image * mask[..., None]
    return image, mask, geometry


def _paint_spot(image: np.ndarray, geometry: dict, kind: tuple, rng: np.random.Generator) -> None:
    """Paints one gaussian spot in place, inside the disc and away from the optic disc."""
    sigma_frac, colour, strength = kind
    n = image.shape[0]
    while True:
        rho = geometry["radius"] * np.sqrt(rng.uniform(0.0, 0.72))
        phi = rng.uniform(0, 2 * np.pi)
        centre = geometry["centre"] + rho * np.array([np.cos(phi), np.sin(phi)])
        if np.hypot(*(centre - geometry["disc"])) > 0.18 * geometry["radius"]:
            break
    sigma = max(0.55, sigma_frac * n * rng.uniform(0.8, 1.3))
    half = int(np.ceil(3 * sigma))
    px, py = centre * n
    x0, x1 = max(0, int(px) - half), min(n, int(px) + half + 2)
    y0, y1 = max(0, int(py) - half), min(n, int(py) + half + 2)
    yy, xx = np.mgrid[y0:y1, x0:x1]
    weight = strength * np.exp(-((xx + 0.5 - px) ** 2 + (yy + 0.5 - py) ** 2) / (2 * sigma**2))
    patch = image[y0:y1, x0:x1]
    tint = colour * max(patch.mean(), 0.2) / 0.45
    image[y0:y1, x0:x1] = patch + weight[..., None] * (tint - patch)


def add_lesions(image: np.ndarray, geometry: dict, grade: int, rng: np.random.Generator) -> np.ndarray:
    """Paints the lesions of ``grade`` onto ``image`` (a copy); grade 0 adds none."""
    if not 0 <= grade < len(LESIONS_BY_GRADE):
        raise ValueError(f"grade must be in 0..{len(LESIONS_BY_GRADE) - 1}, got {grade}")
    out = image.copy()
    load = LESIONS_BY_GRADE[grade]
    for (lo, hi), kind in (
        (load.microaneurysms, _MICROANEURYSM),
        (load.haemorrhages, _HAEMORRHAGE),
        (load.exudates, _EXUDATE),
    ):
        for _ in range(int(rng.integers(lo, hi + 1))):
            _paint_spot(out, geometry, kind, rng)
    return out


def render_fundus(resolution: int, *, scene_seed: int, grade: int, lesion_seed: int) -> np.ndarray:
    """One uint8 ``(H, W, 3)`` fundus image; the same ``scene_seed`` gives the same scene."""
    scene, mask, geometry = render_scene(resolution, _stream(scene_seed))
    image = add_lesions(scene, geometry, grade, _stream(lesion_seed))
    noise = _stream(scene_seed, 1).normal(0.0, 0.012, size=image.shape)
    image = np.clip((image + noise) * mask[..., None], 0.0, 1.0)
    return (image * 255.0 + 0.5).astype(np.uint8)


def sample_grades(count: int, rng: np.random.Generator) -> np.ndarray:
    return rng.choice(len(GRADE_PROBABILITIES), size=count, p=GRADE_PROBABILITIES)


def generate_split(resolution: int, count: int, *, seed: int, split_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Images and grades of one split; deterministic in (seed, split_id, index)."""
    grades = sample_grades(count, _stream(seed, split_id, 0))
    images = render_split(
        lambda i, scene, lesion: render_fundus(resolution, scene_seed=scene, grade=int(grades[i]), lesion_seed=lesion),
        (resolution, resolution, 3), seed=seed, split_id=split_id, count=count,
    )  # fmt: skip
    return images, grades
