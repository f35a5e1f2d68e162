"""Procedural chest-X-ray-like images with mostly local multi-label findings.

Each image is a *scene* (body, lungs, mediastinum, heart, diaphragm, ribs, clavicles,
texture, exposure) plus *findings*. The scene comes from its own random stream and only
the heart width depends on a label (cardiomegaly is a global sign by nature); the other
four findings are small local marks inside the lungs:

- Atelectasis: one or two thin linear (plate-like) bands in a lower lung zone;
- Consolidation: a cluster of nodular opacities in one lung;
- Edema: short horizontal Kerley-B-like lines at the lateral lung bases;
- Pleural Effusion: fluid with a meniscus filling a costophrenic angle.

Exposure, contrast and rib layout vary far more between scenes than findings move the
global statistics, so the task is local, as for real radiographs. Labels follow the
paper's five CheXpert pathologies; images are greyscale ``(H, W, 1)`` uint8.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from transfusion.data.seeds import render_split
from transfusion.data.seeds import stream as _stream

GENERATOR_VERSION = "1"
LABEL_NAMES = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
LABEL_PREVALENCE = (0.3, 0.25, 0.25, 0.25, 0.3)
SYNTHETIC_CHEST_DEFAULTS = {"train": 3000, "val": 400, "test": 800, "seed": 0}


def _soft(signed_distance: np.ndarray, edge: float) -> np.ndarray:
    """A soft mask: 1 inside (distance < 0), 0 outside, a sigmoid ramp of width ``edge``."""
    return 1.0 / (1.0 + np.exp(np.clip(signed_distance / edge, -30, 30)))


def _blob(xx: np.ndarray, yy: np.ndarray, centre: np.ndarray, sigma: float) -> np.ndarray:
    return np.exp(-((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) / (2 * sigma**2))


class _Scene:
    """Geometry and intensity field of one lesion-free chest image."""

    def __init__(self, resolution: int, rng: np.random.Generator, *, cardiomegaly: bool) -> None:
        n = resolution
        self.yy, self.xx = np.mgrid[0:n, 0:n].astype(np.float64) / n
        xx, yy = self.xx, self.yy
        self.cx = 0.5 + rng.uniform(-0.03, 0.03)
        self.scale = rng.uniform(0.92, 1.05)
        s = self.scale
        tissue = rng.uniform(0.42, 0.55)
        body = _soft(((np.abs(xx - self.cx) / (0.46 * s)) ** 4 + ((yy - 0.62) / (0.62 * s)) ** 4) - 1.0, 0.08)
        image = 0.06 + (tissue - 0.06) * body

        # Lungs: dark (air) regions whose floor is the diaphragm dome.
        self.lungs = []
        lung_mask = np.zeros_like(xx)
        for side in (-1.0, 1.0):
            lx = self.cx + side * 0.19 * s + rng.uniform(-0.01, 0.01)
            half_w, top, floor = (
                0.15 * s * rng.uniform(0.95, 1.05),
                0.2 + rng.uniform(-0.02, 0.02),
                0.78 * s,
            )
            dome = rng.uniform(0.05, 0.09)
            u = (xx - lx) / half_w
            bottom = floor - dome * np.clip(1 - u**2, 0, 1)
            # The lung narrows towards a rounded apex.
            width = 1.0 - 0.45 * np.clip((top + 0.14 - yy) / 0.14, 0, 1)
            apex = top + 0.06 * u**2
            distance = np.maximum.reduce([np.abs(u) / width - 1.0, (yy - bottom) / half_w, (apex - yy) / half_w])
            mask = _soft(distance, 0.04)
            lung_mask = np.maximum(lung_mask, mask)
            self.lungs.append({"x": lx, "half_w": half_w, "top": top, "floor": floor, "dome": dome, "side": side})
        self.lung_mask = lung_mask
        image -= rng.uniform(0.22, 0.3) * lung_mask

        # Mediastinum and spine: a bright central band.
        image += 0.12 * _soft((np.abs(xx - self.cx) - 0.055 * s) * 10, 0.1) * (yy > 0.12)
        # Heart: brighter ellipse low in the chest, bulging to the image right (patient left).
        # Draw the enlargement either way so the rest of the scene is the same for both labels.
        enlargement = rng.uniform(1.38, 1.55)
        self.heart_half_w = 0.125 * s * rng.uniform(0.9, 1.08) * (enlargement if cardiomegaly else 1.0)
        hx, hy = self.cx + 0.035 * s, 0.6 + rng.uniform(-0.02, 0.02)
        heart = _soft(((xx - hx) / self.heart_half_w) ** 2 + ((yy - hy) / (0.14 * s)) ** 2 - 1.0, 0.1)
        image += rng.uniform(0.18, 0.24) * heart * (0.4 + 0.6 * lung_mask)

        # Ribs: posterior arcs sweeping down laterally; clavicles near the top.
        ribs = np.zeros_like(xx)
        spacing = rng.uniform(0.058, 0.066) * s
        sag = rng.uniform(0.5, 0.8)
        for side in (-1.0, 1.0):
            lateral = np.clip(side * (xx - self.cx), 0, None)
            for k in range(9):
                curve = 0.18 + k * spacing + sag * lateral**2 * 2.2 - 0.05 * lateral
                ribs += np.exp(-(((yy - curve) / (0.011 * s)) ** 2)) * (lateral > 0.04) * (lateral < 0.38 * s)
            clavicle = 0.17 - 0.12 * lateral + 0.35 * lateral**2
            image += 0.07 * np.exp(-(((yy - clavicle) / 0.012) ** 2)) * (lateral > 0.03) * (lateral < 0.28)
        image += rng.uniform(0.06, 0.1) * np.clip(ribs, 0, 1) * (0.3 + 0.7 * lung_mask) * body

        # Low-frequency texture (vessels, soft tissue), then exposure.
        coarse = rng.normal(0.0, 1.0, size=(10, 10)).astype(np.float32)
        texture = np.asarray(Image.fromarray(coarse, mode="F").resize((n, n), Image.BICUBIC), dtype=np.float64)
        image += 0.02 * texture * body
        self.image = image
        self.exposure = (rng.uniform(0.8, 1.15), rng.uniform(-0.06, 0.06), rng.uniform(0.8, 1.25))

    def point_in_lung(
        self, rng: np.random.Generator, *, zone: tuple[float, float], lateral: tuple[float, float]
    ) -> tuple[np.ndarray, dict]:
        """A point in a random lung.

        ``zone`` spans the lung's top (0) to its floor (1), ``lateral`` its medial side
        (0) to its outer edge (1).
        """
        lung = self.lungs[int(rng.integers(0, 2))]
        height = lung["floor"] - lung["dome"] - lung["top"]
        y = lung["top"] + height * rng.uniform(*zone)
        x = lung["x"] + lung["side"] * lung["half_w"] * rng.uniform(*lateral)
        return np.array([x, y]), lung


def _add_findings(scene: _Scene, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    image = scene.image.copy()
    xx, yy, lungs = scene.xx, scene.yy, scene.lung_mask
    if labels[0]:  # atelectasis: thin plate-like bands
        for _ in range(int(rng.integers(1, 3))):
            centre, _lung = scene.point_in_lung(rng, zone=(0.55, 0.85), lateral=(0.1, 0.7))
            angle = rng.uniform(-0.35, 0.35)
            along = (xx - centre[0]) * np.cos(angle) + (yy - centre[1]) * np.sin(angle)
            across = -(xx - centre[0]) * np.sin(angle) + (yy - centre[1]) * np.cos(angle)
            length, width = rng.uniform(0.05, 0.08), rng.uniform(0.005, 0.008)
            image += rng.uniform(0.1, 0.15) * np.exp(-((along / length) ** 6) - (across / width) ** 2) * lungs
    if labels[2]:  # consolidation: a cluster of nodular opacities
        centre, _lung = scene.point_in_lung(rng, zone=(0.3, 0.8), lateral=(0.2, 0.7))
        for _ in range(int(rng.integers(3, 7))):
            spot = centre + rng.normal(0, 0.025, size=2)
            image += rng.uniform(0.08, 0.15) * _blob(xx, yy, spot, rng.uniform(0.008, 0.016)) * lungs
    if labels[3]:  # edema: Kerley-B-like short horizontal lines at the lateral bases
        for lung in scene.lungs:
            for _ in range(int(rng.integers(3, 6))):
                height = lung["floor"] - lung["dome"] - lung["top"]
                y = lung["top"] + height * rng.uniform(0.6, 0.95)
                x_edge = lung["x"] + lung["side"] * lung["half_w"] * rng.uniform(0.75, 0.92)
                half_len = rng.uniform(0.012, 0.022)
                x_mid = x_edge - lung["side"] * half_len
                image += 0.12 * np.exp(-(((xx - x_mid) / half_len) ** 8) - ((yy - y) / 0.0035) ** 2) * lungs
    if labels[4]:  # pleural effusion: fluid with a meniscus in a costophrenic angle
        lung = scene.lungs[int(rng.integers(0, 2))]
        lateral = np.clip(lung["side"] * (xx - lung["x"]) / lung["half_w"], 0, 1)
        depth = rng.uniform(0.08, 0.12)
        level = lung["floor"] - depth * (0.2 + 0.8 * lateral**1.5)
        fluid = _soft((level - yy) * 60, 0.3) * (lateral > 0.15) * (np.abs(xx - lung["x"]) < lung["half_w"] * 1.1)
        image += 0.25 * fluid * lungs
    return image


def render_chest(resolution: int, *, scene_seed: int, labels: np.ndarray, lesion_seed: int) -> np.ndarray:
    """One uint8 ``(H, W, 1)`` chest image; the same ``scene_seed`` gives the same scene."""
    labels = np.asarray(labels, dtype=bool)
    scene = _Scene(resolution, _stream(scene_seed), cardiomegaly=bool(labels[1]))
    image = _add_findings(scene, labels, _stream(lesion_seed))
    gain, offset, gamma = scene.exposure
    image = np.clip(image * gain + offset, 0.0, 1.0) ** gamma
    noise_rng = _stream(scene_seed, 1)
    image = image + noise_rng.normal(0.0, 0.012, size=image.shape)
    out = Image.fromarray((np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8), mode="L")
    out = out.filter(ImageFilter.GaussianBlur(radius=0.4 * resolution / 224))
    return np.asarray(out)[..., None]


def sample_labels(count: int, rng: np.random.Generator) -> np.ndarray:
    return (rng.random((count, len(LABEL_NAMES))) < np.asarray(LABEL_PREVALENCE)).astype(np.float32)


def generate_chest_split(resolution: int, count: int, *, seed: int, split_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(count, H, W, 1)`` and labels ``(count, 5)``; a function of (seed, split_id)."""
    labels = sample_labels(count, _stream(seed, split_id, 0))
    images = render_split(
        lambda i, scene, lesion: render_chest(resolution, scene_seed=scene, labels=labels[i], lesion_seed=lesion),
        (resolution, resolution, 1), seed=seed, split_id=split_id, count=count,
    )  # fmt: skip
    return images, labels
