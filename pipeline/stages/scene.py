"""Per-object 3D files, the composed scene and its preview (runs in the sam3d-objects env; numpy, plyfile,
trimesh and PIL only).

Files and frames (see docs/reconstruct.md):

- ``objects/NNN/gaussians.ply``: the object's Gaussians in the **canonical object frame** (z-up, inside
  [-0.5, 0.5]³), standard 3DGS layout (binary little-endian float32 ``x y z nx ny nz f_dc_0..2 opacity
  scale_0..2 rot_0..3``; logit opacity, log scales, wxyz rotation) — what SAM 3D's ``save_ply`` writes.
- ``objects/NNN/mesh.glb`` (and ``mesh.obj`` with ``export_obj``): the mesh in the **canonical GLB frame**
  (y-up), no pose applied.
- ``objects/NNN/pose.json``: :class:`~pipeline.handoff.Pose` — ``p = s · R(q)ᵀ · p_zup + t`` into the frame
  it names (``pytorch3d_camera``), in pointmap units.
- ``scene/scene.ply``: every object's Gaussians posed and converted into the chosen scene frame
  (``reconstruct.frame``), concatenated; the frame is written as a PLY comment.
- ``scene/scene.glb``: one node per object (``object_NNN``) whose matrix is ``F · [s·Rᵀ | t] · A``
  (y-up → z-up, pose, frame change), in the same frame as scene.ply; the frame is in the scene's extras.
- ``scene/preview.png``: a 2×2 grid of point-splat renders of scene.ply from four azimuths.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from pipeline.atomic import write_bytes_atomic, write_json_atomic, write_with
from pipeline.backends.base import GaussianSet, ObjectReconstruction
from pipeline.stages.frames import (
    frame_matrix,
    frame_quat,
    glb_node_matrix,
    quat_conjugate,
    quat_multiply,
    quat_normalise,
    pose_matrix,
    transform_points,
)

if TYPE_CHECKING:  # pragma: no cover
    import trimesh

    from pipeline.handoff import Pose

__all__ = [
    "GAUSSIANS_PLY",
    "MESH_GLB",
    "MESH_OBJ",
    "POSE_JSON",
    "SCENE_PLY",
    "SCENE_GLB",
    "PREVIEW_PNG",
    "PLY_FIELDS",
    "write_gaussians_ply",
    "read_gaussians_ply",
    "write_object_files",
    "pose_to_frame",
    "posed_gaussians",
    "compose_scene",
    "render_preview",
]

log = logging.getLogger(__name__)

GAUSSIANS_PLY = "gaussians.ply"
MESH_GLB = "mesh.glb"
MESH_OBJ = "mesh.obj"
POSE_JSON = "pose.json"
SCENE_PLY = "scene.ply"
SCENE_GLB = "scene.glb"
PREVIEW_PNG = "preview.png"

#: The standard 3DGS vertex layout (SH degree 0), in file order.
PLY_FIELDS: tuple[str, ...] = (
    "x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
    "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3",
)  # fmt: skip
_SH_C0 = 0.28209479177387814


# ---------------------------------------------------------------------------------------------- PLY


def write_gaussians_ply(gaussians: GaussianSet, path: Path, *, comments: Sequence[str] = ()) -> Path:
    """Write ``gaussians`` as a standard 3DGS PLY (binary little-endian float32, 68 bytes per Gaussian)."""
    from plyfile import PlyData, PlyElement

    n = len(gaussians)
    columns = [
        gaussians.xyz.reshape(n, 3),
        np.zeros((n, 3)),
        gaussians.f_dc.reshape(n, 3),
        gaussians.opacity.reshape(n, 1),
        gaussians.log_scale.reshape(n, 3),
        gaussians.rot_wxyz.reshape(n, 4),
    ]
    data = np.concatenate([np.asarray(c, dtype="<f4") for c in columns], axis=1)
    vertices = np.empty(n, dtype=[(name, "<f4") for name in PLY_FIELDS])
    for i, name in enumerate(PLY_FIELDS):
        vertices[name] = data[:, i]
    ply = PlyData([PlyElement.describe(vertices, "vertex")], text=False, byte_order="<", comments=list(comments))
    return write_with(path, lambda tmp: ply.write(str(tmp)))


def read_gaussians_ply(path: Path) -> GaussianSet:
    """Read a 3DGS PLY (SH degree 0 part only) into a :class:`GaussianSet`; the frame is the file's.

    Raises:
        ValueError: if the file lacks one of the :data:`PLY_FIELDS` (other than the unused normals).
    """
    from plyfile import PlyData

    vertex = PlyData.read(str(path))["vertex"]
    names = {p.name for p in vertex.properties}
    missing = [f for f in PLY_FIELDS if f not in names and not f.startswith("n")]
    if missing:
        raise ValueError(f"{path} is not a 3DGS PLY: missing vertex properties {', '.join(missing)}")

    def cols(*fields: str) -> np.ndarray:
        return np.stack([np.asarray(vertex[f], dtype=np.float32) for f in fields], axis=1)

    return GaussianSet(
        xyz=cols("x", "y", "z"),
        f_dc=cols("f_dc_0", "f_dc_1", "f_dc_2"),
        opacity=np.asarray(vertex["opacity"], dtype=np.float32),
        log_scale=cols("scale_0", "scale_1", "scale_2"),
        rot_wxyz=cols("rot_0", "rot_1", "rot_2", "rot_3"),
    )


# ---------------------------------------------------------------------------------------------- objects


def _export_mesh(mesh: trimesh.Trimesh, path: Path) -> Path:
    return write_with(path, lambda tmp: mesh.export(str(tmp), file_type="glb"))


def _export_obj(mesh: trimesh.Trimesh, out_dir: Path) -> list[Path]:
    """OBJ + MTL + texture files; written one by one so each file is atomic under its final name."""
    from trimesh.exchange.obj import export_obj

    text, extra = export_obj(mesh, return_texture=True, mtl_name="mesh.mtl")
    written = [write_bytes_atomic(out_dir / MESH_OBJ, text.encode("utf-8"))]
    for name, data in sorted(extra.items()):
        written.append(write_bytes_atomic(out_dir / name, data))
    return written


def write_object_files(rec: ObjectReconstruction, out_dir: Path, *, export_obj: bool) -> list[Path]:
    """Write one object's gaussians.ply (canonical z-up), mesh.glb (canonical y-up; + mesh.obj) and pose.json.

    Files whose source is absent (no Gaussians or no mesh decoded) are not written. Returns the paths written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if rec.gaussians is not None:
        comments = ["frame canonical_object_zup", "generated by pipeline.stages.scene"]
        written.append(write_gaussians_ply(rec.gaussians, out_dir / GAUSSIANS_PLY, comments=comments))
    if rec.mesh is not None:
        written.append(_export_mesh(rec.mesh, out_dir / MESH_GLB))
        if export_obj:
            written.extend(_export_obj(rec.mesh, out_dir))
    written.append(write_json_atomic(out_dir / POSE_JSON, rec.pose.model_dump(mode="json")))
    return written


