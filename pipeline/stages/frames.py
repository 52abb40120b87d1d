"""Quaternion and coordinate-frame maths for composing SAM 3D Objects outputs (numpy only).

Conventions (see docs/reconstruct.md and the SAM 3D Objects reference, §6):

- Quaternions are ``(w, x, y, z)`` float arrays of shape (..., 4); :func:`quat_to_matrix` gives the standard
  rotation matrix ``R(q)`` acting on column vectors.
- A SAM 3D pose maps the canonical object frame (z-up, inside [-0.5, 0.5]³) into the PyTorch3D camera frame
  (x left, y up, z forward, camera at the origin) as ``p_cam = Rᵀ · diag(s) · p_local + t`` with
  ``R = R(q)`` (PyTorch3D's row-vector ``Transform3d().scale(s).rotate(R).translate(t)`` written for column
  vectors). A Gaussian's orientation follows as ``q_g' = conj(q) ⊗ q_g`` (``R(conj(q)) = Rᵀ``).
- The canonical GLB frame is y-up: ``v_yup = (x, z, -y)`` of ``v_zup``; back again ``v_zup = A · v_yup``
  with :data:`Z_UP_FROM_Y_UP` ``= A``.
- Scene frames: ``pytorch3d`` (the pose's own frame), ``opencv`` (x right, y down, z forward; the usual 3DGS
  PLY convention; positions × diag(-1, -1, 1), a 180° turn about z) and ``opengl`` (x right, y up, z backward,
  camera looking -Z as in three.js / glTF; positions × diag(-1, 1, -1), a 180° turn about y).
"""

from __future__ import annotations

from typing import Final

import numpy as np

__all__ = [
    "FRAMES",
    "Z_UP_FROM_Y_UP",
    "quat_normalise",
    "quat_conjugate",
    "quat_multiply",
    "quat_to_matrix",
    "matrix_to_quat",
    "frame_matrix",
    "frame_quat",
    "pose_matrix",
    "glb_node_matrix",
    "transform_points",
]

#: Scene frames a user can choose (config ``reconstruct.frame``), as the proper rotation taking PyTorch3D
#: camera coordinates into that frame.
FRAMES: Final[dict[str, np.ndarray]] = {
    "pytorch3d": np.eye(3),
    "opencv": np.diag([-1.0, -1.0, 1.0]),
    "opengl": np.diag([-1.0, 1.0, -1.0]),
}

#: Column-form matrix taking canonical GLB (y-up) vertices back to the canonical z-up object frame.
Z_UP_FROM_Y_UP: Final[np.ndarray] = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])


def quat_normalise(q: np.ndarray) -> np.ndarray:
    """Unit quaternions of ``q`` (..., 4); zero-length rows become the identity (1, 0, 0, 0)."""
    q = np.asarray(q, dtype=np.float64)
    norm = np.linalg.norm(q, axis=-1, keepdims=True)
    identity = np.zeros_like(q)
    identity[..., 0] = 1.0
    return np.where(norm > 0, q / np.where(norm > 0, norm, 1.0), identity)


def quat_conjugate(q: np.ndarray) -> np.ndarray:
    """``conj(q)`` for (..., 4) wxyz quaternions (the inverse of a unit quaternion)."""
    q = np.asarray(q, dtype=np.float64)
    return q * np.array([1.0, -1.0, -1.0, -1.0])


def quat_multiply(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product ``a ⊗ b`` of wxyz quaternions, broadcast over leading axes; ``R(a⊗b) = R(a)·R(b)``."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    aw, ax, ay, az = np.moveaxis(a, -1, 0)
    bw, bx, by, bz = np.moveaxis(b, -1, 0)
    return np.stack(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ],
        axis=-1,
    )


def quat_to_matrix(q: np.ndarray) -> np.ndarray:
    """Rotation matrices (..., 3, 3) of wxyz quaternions (..., 4); ``q`` need not be normalised."""
    w, x, y, z = np.moveaxis(quat_normalise(q), -1, 0)
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
            np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
            np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
        ],
        axis=-2,
    )


