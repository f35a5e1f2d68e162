"""A procedural natural-image-like classification set: shapes, textures and colours.

The embedded default's stand-in for ImageNet: nothing medical, many classes, so a
model pretrained on it carries generic edge, colour and texture features into the
retina task. Runs that use it are "synthetic-source transfer", never "ImageNet".
A class is a (shape, fill) pair; colours, position, size, rotation, background and
clutter are nuisance variation.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from transfusion.data.seeds import stream

SHAPES = ("disc", "square", "triangle", "star", "ring", "cross", "bar", "crescent")
FILLS = ("solid", "striped")
CLASS_NAMES = tuple(f"{shape}-{fill}" for shape in SHAPES for fill in FILLS)
GENERATOR_VERSION = "1"


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        k, radii = 4, [r]
    elif shape == "triangle":
        k, radii = 3, [r]
    elif shape == "star":
        k, radii = 10, [r, 0.45 * r]
    elif shape == "cross":
        pts = [(-1, -0.3), (-0.3, -0.3), (-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3),
               (1, 0.3), (0.3, 0.3), (0.3, 1), (-0.3, 1), (-0.3, 0.3), (-1, 0.3)]  # fmt: skip
        c, s = np.cos(angle), np.sin(angle)
        return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]
    elif shape == "bar":
        pts = [(-1, -0.28), (1, -0.28), (1, 0.28), (-1, 0.28)]
        c, s = np.cos(angle), np.sin(angle)
        return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]
    else:
        raise ValueError(shape)
    return [
        (
            cx + radii[i % len(radii)] * np.cos(angle + 2 * np.pi * i / k),
            cy + radii[i % len(radii)] * np.sin(angle + 2 * np.pi * i / k),
        )
        for i in range(k)
    ]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float, fill: int) -> None:
    if shape == "disc":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        draw.ellipse([cx - 0.55 * r, cy - 0.55 * r, cx + 0.55 * r, cy + 0.55 * r], fill=0)
    elif shape == "crescent":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        dx, dy = 0.5 * r * np.cos(angle), 0.5 * r * np.sin(angle)
        draw.ellipse([cx + dx - 0.85 * r, cy + dy - 0.85 * r, cx + dx + 0.85 * r, cy + dy + 0.85 * r], fill=0)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, angle), fill=fill)


def render_shape_image(resolution: int, label: int, rng: np.random.Generator) -> np.ndarray:
    """One uint8 ``(H, W, 3)`` image of class ``label``."""
    n, scale = resolution, 3
    size = n * scale
    shape, fill = CLASS_NAMES[label].split("-")
    yy, xx = np.mgrid[0:n, 0:n] / n
    c0, c1 = rng.uniform(0, 1, size=(2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    t = (xx * np.cos(angle) + yy * np.sin(angle) + 1) / 2
    background = c0 * (1 - t[..., None]) + c1 * t[..., None]
    background += rng.normal(0, 0.04, size=background.shape)

    def layer(shape_name: str, fill_name: str, radius: float) -> np.ndarray:
        mask = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(mask)
        cx, cy = rng.uniform(radius, size - radius, size=2)
        _draw_shape(draw, shape_name, cx, cy, radius, rng.uniform(0, 2 * np.pi), 255)
        alpha = np.asarray(mask.resize((n, n), Image.BOX), dtype=np.float64) / 255.0
        if fill_name == "striped":
            period = rng.uniform(0.12, 0.22) * n
            phi = rng.uniform(0, np.pi)
            stripes = (np.sin(2 * np.pi * (xx * n * np.cos(phi) + yy * n * np.sin(phi)) / period) > 0).astype(float)
            alpha = alpha * (0.25 + 0.75 * stripes)
        return alpha

    image = background
    # Clutter: small shapes of other classes, drawn first so the target sits on top.
    for _ in range(int(rng.integers(0, 3))):
        other = int(rng.integers(0, len(CLASS_NAMES)))
        s, f = CLASS_NAMES[other].split("-")
        alpha = layer(s, f, rng.uniform(0.08, 0.14) * size)
        image = image * (1 - alpha[..., None]) + rng.uniform(0, 1, 3) * alpha[..., None]
    alpha = layer(shape, fill, rng.uniform(0.22, 0.34) * size)
    colour = rng.uniform(0, 1, 3)
    if np.abs(colour - image.mean(axis=(0, 1))).max() < 0.3:
        colour = 1.0 - colour  # keep the object visible against its background
    image = image * (1 - alpha[..., None]) + colour * alpha[..., None]
    out = Image.fromarray((np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8))
    if rng.random() < 0.3:
        out = out.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.3, 0.8)))
    return np.asarray(out)


def generate_shapes_split(resolution: int, count: int, *, seed: int, split_id: int) -> tuple[np.ndarray, np.ndarray]:
    rng = stream(seed, split_id, 17)
    labels = rng.integers(0, len(CLASS_NAMES), size=count)
    images = np.empty((count, resolution, resolution, 3), dtype=np.uint8)
    for i in range(count):
        images[i] = render_shape_image(resolution, int(labels[i]), stream(seed, split_id, i, 23))
    return images, labels
