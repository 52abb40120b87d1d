"""Test-only: the kit's photos and segmenters that give the 3D stage fixed, usable masks (benchmarks only).

With random weights SAM3's masks are noise (most fall under any useful threshold), so the 3D stage would see
0–1 objects per photo. For the measurement of both stages together (benchmarks/bench_pipeline_gpu.py):

- :func:`write_photos` makes photo-like JPEGs of real phone sizes (smooth gradients + sensor noise, some with
  EXIF orientation 6) with 2–4 solid-coloured shapes each (red, blue, green, yellow);
- :class:`Sam3FixedMasks` (``segment.backend: benchmarks.gpu_kit.fixed_masks:Sam3FixedMasks``) **is** the
  real SAM3 backend (model build, CUDA graph capture, prefetch, ``set_image`` and ``predict`` all run as
  usual, so the segment stage's time and memory are SAM3's), but the detections it returns are those of the
  coloured shapes named by each phrase's colour word;
- :class:`FixedMasks` (``benchmarks.gpu_kit.fixed_masks:FixedMasks``) returns the same masks without any model
  (CPU dry runs of the harness).

The shapes are found at ≤ 1024 px (box-filtered) and the masks scaled back with nearest neighbours, which costs
a few ms per photo next to SAM3's work. Nothing here is used by the product.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from pipeline.backends.base import Detections, Segmenter
from pipeline.backends.sam3 import Sam3Segmenter

__all__ = ["COLOURS", "PROMPT", "PHOTOS", "write_photos", "colour_detections", "FixedMasks", "Sam3FixedMasks"]

COLOURS: dict[str, tuple[int, int, int]] = {"red": (230, 20, 20), "blue": (20, 40, 230), "green": (20, 200, 40),
                                            "yellow": (240, 220, 20)}
PROMPT = "red object,blue object,green object,yellow object"
DETECT_SIDE = 1024  # shapes are found on a box-filtered copy this large (longer side)
NEAR_L1 = 120  # a pixel within this L1 distance of a shape colour belongs to it (JPEG edges included)
MIN_FRACTION = 0.002  # of the (reduced) image: smaller components are JPEG speckle

# (width, height), EXIF orientation, colours: phone photos (12 MP, 4:3 and portrait), a 16:9 frame, smaller shots
PHOTOS: list[tuple[tuple[int, int], int, tuple[str, ...]]] = [
    ((4032, 3024), 1, ("red", "blue", "green")),
    ((4032, 3024), 6, ("red", "yellow")),
    ((3024, 4032), 1, ("blue", "green", "yellow", "red")),
    ((4000, 3000), 1, ("green", "red")),
    ((1920, 1080), 1, ("yellow", "blue", "red")),
    ((3264, 2448), 6, ("red", "blue", "green", "yellow")),
    ((2048, 1536), 1, ("blue", "yellow")),
    ((4032, 2268), 1, ("green", "yellow", "red")),
]


def _background(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    ys = np.linspace(0, 1, h, dtype=np.float32)[:, None]
    xs = np.linspace(0, 1, w, dtype=np.float32)[None, :]
    base = np.stack([100 + 45 * np.sin(5 * xs + 3 * ys + k + seed) * np.cos(3 * ys - k) for k in range(3)], axis=-1)
    base += rng.normal(0, 8, (h, w, 1)).astype(np.float32)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def photo(size: tuple[int, int], colours: Sequence[str], seed: int) -> Image.Image:
    """A photo-like image with one solid shape per colour, spread over the frame (no two touch)."""
    w, h = size
    image = _background(w, h, seed)
    draw = ImageDraw.Draw(image)
    n = len(colours)
    for i, name in enumerate(colours):
        cx = w * (i + 0.5) / n
        cy = h * (0.42 + 0.16 * ((i + seed) % 2))
        rx, ry = 0.32 * w / n, (0.16 + 0.04 * (i % 3)) * h
        box = [cx - rx, cy - ry, cx + rx, cy + ry]
        (draw.ellipse if (i + seed) % 2 else draw.rounded_rectangle)(box, fill=COLOURS[name])  # type: ignore[operator]
    return image


def write_photos(folder: Path, count: int = len(PHOTOS)) -> list[Path]:
    """``count`` JPEGs (quality 90) cycling through :data:`PHOTOS`; deterministic, written once."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        (w, h), orientation, colours = PHOTOS[i % len(PHOTOS)]
        path = folder / f"photo{i:02d}-{w}x{h}-o{orientation}-{len(colours)}obj.jpg"
        if not path.exists():
            image = photo((w, h), colours, i)
            exif = Image.Exif()
            if orientation == 6:  # stored rotated: the displayed (upright) photo is what the shapes were drawn on
                image = image.transpose(Image.Transpose.ROTATE_90)
                exif[0x0112] = 6
            image.save(path, quality=90, exif=exif.tobytes())
        paths.append(path)
    return paths


