"""Quaternion and frame maths, checked against rotation matrices built independently."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.stages.frames import (
    FRAMES,
    Z_UP_FROM_Y_UP,
    frame_matrix,
    frame_quat,
    glb_node_matrix,
    matrix_to_quat,
    pose_matrix,
    quat_conjugate,
    quat_multiply,
    quat_to_matrix,
    transform_points,
)


def _axis_angle_matrix(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rodrigues' formula, independent of the quaternion code."""
    k = np.asarray(axis, float) / np.linalg.norm(axis)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(angle) * kx + (1 - np.cos(angle)) * kx @ kx


def _axis_angle_quat(axis: np.ndarray, angle: float) -> np.ndarray:
    k = np.asarray(axis, float) / np.linalg.norm(axis)
    return np.concatenate([[np.cos(angle / 2)], np.sin(angle / 2) * k])


def _random_quats(n: int, seed: int = 0) -> np.ndarray:
    q = np.random.default_rng(seed).normal(size=(n, 4))
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def test_quat_to_matrix_matches_rodrigues():
    rng = np.random.default_rng(1)
    for _ in range(20):
        axis, angle = rng.normal(size=3), rng.uniform(-np.pi, np.pi)
        np.testing.assert_allclose(quat_to_matrix(_axis_angle_quat(axis, angle)), _axis_angle_matrix(axis, angle), atol=1e-12)


def test_quarter_turn_about_z_maps_x_to_y():
    q = _axis_angle_quat([0, 0, 1], np.pi / 2)
    np.testing.assert_allclose(quat_to_matrix(q) @ [1, 0, 0], [0, 1, 0], atol=1e-12)


def test_product_composes_matrices_and_conjugate_transposes():
    a, b = _random_quats(50, 2), _random_quats(50, 3)
    np.testing.assert_allclose(quat_to_matrix(quat_multiply(a, b)), quat_to_matrix(a) @ quat_to_matrix(b), atol=1e-12)
    r = quat_to_matrix(a)
    np.testing.assert_allclose(quat_to_matrix(quat_conjugate(a)), np.swapaxes(r, -1, -2), atol=1e-12)
    np.testing.assert_allclose(r @ np.swapaxes(r, -1, -2), np.broadcast_to(np.eye(3), r.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(r), 1.0, atol=1e-12)


def test_matrix_to_quat_round_trip_up_to_sign():
    for q in _random_quats(100, 4):
        back = matrix_to_quat(quat_to_matrix(q))
        assert back[0] >= 0
        np.testing.assert_allclose(back, q if q[0] >= 0 else -q, atol=1e-9)
    # the 180° cases (trace = -1) take the other branches
    for axis in np.eye(3):
        np.testing.assert_allclose(quat_to_matrix(matrix_to_quat(_axis_angle_matrix(axis, np.pi))), _axis_angle_matrix(axis, np.pi), atol=1e-12)


def test_matrix_to_quat_rejects_reflections():
    with pytest.raises(ValueError, match="rotation"):
        matrix_to_quat(np.diag([-1.0, 1.0, 1.0]))


def test_frame_quaternions_match_reference_table():
    np.testing.assert_allclose(frame_quat("opencv"), [0, 0, 0, 1], atol=1e-12)  # 180° about z
    np.testing.assert_allclose(frame_quat("opengl"), [0, 0, 1, 0], atol=1e-12)  # 180° about y
    np.testing.assert_allclose(frame_quat("pytorch3d"), [1, 0, 0, 0], atol=1e-12)
    for name in FRAMES:
        np.testing.assert_allclose(quat_to_matrix(frame_quat(name)), frame_matrix(name), atol=1e-12)
    with pytest.raises(ValueError, match="opencv"):
        frame_matrix("blender")


def test_y_up_matrix_inverts_to_glb_axis_swap():
    v_zup = np.array([0.1, 0.2, 0.3])
    v_yup = np.array([v_zup[0], v_zup[2], -v_zup[1]])  # what to_glb writes: (x, y, z) -> (x, z, -y)
    np.testing.assert_allclose(Z_UP_FROM_Y_UP @ v_yup, v_zup)
    np.testing.assert_allclose(np.linalg.det(Z_UP_FROM_Y_UP), 1.0)


def test_pose_matrix_matches_pytorch3d_row_convention():
    q, t, s = _random_quats(1, 5)[0], np.array([0.3, -0.2, 2.5]), 0.7
    points = np.random.default_rng(6).uniform(-0.5, 0.5, (10, 3))
    r = quat_to_matrix(q)
    row_form = points @ np.diag([s, s, s]) @ r + t  # Transform3d().scale(s).rotate(R).translate(t)
    np.testing.assert_allclose(transform_points(pose_matrix(q, t, s), points), row_form, atol=1e-12)


def test_glb_node_converts_y_up_before_the_pose():
    q, t, s = _random_quats(1, 7)[0], np.array([0.1, 0.4, 3.0]), 1.3
    v_zup = np.random.default_rng(8).uniform(-0.5, 0.5, (10, 3))
    v_yup = np.stack([v_zup[:, 0], v_zup[:, 2], -v_zup[:, 1]], axis=1)
    pose = pose_matrix(q, t, s)
    for name in FRAMES:
        expected = transform_points(pose, v_zup) @ frame_matrix(name).T
        np.testing.assert_allclose(transform_points(glb_node_matrix(pose, name), v_yup), expected, atol=1e-12)
    # the classic mistake (pose straight onto y-up vertices) lands elsewhere
    assert not np.allclose(transform_points(pose, v_yup), transform_points(pose, v_zup), atol=1e-3)