def matrix_to_quat(m: np.ndarray) -> np.ndarray:
    """The unit wxyz quaternion (w ≥ 0) of a proper rotation matrix (3, 3).

    Raises:
        ValueError: if ``m`` is not a rotation (orthonormal with determinant +1, to 1e-5).
    """
    m = np.asarray(m, dtype=np.float64)
    if m.shape != (3, 3) or not np.allclose(m @ m.T, np.eye(3), atol=1e-5) or np.linalg.det(m) < 0:
        raise ValueError(f"not a proper rotation matrix: {m.tolist()}")
    trace = np.trace(m)
    if trace > 0:
        k = 2.0 * np.sqrt(trace + 1.0)
        q = [0.25 * k, (m[2, 1] - m[1, 2]) / k, (m[0, 2] - m[2, 0]) / k, (m[1, 0] - m[0, 1]) / k]
    elif m[0, 0] >= m[1, 1] and m[0, 0] >= m[2, 2]:
        k = 2.0 * np.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2])
        q = [(m[2, 1] - m[1, 2]) / k, 0.25 * k, (m[0, 1] + m[1, 0]) / k, (m[0, 2] + m[2, 0]) / k]
    elif m[1, 1] >= m[2, 2]:
        k = 2.0 * np.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2])
        q = [(m[0, 2] - m[2, 0]) / k, (m[0, 1] + m[1, 0]) / k, 0.25 * k, (m[1, 2] + m[2, 1]) / k]
    else:
        k = 2.0 * np.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1])
        q = [(m[1, 0] - m[0, 1]) / k, (m[0, 2] + m[2, 0]) / k, (m[1, 2] + m[2, 1]) / k, 0.25 * k]
    quat = quat_normalise(np.array(q))
    return -quat if quat[0] < 0 else quat


def frame_matrix(frame: str) -> np.ndarray:
    """The (3, 3) rotation taking PyTorch3D camera coordinates into ``frame``.

    Raises:
        ValueError: for an unknown frame name (the valid ones are listed).
    """
    try:
        return FRAMES[frame].copy()
    except KeyError:
        raise ValueError(f"unknown frame {frame!r}; expected one of {', '.join(FRAMES)}") from None


def frame_quat(frame: str) -> np.ndarray:
    """The wxyz quaternion of :func:`frame_matrix` (e.g. (0, 0, 0, 1) for ``opencv``)."""
    return matrix_to_quat(frame_matrix(frame))


def pose_matrix(quat_wxyz: np.ndarray, translation: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """4×4 homogeneous ``[Rᵀ·diag(s) | t]``: canonical z-up object frame → PyTorch3D camera frame."""
    out = np.eye(4)
    out[:3, :3] = quat_to_matrix(quat_wxyz).T @ np.diag(np.broadcast_to(np.asarray(scale, float), (3,)))
    out[:3, 3] = np.asarray(translation, dtype=np.float64)
    return out


def glb_node_matrix(pose: np.ndarray, frame: str) -> np.ndarray:
    """4×4 node transform placing a canonical y-up GLB mesh into ``frame``.

    ``pose`` is :func:`pose_matrix`'s result. Order: y-up → z-up (:data:`Z_UP_FROM_Y_UP`), apply the pose,
    then the frame change — applying the pose to the y-up vertices directly is the classic mistake.
    """
    to_zup = np.eye(4)
    to_zup[:3, :3] = Z_UP_FROM_Y_UP
    change = np.eye(4)
    change[:3, :3] = frame_matrix(frame)
    return change @ pose @ to_zup


def transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4×4 homogeneous transform to (N, 3) points (column-vector convention)."""
    points = np.asarray(points, dtype=np.float64)
    return points @ matrix[:3, :3].T + matrix[:3, 3]
