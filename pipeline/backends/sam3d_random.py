"""Random-weight mode of the SAM 3D Objects backend (``reconstruct.sam3d.random_weights: true``).

For benchmarks and integration runs on machines without the gated checkpoints. The real upstream networks
are instantiated from the yaml configs but no checkpoint is loaded, so outputs are meaningless; three
data-dependent parts are made realistic so that stage 2, the decoders and file I/O see production-like sizes:

- Sparse structure: the random SS decoder gives ~0 or ~half of 64³ occupied voxels, so stage 1 runs in full
  (for its timing) and its voxel coordinates are then replaced by a sphere shell of :data:`SHELL_VOXELS`
  (≈15 k) voxels — typical of real objects (10–30 k, SAM 3D reference §8).
- Zero-initialised output layers (Gaussian/mesh decoder heads, adaLN gates) are re-drawn from N(0, 0.02²),
  otherwise every Gaussian is identical and the mesh surface is empty.
- The pointmap: a random MoGe still runs (for its timing); if its output is not usable (non-finite or not in
  front of the camera), a synthetic pointmap (a plane at depth 2 with a bump, 60° field of view) replaces it.

DINOv2 encoders are built with ``pretrained: false`` (no weight download); ``SAM3D_DINOV2_HUB`` may point at a
local ``torch.hub`` directory (``source: local``) where GitHub cannot be reached. MoGe is built without
``from_pretrained``. Every object of such a run carries :data:`RANDOM_NOTE`.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

__all__ = [
    "RANDOM_NOTE",
    "SHELL_VOXELS",
    "adjust_config",
    "random_weight_pipeline_class",
    "sphere_shell_coords",
    "synthetic_pointmap",
    "usable_pointmap",
]

RANDOM_NOTE = "random weights (no checkpoint loaded): geometry and colours are meaningless; timings only"
SHELL_VOXELS = 15_000
_RESOLUTION = 64


def adjust_config(conf: Any) -> Any:
    """Replace the pretrained MoGe loader by a randomly initialised MoGe ViT-L."""
    from omegaconf import OmegaConf

    depth = conf.get("depth_model")
    if depth is not None and "model" in depth:
        depth.model = OmegaConf.create({"_target_": "moge.model.v1.MoGeModel", "encoder": "dinov2_vitl14"})
    return conf


def _patch_dino(node: Any) -> None:
    """Every DINOv2 embedder: no pretrained weights; a local hub dir when ``SAM3D_DINOV2_HUB`` is set."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, DictConfig):
        if str(node.get("_target_", "")).endswith("embedder.dino.Dino"):
            existing = node.get("backbone_kwargs")
            kwargs = OmegaConf.to_container(existing) if isinstance(existing, DictConfig) else {}
            kwargs["pretrained"] = False
            node.backbone_kwargs = kwargs
            hub = os.environ.get("SAM3D_DINOV2_HUB")
            if hub:
                node.repo_or_dir = hub
                node.source = "local"
        for key in node.keys():
            _patch_dino(node[key])
    elif isinstance(node, ListConfig):
        for item in node:
            _patch_dino(item)


def _rerandomise_zero_weights(model: Any, std: float = 0.02) -> int:
    """Redraw every all-zero weight matrix/kernel (ndim ≥ 2) from N(0, std²); returns how many."""
    import torch

    count = 0
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim >= 2 and not torch.any(param):
                param.normal_(0.0, std)
                count += 1
    return count


def sphere_shell_coords(n_target: int = SHELL_VOXELS, device: Any = "cpu") -> Any:
    """(N, 4) int32 ``[batch=0, x, y, z]`` voxels of a one-voxel-thick sphere shell in the 64³ grid, N ≈ n_target."""
    import torch

    # surface area 4πr² ≈ n_target voxels → r; clamp inside the grid
    radius = min(np.sqrt(n_target / (4 * np.pi)), _RESOLUTION / 2 - 1.5)
    grid = np.stack(np.meshgrid(*(np.arange(_RESOLUTION),) * 3, indexing="ij"), -1).reshape(-1, 3)
    dist = np.linalg.norm(grid + 0.5 - _RESOLUTION / 2, axis=1)
    half_thickness = max(0.5, 0.5 * n_target / (4 * np.pi * radius**2))
    shell = grid[np.abs(dist - radius) < half_thickness]
    coords = np.concatenate([np.zeros((len(shell), 1), np.int64), shell], axis=1)
    return torch.as_tensor(coords, dtype=torch.int32, device=device)


def synthetic_pointmap(height: int, width: int, device: Any = "cpu") -> Any:
    """(H, W, 3) float32 pointmap in the PyTorch3D camera frame: a plane at z=2 with a central bump, 60° FoV."""
    import torch

    f = 0.5 * width / np.tan(np.deg2rad(30.0))
    v, u = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    r2 = ((u - width / 2) ** 2 + (v - height / 2) ** 2) / (0.25 * min(height, width)) ** 2
    z = 2.0 - 0.3 * np.exp(-r2)
    x = -(u - width / 2) / f * z  # PyTorch3D: x left
    y = -(v - height / 2) / f * z  # y up
    return torch.as_tensor(np.stack([x, y, z], -1).astype(np.float32), device=device)


def usable_pointmap(pointmap: Any, shape: tuple[int, int]) -> tuple[Any, str | None]:
    """Keep a random MoGe pointmap if it is finite and in front of the camera, else a synthetic one (+ note)."""
    import torch

    z = pointmap[..., 2]
    if bool(torch.isfinite(pointmap).all()) and float((z > 0).float().mean()) > 0.9:
        return pointmap, None
    note = "random MoGe pointmap unusable (non-finite or behind the camera): a synthetic plane pointmap was used"
    return synthetic_pointmap(*shape, device=pointmap.device), note


def random_weight_pipeline_class(base: type) -> type:
    """A subclass of the upstream pipeline class that instantiates without checkpoints (see module doc)."""
    from hydra.utils import instantiate

    class RandomWeightsPipeline(base):  # type: ignore[misc, valid-type]
        """Upstream pipeline, weights left at their (re-randomised) initialisation, shell voxels injected."""

        def instantiate_and_load_from_pretrained(
            self, config, ckpt_path, state_dict_fn=None, state_dict_key="state_dict", device="cuda"
        ):
            _patch_dino(config)
            model = instantiate(config)
            _rerandomise_zero_weights(model)
            return model.to(device).eval()

        def sample_sparse_structure(self, ss_input_dict, inference_steps=None, use_distillation=False):
            out = super().sample_sparse_structure(
                ss_input_dict, inference_steps=inference_steps, use_distillation=use_distillation
            )
            coords = sphere_shell_coords(device=out["coords"].device)
            out["random_ss_voxels"] = int(out["coords"].shape[0])
            out["coords_original"] = coords
            out["coords"] = coords
            out["downsample_factor"] = 1
            return out

        def object_structure(self, coords):
            """Batched path (:mod:`pipeline.backends.sam3d_batch`): one object's voxels → the shell, factor 1."""
            return sphere_shell_coords(device=coords.device), 1

    RandomWeightsPipeline.__name__ = f"RandomWeights{base.__name__}"
    return RandomWeightsPipeline
