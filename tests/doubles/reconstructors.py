"""A reconstruction backend double: a small coloured cube of Gaussians and a box mesh per mask.

The pose is derived from the mask: translation from the mask centroid (PyTorch3D camera frame: x left,
y up, z forward, fixed depth 2), isotropic scale from the mask's box size, identity rotation. ``prepare``
counts its calls so tests can check the per-image work happens once per image.
"""

from __future__ import annotations

import numpy as np

from pipeline.backends.base import GaussianSet, ObjectReconstruction, Reconstructor
from pipeline.handoff import Pose

__all__ = ["CubeReconstructorDouble"]


class CubeReconstructorDouble(Reconstructor):
    def __init__(self, config) -> None:  # noqa: ANN001 - ReconstructConfig
        super().__init__(config)
        self.prepared = 0

    def prepare(self, image: np.ndarray) -> dict:
        self.prepared += 1
        return {"image": image}

    def reconstruct(self, context: dict, mask: np.ndarray, seed: int) -> ObjectReconstruction:
        import time

        import trimesh

        time.sleep(float(self.config.options.get("delay_s", 0.0)))  # lets tests kill a worker mid-stage
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
            f_dc=np.tile(((colour - 0.5) / 0.2820948).astype(np.float32), (n, 1)),
            opacity=np.full(n, 2.0, np.float32),
            log_scale=np.full((n, 3), np.log(0.05), np.float32),
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
        return ObjectReconstruction(gaussians=gaussians, mesh=mesh, pose=pose)
