"""Decoding and cropping of medical images into fixed-size uint8 arrays.

Every image goes through :func:`load_image`: decode with PIL (JPEGs decoded at a reduced
DCT scale when much larger than needed), crop (``fundus``: a square around the retina
disc; ``center``: the central square; ``none``: squash), resize to ``resolution`` and
return ``(H, W, C)`` uint8. Decoding failures are turned into :class:`ImageDecodeError`
with a short reason, so a preparer can collect every bad file before failing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

CROPS = ("fundus", "center", "none")
# A fundus pixel is retina when brighter than this fraction of the image's bright level;
# JPEG noise in the black surround stays well below it.
_FUNDUS_THRESHOLD = 0.1
# Rows/columns count as retina when this fraction of their pixels is; ignores specks and
# burnt-in text in the surround.
_FUNDUS_MIN_FILL = 0.01


class ImageDecodeError(Exception):
    """An image file is missing, unreadable, corrupt or truncated."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def _to_mode(image: Image.Image, channels: int) -> Image.Image:
    """Converts to 8-bit L or RGB; 16-bit and float greyscale are rescaled, not clipped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # Scale by the image's own maximum: 12-bit data stored in 16-bit PNGs (common for
        # radiographs) would be nearly black if divided by 65535.
        array = np.asarray(image, dtype=np.float32)
        top = max(float(array.max()), 1.0)
        image = Image.fromarray(np.clip(array * (255.0 / top), 0, 255).astype(np.uint8), mode="L")
    if channels == 1:
        return image if image.mode == "L" else image.convert("L")
    return image if image.mode == "RGB" else image.convert("RGB")


def fundus_box(pixels: np.ndarray) -> tuple[int, int, int, int] | None:
    """The (left, top, right, bottom) box of the non-black retina region, or None if blank.

    Args:
        pixels: uint8 ``(H, W)`` or ``(H, W, C)`` image.
    """
    height, width = pixels.shape[:2]
    # A ~256 px subsample finds the disc to within a few pixels at a tenth of the cost.
    step = max(1, min(height, width) // 256)
    small = pixels[::step, ::step]
    intensity = small.max(axis=-1) if small.ndim == 3 else small
    counts = np.cumsum(np.bincount(intensity.ravel(), minlength=256))
    bright = int(np.searchsorted(counts, 0.99 * counts[-1]))  # 99th percentile
    if bright < 16:
        return None
    mask = intensity > max(8.0, _FUNDUS_THRESHOLD * bright)
    rows = np.flatnonzero(mask.mean(axis=1) > _FUNDUS_MIN_FILL)
    cols = np.flatnonzero(mask.mean(axis=0) > _FUNDUS_MIN_FILL)
    if len(rows) == 0 or len(cols) == 0:
        return None
    return (
        int(cols[0]) * step,
        int(rows[0]) * step,
        min(width, (int(cols[-1]) + 1) * step),
        min(height, (int(rows[-1]) + 1) * step),
    )


def square_box(box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """The smallest square centred on ``box`` that contains it (may leave the image)."""
    left, top, right, bottom = box
    side = max(right - left, bottom - top)
    cx2, cy2 = left + right, top + bottom  # twice the centre, to stay in integers
    return (cx2 - side) // 2, (cy2 - side) // 2, (cx2 - side) // 2 + side, (cy2 - side) // 2 + side


def center_box(width: int, height: int) -> tuple[int, int, int, int]:
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def fit_image(image: Image.Image, *, resolution: int, channels: int, crop: str) -> np.ndarray:
    """Crops and resizes a decoded image to a uint8 ``(resolution, resolution, channels)``."""
    if crop not in CROPS:
        raise ValueError(f"unknown crop {crop!r}; valid: {', '.join(CROPS)}")
    image = _to_mode(image, channels)
    if crop == "fundus":
        box = fundus_box(np.asarray(image))
        # A blank (all-black) photo has no retina to find: fall back to the central square.
        # Cropping outside the image pads with black, which is the fundus surround anyway.
        image = image.crop(square_box(box) if box else center_box(*image.size))
    elif crop == "center" and image.size[0] != image.size[1]:
        image = image.crop(center_box(*image.size))
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.Resampling.BILINEAR, reducing_gap=3.0)
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def load_image(path: Path, *, resolution: int, channels: int, crop: str) -> np.ndarray:
    """Decodes, crops and resizes one image file.

    Raises:
        ImageDecodeError: the file is missing, not an image, corrupt or truncated.
        ValueError: ``crop`` is not one of :data:`CROPS` (a caller error, not a bad file).
    """
    if crop not in CROPS:
        raise ValueError(f"unknown crop {crop!r}; valid: {', '.join(CROPS)}")
    try:
        with Image.open(path) as image:
            if image.format == "JPEG":
                # Decode at 1/2, 1/4 or 1/8 scale when still >= the target: big fundus
                # photos decode several times faster and lose nothing we keep.
                image.draft("L" if channels == 1 else "RGB", (resolution, resolution))
            image.load()
            return fit_image(image, resolution=resolution, channels=channels, crop=crop)
    except FileNotFoundError:
        raise ImageDecodeError(path, "missing file") from None
    except IsADirectoryError:
        raise ImageDecodeError(path, "is a directory, not an image file") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(path, "not a readable image (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        # PIL reports truncated or corrupt data as OSError (sometimes SyntaxError/ValueError).
        raise ImageDecodeError(path, f"corrupt or truncated image ({exc})") from None


def fit_array(pixels: np.ndarray, *, resolution: int, channels: int) -> np.ndarray:
    """Resizes an in-memory uint8 ``(H, W)`` or ``(H, W, 3)`` image (e.g. MedMNIST)."""
    image = Image.fromarray(pixels)
    return fit_image(image, resolution=resolution, channels=channels, crop="none")