# ---------------------------------------------------------------------------------------------- scene


def pose_to_frame(pose: Pose, frame: str) -> np.ndarray:
    """4×4 transform: canonical z-up object frame → scene ``frame`` (pose, then the frame change).

    Raises:
        ValueError: if the pose is not in the PyTorch3D camera frame (the only frame SAM 3D poses come in).
    """
    if pose.frame != "pytorch3d_camera":
        raise ValueError(f"pose frame {pose.frame!r} is not supported; expected 'pytorch3d_camera'")
    change = np.eye(4)
    change[:3, :3] = frame_matrix(frame)
    return change @ pose_matrix(np.asarray(pose.quat_wxyz), np.asarray(pose.translation), np.asarray(pose.scale))


def _isotropic_scale(pose: Pose) -> float:
    scale = np.asarray(pose.scale, dtype=np.float64)
    if not np.allclose(scale, scale[0], rtol=1e-4, atol=0.0) or scale[0] <= 0:
        raise ValueError(f"pose scale {tuple(scale)} is not a positive isotropic scale; Gaussians need one")
    return float(scale[0])


def posed_gaussians(gaussians: GaussianSet, pose: Pose, frame: str) -> GaussianSet:
    """The object's Gaussians moved from the canonical frame into the scene ``frame``.

    Centres: ``F·(s·Rᵀ·p + t)``; orientations: ``q_F ⊗ conj(q) ⊗ q_g`` (norm of ``q_g`` kept, as written);
    log scales: ``+ log s``. Opacity and colour are unchanged (SH degree 0 needs no rotation). Unlike the
    upstream notebook's ``make_scene`` this does not clamp scaled Gaussians to 1.1× the minimum kernel.
    """
    s = _isotropic_scale(pose)
    matrix = pose_to_frame(pose, frame)
    q_pose = quat_normalise(np.asarray(pose.quat_wxyz, dtype=np.float64))
    q_outer = quat_multiply(frame_quat(frame), quat_conjugate(q_pose))
    return GaussianSet(
        xyz=transform_points(matrix, gaussians.xyz).astype(np.float32),
        f_dc=np.asarray(gaussians.f_dc, dtype=np.float32),
        opacity=np.asarray(gaussians.opacity, dtype=np.float32),
        log_scale=(np.asarray(gaussians.log_scale, dtype=np.float64) + np.log(s)).astype(np.float32),
        rot_wxyz=quat_multiply(q_outer, gaussians.rot_wxyz).astype(np.float32),
    )


