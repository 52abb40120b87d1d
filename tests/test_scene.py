"""Per-object files, scene composition and preview with synthetic Gaussians, meshes and known poses."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import trimesh
from plyfile import PlyData

from pipeline.backends.base import GaussianSet, ObjectReconstruction
from pipeline.stages.frames import FRAMES, frame_matrix, quat_to_matrix
from pipeline.handoff import Pose
from pipeline.stages.scene import (
    PLY_FIELDS,
    compose_scene,
    posed_gaussians,
    read_gaussians_ply,
    render_preview,
    write_gaussians_ply,
    write_object_files,
)


def _zup_to_yup(v: np.ndarray) -> np.ndarray:
    """What SAM 3D's to_glb does: (x, y, z) -> (x, z, -y)."""
    return np.stack([v[:, 0], v[:, 2], -v[:, 1]], axis=1)


def _object(seed: int, *, with_mesh: bool = True, with_gaussians: bool = True) -> tuple[ObjectReconstruction, np.ndarray]:
    """An off-centre, asymmetric box: Gaussians on its (z-up) vertices, the mesh in y-up; returns (rec, centroid_zup)."""
    rng = np.random.default_rng(seed)
    box = trimesh.creation.box(extents=(0.5, 0.3, 0.2))
    verts_zup = box.vertices * [1.0, 1.2, 0.8] + [0.1, -0.05, 0.15]
    n = len(verts_zup)
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    pose = Pose(
        quat_wxyz=tuple(float(x) for x in q),
        translation=tuple(float(x) for x in rng.uniform([-1, -1, 2], [1, 1, 5])),
        scale=(float(rng.uniform(0.3, 2.0)),) * 3,
    )
    gaussians = GaussianSet(
        xyz=verts_zup.astype(np.float32),
        f_dc=rng.normal(size=(n, 3)).astype(np.float32),
        opacity=np.full(n, 3.0, np.float32),
        log_scale=np.full((n, 3), np.log(0.02), np.float32),
        rot_wxyz=np.tile(np.array([1, 0, 0, 0], np.float32), (n, 1)),
    )
    mesh = trimesh.Trimesh(vertices=_zup_to_yup(verts_zup), faces=box.faces, process=False)
    mesh.visual.vertex_colors = np.tile([200, 50, 50, 255], (n, 1)).astype(np.uint8)
    rec = ObjectReconstruction(
        gaussians=gaussians if with_gaussians else None, mesh=mesh if with_mesh else None, pose=pose
    )
    return rec, verts_zup.mean(axis=0)


def _expected(pose: Pose, centroid_zup: np.ndarray, frame: str) -> np.ndarray:
    r = quat_to_matrix(np.asarray(pose.quat_wxyz))
    p_cam = pose.scale[0] * r.T @ centroid_zup + np.asarray(pose.translation)
    return frame_matrix(frame) @ p_cam


def _glb_centroids(path) -> dict[str, np.ndarray]:
    scene = trimesh.load(path, force="scene")
    out = {}
    for node in scene.graph.nodes_geometry:
        matrix, geometry = scene.graph[node]
        verts = scene.geometry[geometry].vertices
        out[node] = (verts @ matrix[:3, :3].T + matrix[:3, 3]).mean(axis=0)
    return out


@pytest.mark.parametrize("frame", sorted(FRAMES))
def test_scene_ply_and_glb_agree_in_every_frame(tmp_path, frame):
    objects = [_object(seed) for seed in range(3)]
    written = compose_scene([rec for rec, _ in objects], tmp_path, frame=frame)
    assert [p.name for p in written] == ["scene.ply", "scene.glb"]
    scene_gs = read_gaussians_ply(tmp_path / "scene.ply")
    glb = _glb_centroids(tmp_path / "scene.glb")
    assert sorted(glb) == ["object_000", "object_001", "object_002"]
    start = 0
    for i, (rec, centroid) in enumerate(objects):
        n = len(rec.gaussians)
        ply_centroid = scene_gs.xyz[start : start + n].mean(axis=0)
        start += n
        expected = _expected(rec.pose, centroid, frame)
        np.testing.assert_allclose(ply_centroid, expected, atol=1e-4)
        np.testing.assert_allclose(glb[f"object_{i:03d}"], expected, atol=1e-4)
        np.testing.assert_allclose(glb[f"object_{i:03d}"], ply_centroid, atol=1e-4)
    assert start == len(scene_gs)
    comments = PlyData.read(str(tmp_path / "scene.ply")).comments
    assert f"frame {frame}_camera" in comments
    assert trimesh.load(tmp_path / "scene.glb", force="scene").metadata.get("frame") == frame


def test_frames_differ_by_the_stated_change(tmp_path):
    rec, _ = _object(11)
    for frame in FRAMES:
        compose_scene([rec], tmp_path / frame, frame=frame)
    base = read_gaussians_ply(tmp_path / "pytorch3d" / "scene.ply").xyz
    np.testing.assert_allclose(read_gaussians_ply(tmp_path / "opencv" / "scene.ply").xyz, base * [-1, -1, 1], atol=1e-5)
    np.testing.assert_allclose(read_gaussians_ply(tmp_path / "opengl" / "scene.ply").xyz, base * [-1, 1, -1], atol=1e-5)


