"""Numbered candidate overlays: the picture the VLM (and a person reading the transcript) judges candidates by.

Each candidate mask ((H, W) bool, input resolution) is filled with its own colour at ~45 % opacity, outlined
in the same colour, and labelled with its 1-based number in a dark box at the mask's most interior pixel
(so the number sits on the object, not on its bounding box corner). The output has the input's size.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["PALETTE", "render_overlay", "label_point"]

# Distinct, saturated colours; candidate i gets PALETTE[i % len(PALETTE)].
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (170, 110, 40),
    (128, 0, 0),
)
_ALPHA = 0.45


def _erode(mask: np.ndarray) -> np.ndarray:
    """One step of 4-neighbour erosion of an (H, W) bool mask (pixels outside the image count as empty)."""
    out = mask.copy()
    out[1:, :] &= mask[:-1, :]
    out[:-1, :] &= mask[1:, :]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    out[0, :] = out[-1, :] = False
    out[:, 0] = out[:, -1] = False
    return out


def label_point(mask: np.ndarray) -> tuple[int, int]:
    """(x, y) pixel well inside ``mask``: erode until the next step would empty it, then take the surviving
    pixel nearest to the survivors' centroid (for a concave mask the centroid itself may lie outside)."""
    core = mask
    for _ in range(64):
        nxt = _erode(core)
        if not nxt.any():
            break
        core = nxt
    ys, xs = np.nonzero(core)
    if len(xs) == 0:
        return (0, 0)
    i = int(np.argmin((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2))
    return int(xs[i]), int(ys[i])


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one small bitmap font
        return ImageFont.load_default()


def render_overlay(image: Image.Image, masks: Sequence[np.ndarray]) -> Image.Image:
    """RGB image with masks[i] filled, outlined and numbered ``i + 1``; masks are (H, W) bool like ``image``."""
    base = np.asarray(image.convert("RGB")).astype(np.float32)
    h, w = base.shape[:2]
    for i, mask in enumerate(masks):
        if mask.shape != (h, w):
            raise ValueError(f"mask {i + 1} has shape {mask.shape}, the image is {(h, w)}")
        color = np.array(PALETTE[i % len(PALETTE)], np.float32)
        base[mask] = base[mask] * (1 - _ALPHA) + color * _ALPHA
        edge = mask & ~_erode(mask)
        base[edge] = color
    out = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    font = _font(max(12, min(h, w) // 22))
    for i, mask in enumerate(masks):
        if not mask.any():
            continue
        x, y = label_point(mask)
        text = str(i + 1)
        # Centre the label on (x, y); bitmap fonts (old Pillow) support no anchors, so centre by hand.
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        x0, y0 = x - (right - left) // 2 - left, y - (bottom - top) // 2 - top
        pad = 3
        box = (x0 + left - pad, y0 + top - pad, x0 + right + pad, y0 + bottom + pad)
        draw.rectangle(box, fill=(0, 0, 0), outline=PALETTE[i % len(PALETTE)])
        draw.text((x0, y0), text, fill=(255, 255, 255), font=font)
    return out