def _concat(sets: Sequence[GaussianSet]) -> GaussianSet:
    return GaussianSet(
        xyz=np.concatenate([g.xyz for g in sets]),
        f_dc=np.concatenate([g.f_dc for g in sets]),
        opacity=np.concatenate([g.opacity for g in sets]),
        log_scale=np.concatenate([g.log_scale for g in sets]),
        rot_wxyz=np.concatenate([g.rot_wxyz for g in sets]),
    )


def _scene_glb(recs: Sequence[ObjectReconstruction], frame: str) -> trimesh.Scene | None:
    import trimesh

    scene = trimesh.Scene()
    scene.metadata["frame"] = frame
    scene.metadata["units"] = "pointmap"
    for i, rec in enumerate(recs):
        if rec.mesh is None:
            continue
        s = np.asarray(rec.pose.scale, dtype=np.float64)
        node = glb_node_matrix(
            pose_matrix(np.asarray(rec.pose.quat_wxyz), np.asarray(rec.pose.translation), s), frame
        )
        name = f"object_{i:03d}"
        scene.add_geometry(rec.mesh, node_name=name, geom_name=name, transform=node)
    return scene if scene.geometry else None


def compose_scene(recs: Sequence[ObjectReconstruction], out_dir: Path, *, frame: str) -> list[Path]:
    """Write scene.ply (posed Gaussians) and scene.glb (one node per posed mesh), both in ``frame``.

    Object ``i`` of ``recs`` becomes node ``object_{i:03d}``. A file is skipped when no object has the
    corresponding data (e.g. scene.glb with ``decode_formats: [gaussian]``). Returns the paths written.

    Raises:
        ValueError: for an unknown ``frame`` or a pose that is not isotropic / not PyTorch3D-camera.
    """
    frame_matrix(frame)  # validate early
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    posed = [posed_gaussians(r.gaussians, r.pose, frame) for r in recs if r.gaussians is not None]
    if posed:
        comments = [f"frame {frame}_camera", "units pointmap", "generated by pipeline.stages.scene"]
        written.append(write_gaussians_ply(_concat(posed), out_dir / SCENE_PLY, comments=comments))
    scene = _scene_glb(recs, frame)
    if scene is not None:
        written.append(write_with(out_dir / SCENE_GLB, lambda tmp: scene.export(str(tmp), file_type="glb")))
    return written


# ---------------------------------------------------------------------------------------------- preview

_TILE = 320
_MAX_POINTS = 400_000
_AZIMUTHS_DEG = (0.0, 90.0, 180.0, 270.0)
_BACKGROUND = np.array([245, 245, 245], dtype=np.uint8)


