"""Demo backends: **not models**. They let the whole tool (stage workers, engine, web app) run on a laptop CPU
with no weights, and they are what ``python -m pipeline serve --demo`` and the CPU tests use.

- :class:`DemoBlobSegmenter` (built-in segment backend ``demo``): a phrase naming a colour word ("red", "green",
  "blue", "yellow", "white") matches every 4-connected blob of that pure-ish colour; each blob is one detection.
  Scores are made up: 0.95 for the largest blob, then 0.05 less per blob. Phrases without a colour word match
  nothing. It understands nothing else about the image.
- :class:`DemoCubeReconstructor` (built-in reconstruct backend ``demo``): every mask becomes a 4×4×4 cube of
  Gaussians and a box mesh, both in the mask's mean colour, posed from the mask alone: translation from the
  mask centroid (PyTorch3D camera frame: x left, y up, z forward, fixed depth 2), isotropic scale from the
  mask's box size, identity rotation. ``options.delay_s`` sleeps that long per object (to watch progress).

Both only need numpy and PIL (and trimesh for the box mesh), so they run in the driver's own interpreter
(env kind ``current``).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Sequence

import numpy as np
from PIL import Image

from pipeline.backends.base import Detections, GaussianSet, ObjectReconstruction, Reconstructor, Segmenter
from pipeline.handoff import Pose

__all__ = ["COLORS", "DemoBlobSegmenter", "DemoCubeReconstructor"]

#: Colour words the demo segmenter understands, with the RGB value a blob must be near (L1 distance < 60).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "white": (255, 255, 255),
}
_SH_C0 = 0.2820948


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of an (H, W) bool mask, as (H, W) bool masks, largest first."""
    seen = np.zeros_like(mask)
    comps: list[np.ndarray] = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        comp = np.zeros_like(mask)
        queue = deque([(y0, x0)])
        seen[y0, x0] = True
        while queue:
            y, x = queue.popleft()
            comp[y, x] = True
            for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                ny, nx = y + dy, x + dx
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        comps.append(comp)
    comps.sort(key=lambda c: int(c.sum()), reverse=True)
    return comps


class DemoBlobSegmenter(Segmenter):
    """Colour blobs named by colour words (see the module docstring). Not a model."""

    def __init__(self, config: Any) -> None:  # SegmentConfig
        super().__init__(config)
        self.image: np.ndarray | None = None

    def set_image(self, image: Image.Image) -> None:
        """Keep the (H, W, 3) RGB pixels as int16 for colour distances."""
        self.image = np.asarray(image.convert("RGB")).astype(np.int16)

    def predict(self, phrases: Sequence[str]) -> list[Detections]:
        """One Detections per phrase: the blobs of the phrase's first colour word, largest first."""
        if self.image is None:
            raise RuntimeError("call set_image() before predict()")
        return [self._detect(p) for p in phrases]

    def _detect(self, phrase: str) -> Detections:
        assert self.image is not None
        h, w = self.image.shape[:2]
        color = next((COLORS[word] for word in phrase.lower().replace(",", " ").split() if word in COLORS), None)
        if color is None:
            return Detections(phrase, np.zeros((0, h, w), bool), np.zeros((0, 4), np.float32), np.zeros(0, np.float32))
        near = np.abs(self.image - np.array(color)).sum(axis=2) < 60
        comps = _components(near)
        boxes = []
        for comp in comps:
            ys, xs = np.nonzero(comp)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        scores = np.array([max(0.95 - 0.05 * i, 0.05) for i in range(len(comps))], np.float32)
        masks = np.stack(comps) if comps else np.zeros((0, h, w), bool)
        return Detections(phrase, masks, np.asarray(boxes, np.float32).reshape(-1, 4), scores)


class DemoCubeReconstructor(Reconstructor):
    """A coloured cube of Gaussians and a box mesh per mask (see the module docstring). Not a model."""

    def prepare(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """Keep the (H, W, 3) uint8 image: the cube's colour is the mask's mean colour."""
        return {"image": image}

    def reconstruct(self, context: dict[str, np.ndarray], mask: np.ndarray, seed: int) -> ObjectReconstruction:
        """A 64-Gaussian cube (canonical z-up frame, inside ±0.4) and a 0.8 box mesh (y-up), posed from the mask."""
        import trimesh

        time.sleep(float(self.config.options.get("delay_s", 0.0)))
        image = context["image"]
        h, w = mask.shape
        ys, xs = np.nonzero(mask)
        colour = image[mask].mean(axis=0) / 255.0 if len(xs) else np.full(3, 0.5)
        g = np.linspace(-0.4, 0.4, 4, dtype=np.float32)
        xyz = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
        rng = np.random.default_rng(seed)
        xyz = xyz + rng.normal(0, 0.01, xyz.shape).astype(np.float32)
        n = len(xyz)
        gaussians = GaussianSet(
            xyz=xyz,
            f_dc=np.tile(((colour - 0.5) / _SH_C0).astype(np.float32), (n, 1)),
            opacity=np.full(n, 2.0, np.float32),
            log_scale=np.full((n, 3), np.log(0.12), np.float32),
            rot_wxyz=np.tile(np.array([1, 0, 0, 0], np.float32), (n, 1)),
        )
        mesh = trimesh.creation.box(extents=(0.8, 0.8, 0.8))
        mesh.visual.vertex_colors = np.tile(np.append((colour * 255).astype(np.uint8), 255), (len(mesh.vertices), 1))
        cx, cy = (xs.mean(), ys.mean()) if len(xs) else (w / 2, h / 2)
        size = max(np.ptp(xs) + 1, np.ptp(ys) + 1) / max(h, w) if len(xs) else 0.1
        pose = Pose(
            quat_wxyz=(1.0, 0.0, 0.0, 0.0),
            translation=(float(-(cx - w / 2) / w * 2), float(-(cy - h / 2) / h * 2), 2.0),
            scale=(float(size),) * 3,
        )
        return ObjectReconstruction(gaussians=gaussians, mesh=mesh, pose=pose, notes=["demo backend: a cube, not a reconstruction"])