@pytest.mark.parametrize("frame", sorted(FRAMES))
def test_posed_gaussian_covariance_follows_the_pose(frame):
    """An elongated Gaussian's covariance must transform as M·Σ·Mᵀ with M = F·s·Rᵀ."""
    rng = np.random.default_rng(3)
    q_g = rng.normal(size=4)
    q_g /= np.linalg.norm(q_g)
    log_scale = np.log([0.2, 0.03, 0.01])
    g = GaussianSet(
        xyz=np.zeros((1, 3), np.float32),
        f_dc=np.zeros((1, 3), np.float32),
        opacity=np.zeros(1, np.float32),
        log_scale=log_scale[None].astype(np.float32),
        rot_wxyz=q_g[None].astype(np.float32),
    )
    rec, _ = _object(4)
    out = posed_gaussians(g, rec.pose, frame)

    def cov(q, ls):
        r = quat_to_matrix(q)
        return r @ np.diag(np.exp(2 * ls)) @ r.T

    s = rec.pose.scale[0]
    m = frame_matrix(frame) @ (s * quat_to_matrix(np.asarray(rec.pose.quat_wxyz)).T)
    np.testing.assert_allclose(cov(out.rot_wxyz[0], out.log_scale[0]), m @ cov(q_g, log_scale) @ m.T, atol=1e-6)


def test_gaussian_ply_layout_and_round_trip(tmp_path):
    rec, _ = _object(5)
    path = write_gaussians_ply(rec.gaussians, tmp_path / "g.ply", comments=["frame test"])
    ply = PlyData.read(str(path))
    vertex = ply["vertex"]
    assert tuple(p.name for p in vertex.properties) == PLY_FIELDS
    assert all(vertex.data.dtype[name] == np.dtype("<f4") for name in PLY_FIELDS)
    assert not ply.text and ply.byte_order in ("<", "=")
    assert path.stat().st_size > 68 * len(rec.gaussians)
    back = read_gaussians_ply(path)
    for field in ("xyz", "f_dc", "opacity", "log_scale", "rot_wxyz"):
        np.testing.assert_array_equal(getattr(back, field), getattr(rec.gaussians, field))
    np.testing.assert_array_equal(np.asarray(vertex["nx"]), 0)


def test_read_rejects_non_gaussian_ply(tmp_path):
    trimesh.creation.box().export(tmp_path / "mesh.ply")
    with pytest.raises(ValueError, match="not a 3DGS PLY"):
        read_gaussians_ply(tmp_path / "mesh.ply")


def test_object_files(tmp_path):
    rec, _ = _object(6)
    written = write_object_files(rec, tmp_path / "000", export_obj=True)
    names = sorted(p.name for p in written)
    assert {"gaussians.ply", "mesh.glb", "mesh.obj", "pose.json"} <= set(names)
    assert not [p for p in (tmp_path / "000").iterdir() if p.name.startswith(".")]  # no temp files left
    pose = Pose.model_validate(json.loads((tmp_path / "000" / "pose.json").read_text()))
    assert pose == rec.pose and pose.frame == "pytorch3d_camera"
    mesh = trimesh.load(tmp_path / "000" / "mesh.glb", force="mesh")
    np.testing.assert_allclose(mesh.vertices.mean(axis=0), rec.mesh.vertices.mean(axis=0), atol=1e-6)  # unposed, y-up
    obj = trimesh.load(tmp_path / "000" / "mesh.obj", force="mesh")
    assert len(obj.faces) == len(rec.mesh.faces)


def test_gaussians_only_objects_write_no_glb(tmp_path):
    rec, _ = _object(7, with_mesh=False)
    assert sorted(p.name for p in write_object_files(rec, tmp_path / "o", export_obj=True)) == ["gaussians.ply", "pose.json"]
    assert [p.name for p in compose_scene([rec], tmp_path / "s", frame="opencv")] == ["scene.ply"]


def test_mixed_objects_keep_node_indices(tmp_path):
    a, _ = _object(8, with_mesh=False)
    b, _ = _object(9)
    compose_scene([a, b], tmp_path, frame="opengl")
    assert sorted(_glb_centroids(tmp_path / "scene.glb")) == ["object_001"]
    assert len(read_gaussians_ply(tmp_path / "scene.ply")) == len(a.gaussians) + len(b.gaussians)


def test_anisotropic_pose_scale_is_refused(tmp_path):
    rec, _ = _object(10)
    rec.pose = rec.pose.model_copy(update={"scale": (1.0, 2.0, 1.0)})
    with pytest.raises(ValueError, match="isotropic"):
        compose_scene([rec], tmp_path, frame="opencv")


def test_preview_png_is_written_quickly(tmp_path):
    rng = np.random.default_rng(0)
    n = 300_000
    big = GaussianSet(
        xyz=rng.uniform(-0.5, 0.5, (n, 3)).astype(np.float32),
        f_dc=rng.normal(size=(n, 3)).astype(np.float32),
        opacity=np.full(n, 2.0, np.float32),
        log_scale=np.full((n, 3), -4.0, np.float32),
        rot_wxyz=np.tile(np.array([1, 0, 0, 0], np.float32), (n, 1)),
    )
    rec, _ = _object(12)
    rec.gaussians = big
    compose_scene([rec], tmp_path, frame="opencv")
    t0 = time.perf_counter()
    assert render_preview(tmp_path, frame="opencv") is None
    assert time.perf_counter() - t0 < 10.0
    from PIL import Image

    with Image.open(tmp_path / "preview.png") as img:
        assert img.size == (640, 640)
        pixels = np.asarray(img)
    assert (pixels != 245).any()  # something was drawn


def test_preview_without_scene_ply_returns_a_note(tmp_path):
    note = render_preview(tmp_path, frame="opencv")
    assert note and "skipped" in note


def test_preview_ignores_non_finite_gaussians(tmp_path):
    rec, _ = _object(13)
    rec.gaussians.xyz[0] = np.nan
    rec.gaussians.f_dc[1] = np.inf
    compose_scene([rec], tmp_path, frame="opengl")
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("error")
        assert render_preview(tmp_path, frame="opengl") is None
