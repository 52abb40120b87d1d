"""A reconstruction backend double: a coloured cube per mask, plus a counter for the tests.

Every mask becomes a 4×4×4 cube of Gaussians and a box mesh, both in the mask's mean colour, posed from the mask
alone: translation from the mask centroid (PyTorch3D camera frame: x left, y up, z forward, fixed depth 2),
isotropic scale from the mask's box size, identity rotation. ``prepare`` counts its calls so tests can check the
per-image work happens once per image; ``options.delay_s`` sleeps that long per object (tests kill a worker
mid-stage). Needs numpy, PIL and trimesh only: it runs in the light test venvs.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from pipeline.backends.base import GaussianSet, ObjectReconstruction, Reconstructor
from pipeline.handoff import Pose

__all__ = ["CubeReconstructorDouble"]

_SH_C0 = 0.2820948


class CubeReconstructorDouble(Reconstructor):
    """A coloured cube of Gaussians and a box mesh per mask (see the module docstring); counts ``prepare``
    calls in ``self.prepared``."""

    def __init__(self, config: Any) -> None:  # ReconstructConfig
        super().__init__(config)
        self.prepared = 0

    def prepare(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """Keep the (H, W, 3) uint8 image: the cube's colour is the mask's mean colour."""
        self.prepared += 1
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
        return ObjectReconstruction(gaussians=gaussians, mesh=mesh, pose=pose, notes=["test double: a cube, not a reconstruction"])