def objects_in(path: Path) -> int:
    """How many shapes a photo written by :func:`write_photos` holds (from its name)."""
    return int(path.stem.rsplit("-", 1)[1].removesuffix("obj"))


def colour_detections(image: Image.Image, phrases: Sequence[str]) -> list[Detections]:
    """One Detections per phrase: the shapes of the phrase's colour word (none without one), full-size masks."""
    from scipy import ndimage

    w, h = image.size
    factor = max(1, -(-max(w, h) // DETECT_SIDE))
    small = np.asarray((image.reduce(factor) if factor > 1 else image).convert("RGB")).astype(np.int16)
    out = []
    for phrase in phrases:
        colour = next((COLOURS[word] for word in phrase.lower().replace(",", " ").split() if word in COLOURS), None)
        masks: list[np.ndarray] = []
        boxes: list[list[float]] = []
        if colour is not None:
            near = np.abs(small - np.array(colour, np.int16)).sum(axis=2) < NEAR_L1
            labels, n = ndimage.label(near)
            sizes = ndimage.sum(near, labels, range(1, n + 1)) if n else []
            for k in np.argsort(sizes)[::-1] if n else []:
                if sizes[k] < MIN_FRACTION * near.size:
                    break
                comp = labels == k + 1
                ys, xs = np.nonzero(comp)
                full = Image.fromarray(comp.astype(np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST)
                masks.append(np.asarray(full) > 127)
                boxes.append([float(xs.min() * factor), float(ys.min() * factor),
                              float(min(w, (xs.max() + 1) * factor)), float(min(h, (ys.max() + 1) * factor))])
        scores = np.full(len(masks), 0.95, np.float32)
        stacked = np.stack(masks) if masks else np.zeros((0, h, w), bool)
        out.append(Detections(phrase, stacked, np.asarray(boxes, np.float32).reshape(-1, 4), scores))
    return out


class FixedMasks(Segmenter):
    """The coloured shapes as detections, no model (CPU dry runs of the benchmark harness)."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self._image: Image.Image | None = None

    def set_image(self, image: Image.Image) -> None:
        self._image = image

    def predict(self, phrases: Sequence[str]) -> list[Detections]:
        if self._image is None:
            raise RuntimeError("call set_image() before predict()")
        return colour_detections(self._image, phrases)


class Sam3FixedMasks(Sam3Segmenter):
    """The real SAM3 backend whose returned detections are replaced by the coloured shapes (see the module
    docstring). ``load_timings`` adds nothing; the seconds spent finding the shapes accumulate in
    ``self.fixed_masks_s`` (they are part of the job's ``predict_s``)."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self._fixed_image: Image.Image | None = None
        self.fixed_masks_s = 0.0

    def set_image(self, image: Image.Image) -> None:
        super().set_image(image)
        self._fixed_image = image

    def predict(self, phrases: Sequence[str]) -> list[Detections]:
        real = super().predict(phrases)  # SAM3's own work, on the GPU, as in a real run
        if self._fixed_image is None:
            return real
        t0 = time.perf_counter()
        fixed = colour_detections(self._fixed_image, phrases)
        self.fixed_masks_s += time.perf_counter() - t0
        return fixed