def _splat(points: np.ndarray, colours: np.ndarray, size: int) -> np.ndarray:
    """Orthographic z-buffered point splat, viewing along +z with y up and x left (PyTorch3D camera axes).

    ``points`` (N, 3) already centred and scaled to about [-1, 1]; ``colours`` (N, 3) uint8; returns
    (size, size, 3) uint8. Each point covers 2×2 pixels; per pixel the nearest point (smallest z) wins.
    """
    u = np.round((-points[:, 0] * 0.5 + 0.5) * (size - 2)).astype(np.int64)
    v = np.round((-points[:, 1] * 0.5 + 0.5) * (size - 2)).astype(np.int64)
    uu = np.concatenate([u, u + 1, u, u + 1])
    vv = np.concatenate([v, v, v + 1, v + 1])
    source = np.tile(np.arange(len(points)), 4)
    keep = (uu >= 0) & (uu < size) & (vv >= 0) & (vv < size)
    pix, source = vv[keep] * size + uu[keep], source[keep]
    order = np.lexsort((points[source, 2], pix))  # by pixel, then nearest first
    first = np.unique(pix[order], return_index=True)[1]
    winners = order[first]
    image = np.tile(_BACKGROUND, (size * size, 1))
    image[pix[winners]] = colours[source[winners]]
    return image.reshape(size, size, 3)


def _preview_tiles(gaussians: GaussianSet, frame: str) -> list[np.ndarray]:
    finite = np.isfinite(gaussians.xyz).all(axis=1) & np.isfinite(gaussians.f_dc).all(axis=1)
    with np.errstate(over="ignore"):
        alpha = 1.0 / (1.0 + np.exp(-gaussians.opacity.astype(np.float64)))
    keep = finite & (alpha > 0.2)
    if not keep.any():
        keep = finite
    if not keep.any():
        raise ValueError("scene.ply has no Gaussian with finite position and colour")
    points = gaussians.xyz[keep].astype(np.float64) @ frame_matrix(frame)  # back to PyTorch3D camera axes
    colours = np.clip((0.5 + _SH_C0 * gaussians.f_dc[keep]) * 255.0, 0, 255).astype(np.uint8)
    if len(points) > _MAX_POINTS:
        pick = np.random.default_rng(0).choice(len(points), _MAX_POINTS, replace=False)
        points, colours = points[pick], colours[pick]
    centre = np.median(points, axis=0)
    points = points - centre
    radius = float(np.percentile(np.linalg.norm(points, axis=1), 99)) or 1.0
    points = points / (radius * 1.05)
    tiles = []
    for azimuth in _AZIMUTHS_DEG:
        a = np.deg2rad(azimuth)
        turn = np.array([[np.cos(a), 0.0, np.sin(a)], [0.0, 1.0, 0.0], [-np.sin(a), 0.0, np.cos(a)]])
        tiles.append(_splat(points @ turn.T, colours, _TILE))
    return tiles


def render_preview(scene_dir: Path, *, frame: str) -> str | None:
    """Render scene.ply (in ``frame``) from four azimuths into scene/preview.png (2×2 grid).

    A dependency-free numpy point splat (≈1 s for a few hundred thousand Gaussians): colour from the DC term,
    Gaussians with opacity < 0.2 dropped, 2×2 px splats, nearest wins, orthographic, turning about the
    camera's up axis through the scene's median. Returns None when written, or a note saying why it was
    skipped (it never raises: a preview must not fail a run).
    """
    scene_dir = Path(scene_dir)
    ply = scene_dir / SCENE_PLY
    if not ply.exists():
        note = f"preview skipped: no {SCENE_PLY} (no Gaussians were decoded)"
        log.warning(note)
        return note
    try:
        from PIL import Image

        tiles = _preview_tiles(read_gaussians_ply(ply), frame)
        top = np.concatenate(tiles[:2], axis=1)
        bottom = np.concatenate(tiles[2:], axis=1)
        grid = Image.fromarray(np.concatenate([top, bottom], axis=0))
        write_with(scene_dir / PREVIEW_PNG, lambda tmp: grid.save(str(tmp), format="PNG"))
    except Exception as exc:  # noqa: BLE001 - the preview is optional; the reason is returned and logged
        note = f"preview skipped: {type(exc).__name__}: {exc}"
        log.warning(note)
        return note
    return None
