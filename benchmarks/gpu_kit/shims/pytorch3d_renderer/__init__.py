"""Shim of ``pytorch3d.renderer`` for random-weight GPU runs only (see ../README.md).

Provides ``look_at_view_transform`` (used by the pointmap frame conversion); every renderer class is a
placeholder that raises when instantiated (they serve only layout post-optimisation and visualisation).
"""

from __future__ import annotations

import torch

__all__ = ["look_at_view_transform", "look_at_rotation"]


def look_at_rotation(camera_position, at, up, device="cpu") -> torch.Tensor:
    """(N, 3, 3) world-to-view rotations, PyTorch3D convention (rows of R^T are the camera axes)."""
    eye = torch.as_tensor(camera_position, dtype=torch.float32, device=device).reshape(-1, 3)
    at = torch.as_tensor(at, dtype=torch.float32, device=device).reshape(-1, 3)
    up = torch.as_tensor(up, dtype=torch.float32, device=device).reshape(-1, 3)
    z = torch.nn.functional.normalize(at - eye, eps=1e-5)
    x = torch.nn.functional.normalize(torch.cross(up.expand_as(z), z, dim=1), eps=1e-5)
    y = torch.nn.functional.normalize(torch.cross(z, x, dim=1), eps=1e-5)
    return torch.cat((x[:, None, :], y[:, None, :], z[:, None, :]), dim=1).transpose(1, 2)


def look_at_view_transform(dist=1.0, elev=0.0, azim=0.0, degrees=True, eye=None, at=((0, 0, 0),),
                           up=((0, 1, 0),), device="cpu"):
    """``(R, T)`` of a camera at ``eye`` looking at ``at``; only the ``eye=`` form is implemented."""
    if eye is None:
        raise NotImplementedError("shim: only look_at_view_transform(eye=..., at=..., up=...) is implemented")
    eye_t = torch.as_tensor(eye, dtype=torch.float32, device=device).reshape(-1, 3)
    r = look_at_rotation(eye_t, at, up, device=device)
    t = -torch.bmm(r.transpose(1, 2), eye_t[:, :, None])[:, :, 0]
    return r, t


class _Unavailable:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError(
            f"{type(self).__name__} is not available in the pytorch3d shim (random-weight GPU runs only); "
            "install the real pytorch3d (envs/sam3d-objects.yml)"
        )


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return type(name, (_Unavailable,), {})
