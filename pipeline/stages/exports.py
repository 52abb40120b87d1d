"""Finished objects written in other file formats: OBJ, STL, USDZ and textured GLB (issue 22).

Input: :class:`PosedObject` values, each a vertex-coloured mesh in the canonical GLB frame (y-up) with the 4×4
``to_scene`` transform that ``scene.glb`` puts on its node (:func:`~pipeline.stages.frames.glb_node_matrix`),
and optionally its Gaussians (canonical z-up) with their own transform. Every file is posed into the scene
frame, so the per-object files of a run assemble into the scene when imported together.

Files (``objects/NNN/`` for one object, ``scene/`` for the scene; names in :data:`FILE_NAMES`):

- ``obj``: ``object.obj`` + ``object.mtl`` + ``object_texture.png`` / ``scene.obj`` + ``scene.mtl`` +
  ``scene_<name>.png`` (one ``o`` group, material and texture per object). Vertex positions in the scene frame;
  the MTL names its PNG relatively; matte material (Ka 0, Kd 1, Ks 0). Written by trimesh's exporter.
- ``stl``: ``mesh.stl`` / ``scene.stl``, binary, in the scene frame, in the pose's units (metres when the depth
  was metric); slicers read STL as millimetres, so scale by 1000 there. Binary STL has no named solids: the
  scene file is one triangle list whose facets are grouped per object, in the order given, with each facet's
  2-byte attribute holding the object's index and the 80-byte header saying so. Blender, PrusaSlicer, Cura and
  trimesh read it as one mesh (the objects are its connected parts; trimesh exposes the attributes as
  ``face_attributes["stl"]``); readers of the VisCAM/Magics colour extension may tint facets by it. A
  multi-solid ASCII STL keeps names but is ~5× larger and not read as several solids by every tool; use the
  per-object ``mesh.stl`` files for one solid per object.
- ``usdz``: ``object.usdz`` / ``scene.usdz`` (usd-core): Y-up, metersPerUnit 1, ``/root`` (default prim) with
  one Xform per object whose transform is its pose, a Mesh child (points in the canonical y-up mesh
  coordinates, face-varying ``st``, vertex normals, vertex ``displayColor`` in linear RGB) and a
  UsdPreviewSurface material whose diffuse colour is the baked texture, packaged inside the usdz. USD wants Y
  up, so the transform is the pose converted from ``frame`` into the ``opengl`` frame (x right, y up, the
  camera looking -Z) whatever ``frame`` is (a no-op for ``opengl``); the source frame is in the layer's
  customLayerData.
- ``glb-textured``: ``mesh_textured.glb`` / ``scene_textured.glb``: the baked texture instead of vertex colours,
  one node per object carrying ``to_scene`` (like scene.glb), matte PBR material (metallic 0, roughness 0.9;
  glTF's default material is fully metallic), the frame in the scene extras.

Textures (:func:`bake_texture`): xatlas unwraps the mesh (charts capped at ~500 faces each, which keeps the
unwrap near-linear: ~2 s for 100k faces of a marching-cubes surface instead of minutes; meshes full of slivers,
such as a 200k-face UV sphere's pole fans, still take minutes in xatlas), triangle ids are rasterised in UV
space (PIL) and every covered texel gets its colour from barycentric interpolation of the vertex colours or,
when the object has Gaussians, from its Gaussians (preferred: SAM 3D Objects' own texture bake takes the colour
from its Gaussians too): the k = 8 nearest centres (scipy cKDTree), each weighted by its opacity
times its unnormalised kernel ``exp(-½ d²)`` with the Mahalanobis distance of its anisotropic covariance widened
by the texel's squared distance to the nearest centre (so the nearest Gaussian always counts); Gaussians with
opacity below 0.05 are ignored. Empty texels take the colour of the nearest covered texel (all of them, not a
few texels' pad), so neither bilinear filtering nor mipmaps pull background into the seams. Texture values are
the 8-bit colours themselves, stored as sRGB. Bakes are memoised by content (the last 8), so writing several
formats of one object and then the scene unwraps each mesh once.

Atomicity: every file is written under a temporary name in its directory and renamed when complete; a
multi-file format renames the textures first, then the MTL, the main file last.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import re
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, Sequence

import numpy as np

from pipeline.atomic import write_bytes_atomic, write_with
from pipeline.stages.frames import Z_UP_FROM_Y_UP, frame_matrix, quat_to_matrix, transform_points

if TYPE_CHECKING:  # pragma: no cover
    import trimesh
    from PIL import Image

    from pipeline.backends.base import GaussianSet

__all__ = ["FORMATS", "FILE_NAMES", "ExportUnavailable", "PosedObject", "bake_texture", "write_object", "write_scene"]

log = logging.getLogger(__name__)

#: Export format name -> one-line description (the names `python -m pipeline export --format` takes).
FORMATS: Final[dict[str, str]] = {
    "obj": "Wavefront OBJ + MTL + PNG texture, scene frame (Blender, MeshLab, most DCC tools)",
    "stl": "binary STL, scene frame, pose units (metres when metric); facets grouped per object (slicers, CAD)",
    "usdz": "USDZ with a UsdPreviewSurface texture, Y-up, metersPerUnit 1 (AR Quick Look, Reality Composer)",
    "glb-textured": "glTF binary with a baked colour texture instead of vertex colours (web viewers, engines)",
}

#: Per format: (main file for one object, main file for the scene).
FILE_NAMES: Final[dict[str, tuple[str, str]]] = {
    "obj": ("object.obj", "scene.obj"),  # not mesh.obj: reconstruct.sam3d.export_obj writes that (canonical frame)
    "stl": ("mesh.stl", "scene.stl"),
    "usdz": ("object.usdz", "scene.usdz"),
    "glb-textured": ("mesh_textured.glb", "scene_textured.glb"),
}

_FACES_PER_CHART = 500  # xatlas chart-area cap (see the module docstring); larger charts cost quadratic time
_PACK_PADDING = 4  # atlas texels between charts
_K_NEAREST = 8
_MIN_ALPHA = 0.05
_SH_C0 = 0.28209479177387814
_ROUGHNESS = 0.9
_BAKE_CACHE_SIZE = 8
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_Y_UP_FROM_Z_UP = np.eye(4)
_Y_UP_FROM_Z_UP[:3, :3] = Z_UP_FROM_Y_UP.T


class ExportUnavailable(Exception):
    """A format's library is missing; the message names the pip package that provides it."""


@dataclass(frozen=True, eq=False)  # eq=False: arrays have no truth value, so identity equality and hashing
class PosedObject:
    """One finished object, ready to export.

    ``name``: node, prim, group and file-name part (``object_001``: letters, digits, ``_``). ``mesh``: trimesh in
    the canonical GLB frame (y-up) with RGBA uint8 vertex colours. ``to_scene``: (4, 4) canonical y-up mesh
    coordinates -> scene frame (``frames.glb_node_matrix(pose_matrix, frame)``). ``gaussians``: the object's
    Gaussians in the canonical z-up frame, or None; ``gaussians_to_scene``: (4, 4) canonical z-up -> scene frame
    (frame change @ pose matrix); None means the canonical relation (y-up mesh = z-up Gaussians turned).
    """

    name: str
    mesh: trimesh.Trimesh
    to_scene: np.ndarray
    gaussians: GaussianSet | None = None
    gaussians_to_scene: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"object name {self.name!r} must be letters, digits and '_' (e.g. 'object_001')")
        for field in ("to_scene", "gaussians_to_scene"):
            value = getattr(self, field)
            if value is None:
                continue
            matrix = np.asarray(value, dtype=np.float64)
            if matrix.shape != (4, 4) or not np.isfinite(matrix).all():
                raise ValueError(f"{self.name}: {field} must be a finite (4, 4) matrix, got shape {matrix.shape}")
            object.__setattr__(self, field, matrix)


def _require(module: str, package: str, what: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ExportUnavailable(f"{what} needs {package}: pip install {package}") from exc


# ---------------------------------------------------------------------------------------------- baking


@dataclass(frozen=True, eq=False)
class _Bake:
    """An unwrapped mesh: ``vmap`` (V',) original vertex of each new vertex; ``faces`` (F, 3) into the new
    vertices, face for face the original faces; ``uv`` (V', 2) in [0, 1], v up; ``image`` size×size RGB."""

    vmap: np.ndarray
    faces: np.ndarray
    uv: np.ndarray
    image: Image.Image
    source: Literal["gaussians", "vertex colours"]


_BAKES: OrderedDict[str, _Bake] = OrderedDict()


def _vertex_rgb(mesh: trimesh.Trimesh) -> np.ndarray:
    visual = mesh.visual.to_color() if mesh.visual.kind == "texture" else mesh.visual
    return np.asarray(visual.vertex_colors, dtype=np.float64)[:, :3]


def _unwrap(mesh: trimesh.Trimesh, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    xatlas = _require("xatlas", "xatlas", "texture baking")
    faces = np.asarray(mesh.faces, dtype=np.uint32)
    charts = xatlas.ChartOptions()
    if len(faces) > _FACES_PER_CHART:
        charts.max_chart_area = float(mesh.area) * _FACES_PER_CHART / len(faces)
    packing = xatlas.PackOptions()
    packing.resolution = size
    packing.padding = _PACK_PADDING
    packing.bilinear = True
    atlas = xatlas.Atlas()
    atlas.add_mesh(np.asarray(mesh.vertices, dtype=np.float32), faces)
    atlas.generate(chart_options=charts, pack_options=packing)
    if atlas.atlas_count != 1:  # charts spread over several images: pack into one, whatever its size
        packing.resolution = 0
        atlas.generate(chart_options=charts, pack_options=packing)
    vmap, new_faces, uv = atlas[0]
    return vmap.astype(np.int64), new_faces.astype(np.int64), uv.astype(np.float64)


def _rasterise(corners_px: np.ndarray, size: int) -> np.ndarray:
    """(size, size) int64 id of the triangle covering each texel (-1: none); ``corners_px`` (F, 3, 2) pixels."""
    from PIL import Image, ImageDraw

    canvas = Image.new("I", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    for i, flat in enumerate(corners_px.reshape(-1, 6).tolist()):
        draw.polygon(flat, fill=i + 1)
    return np.asarray(canvas, dtype=np.int64) - 1


def _barycentrics(p: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """(M, 3) barycentrics of 2D points ``p`` in triangles (a, b, c), clamped into the triangle and summing to 1."""
    v0, v1, v2 = b - a, c - a, p - a
    d00, d01, d11 = (v0 * v0).sum(1), (v0 * v1).sum(1), (v1 * v1).sum(1)
    d20, d21 = (v2 * v0).sum(1), (v2 * v1).sum(1)
    denom = d00 * d11 - d01 * d01
    valid = denom > 1e-12
    safe = np.where(valid, denom, 1.0)
    v = (d11 * d20 - d01 * d21) / safe
    w = (d00 * d21 - d01 * d20) / safe
    bary = np.clip(np.stack([1.0 - v - w, v, w], axis=1), 0.0, None)
    bary[~valid] = 1.0 / 3.0
    return bary / np.maximum(bary.sum(1, keepdims=True), 1e-12)


def _gaussian_colours(points: np.ndarray, gaussians: GaussianSet, gaussians_to_mesh: np.ndarray) -> np.ndarray:
    """(M, 3) colours in [0, 1] at mesh-coordinate ``points`` (M, 3) from the Gaussians (module docstring)."""
    from scipy.spatial import cKDTree

    xyz = np.asarray(gaussians.xyz, dtype=np.float64)
    with np.errstate(over="ignore"):
        alpha = 1.0 / (1.0 + np.exp(-np.asarray(gaussians.opacity, dtype=np.float64).reshape(-1)))
    finite = np.isfinite(xyz).all(1) & np.isfinite(gaussians.f_dc).all(1) & np.isfinite(gaussians.log_scale).all(1)
    keep = finite & (alpha >= _MIN_ALPHA)
    if not keep.any():
        keep = finite
    if not keep.any():
        raise ValueError("no Gaussian has a finite position, colour and scale to bake from")
    mu, alpha = xyz[keep], alpha[keep]
    colour = np.clip(0.5 + _SH_C0 * np.asarray(gaussians.f_dc, dtype=np.float64)[keep], 0.0, 1.0)
    var = np.exp(2.0 * np.asarray(gaussians.log_scale, dtype=np.float64)[keep])
    rot = quat_to_matrix(np.asarray(gaussians.rot_wxyz, dtype=np.float64)[keep])
    query = transform_points(np.linalg.inv(gaussians_to_mesh), points)  # Mahalanobis is affine-invariant
    k = min(_K_NEAREST, len(mu))
    dist, idx = cKDTree(mu).query(query, k=k, workers=-1)
    dist, idx = dist.reshape(len(query), k), idx.reshape(len(query), k)
    out = np.empty((len(query), 3))
    for start in range(0, len(query), 32768):
        sl = slice(start, start + 32768)
        nb = idx[sl]
        local = np.einsum("mkji,mkj->mki", rot[nb], query[sl, None, :] - mu[nb])  # Rᵀ (p - μ)
        widened = var[nb] + dist[sl, :1, None] ** 2 + 1e-18
        weight = alpha[nb] * np.exp(-0.5 * (local**2 / widened).sum(-1))
        out[sl] = (weight[..., None] * colour[nb]).sum(1) / np.maximum(weight.sum(1, keepdims=True), 1e-300)
    return out


def _fill_empty(texels: np.ndarray, covered: np.ndarray) -> np.ndarray:
    """Every uncovered texel takes the value of the nearest covered one (Euclidean distance transform)."""
    from scipy.ndimage import distance_transform_edt

    if covered.all() or not covered.any():
        return texels
    nearest = distance_transform_edt(~covered, return_distances=False, return_indices=True)
    return texels[nearest[0], nearest[1]]


def _bake(mesh: trimesh.Trimesh, size: int, gaussians: GaussianSet | None, gaussians_to_mesh: np.ndarray) -> _Bake:
    from PIL import Image

    vmap, faces, uv = _unwrap(mesh, size)
    px = np.stack([uv[:, 0] * size - 0.5, (1.0 - uv[:, 1]) * size - 0.5], axis=1)  # texel centres at integers
    ids = _rasterise(px[faces], size)
    rows, cols = np.nonzero(ids >= 0)
    face = ids[rows, cols]
    corners = px[faces[face]]  # (M, 3, 2)
    bary = _barycentrics(np.stack([cols, rows], 1).astype(np.float64), corners[:, 0], corners[:, 1], corners[:, 2])
    original = vmap[faces[face]]  # (M, 3) original vertex ids
    if gaussians is not None and len(gaussians) > 0:
        vertices = np.asarray(mesh.vertices, dtype=np.float64)
        points = np.einsum("mk,mkd->md", bary, vertices[original])
        rgb = _gaussian_colours(points, gaussians, gaussians_to_mesh) * 255.0
        source: Literal["gaussians", "vertex colours"] = "gaussians"
    else:
        rgb = np.einsum("mk,mkd->md", bary, _vertex_rgb(mesh)[original])
        source = "vertex colours"
    texels = np.zeros((size, size, 3), dtype=np.uint8)
    texels[rows, cols] = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    image = Image.fromarray(_fill_empty(texels, ids >= 0))  # (H, W, 3) uint8: RGB
    return _Bake(vmap=vmap, faces=faces, uv=uv, image=image, source=source)


def _bake_key(mesh: trimesh.Trimesh, size: int, gaussians: GaussianSet | None, matrix: np.ndarray) -> str:
    digest = hashlib.blake2b(str(size).encode(), digest_size=20)
    arrays = [mesh.vertices, mesh.faces, _vertex_rgb(mesh), matrix]
    if gaussians is not None:
        arrays += [gaussians.xyz, gaussians.f_dc, gaussians.opacity, gaussians.log_scale, gaussians.rot_wxyz]
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _cached_bake(obj: PosedObject, size: int) -> _Bake:
    matrix = _Y_UP_FROM_Z_UP if obj.gaussians_to_scene is None else np.linalg.inv(obj.to_scene) @ obj.gaussians_to_scene
    key = _bake_key(obj.mesh, size, obj.gaussians, matrix)
    if key in _BAKES:
        _BAKES.move_to_end(key)
        return _BAKES[key]
    bake = _bake(obj.mesh, size, obj.gaussians, matrix)
    log.info("%s: %d×%d texture baked from its %s", obj.name, size, size, bake.source)
    _BAKES[key] = bake
    while len(_BAKES) > _BAKE_CACHE_SIZE:
        _BAKES.popitem(last=False)
    return bake


def _check_size(size: int) -> int:
    if not isinstance(size, int) or not 16 <= size <= 8192:
        raise ValueError(f"texture size must be an integer in 16..8192, got {size!r}")
    return size


def _textured(mesh: trimesh.Trimesh, bake: _Bake, material: Any) -> trimesh.Trimesh:
    import trimesh

    return trimesh.Trimesh(
        vertices=np.asarray(mesh.vertices)[bake.vmap],
        faces=bake.faces,
        vertex_normals=np.asarray(mesh.vertex_normals)[bake.vmap],  # the original's: no shading seams at UV seams
        visual=trimesh.visual.TextureVisuals(uv=bake.uv, material=material),
        process=False,
    )


def bake_texture(
    mesh: trimesh.Trimesh,
    size: int,
    *,
    gaussians: GaussianSet | None = None,
    gaussians_to_mesh: np.ndarray | None = None,
) -> trimesh.Trimesh:
    """A copy of ``mesh`` UV-unwrapped (xatlas) with its colour baked into a ``size``×``size`` RGB texture.

    Colour from the Gaussians when given (``gaussians_to_mesh``: (4, 4) Gaussian coordinates -> mesh
    coordinates, identity when None), else from the vertex colours; method in the module docstring. Vertices
    are split at UV seams (positions and normals copied from the original vertex). The returned mesh has
    ``TextureVisuals`` (uv (V', 2), v up; a PBR material with the PIL image, metallic 0, roughness 0.9).

    Raises:
        ExportUnavailable: xatlas is not installed.
        ValueError: ``size`` outside 16..8192, or Gaussians given but none usable.
    """
    import trimesh

    matrix = np.eye(4) if gaussians_to_mesh is None else np.asarray(gaussians_to_mesh, dtype=np.float64)
    bake = _bake(mesh, _check_size(size), gaussians, matrix)
    material = trimesh.visual.material.PBRMaterial(
        name="baked", baseColorTexture=bake.image, metallicFactor=0.0, roughnessFactor=_ROUGHNESS
    )
    return _textured(mesh, bake, material)


# ---------------------------------------------------------------------------------------------- writers


def _posed(mesh: trimesh.Trimesh, matrix: np.ndarray) -> trimesh.Trimesh:
    """``mesh`` with vertices and normals moved by ``matrix`` (visual kept; winding kept proper)."""
    import trimesh

    linear = matrix[:3, :3]
    normals = np.asarray(mesh.vertex_normals) @ np.linalg.inv(linear)  # inverse transpose, row vectors
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
    faces = np.asarray(mesh.faces)
    return trimesh.Trimesh(
        vertices=transform_points(matrix, mesh.vertices),
        faces=faces if np.linalg.det(linear) > 0 else faces[:, ::-1],
        vertex_normals=normals,
        visual=mesh.visual.copy(),  # a visual belongs to one mesh
        process=False,
    )


def _commit(out_dir: Path, files: Sequence[tuple[str, bytes]]) -> list[Path]:
    """Write every ``(name, data)`` to a temporary name first, then rename them in order; no partial set."""
    out_dir.mkdir(parents=True, exist_ok=True)
    staged: list[tuple[Path, Path]] = []
    try:
        for name, data in files:
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=out_dir)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            staged.append((Path(tmp), out_dir / name))
        for tmp, final in staged:
            os.replace(tmp, final)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    return [final for _, final in staged]


def _obj_material_class() -> type:
    from trimesh.visual.material import SimpleMaterial

    class ObjMaterial(SimpleMaterial):
        """trimesh's OBJ exporter merges materials of equal hash; name it in the hash: one per object."""

        def __hash__(self) -> int:
            return hash((super().__hash__(), self.name))

    return ObjMaterial


def _write_obj(objects: Sequence[PosedObject], out_dir: Path, main: str, frame: str, size: int) -> list[Path]:
    import trimesh
    from trimesh.exchange.obj import export_obj

    stem = Path(main).stem
    is_scene = main == FILE_NAMES["obj"][1]
    material_class = _obj_material_class()
    scene = trimesh.Scene()
    for obj in objects:
        bake = _cached_bake(obj, size)
        material = material_class(
            image=bake.image, name=f"{stem}_{obj.name}" if is_scene else f"{stem}_texture",
            diffuse=(255, 255, 255, 255), ambient=(0, 0, 0, 255), specular=(0, 0, 0, 255), glossiness=1.0,
        )  # fmt: skip
        scene.add_geometry(_posed(_textured(obj.mesh, bake, material), obj.to_scene), node_name=obj.name,
                           geom_name=obj.name)  # fmt: skip
    text, extra = export_obj(
        scene, include_normals=True, include_color=False, return_texture=True, mtl_name=f"{stem}.mtl",
        header=f"pipeline export: {len(objects)} object(s), frame {frame}, units of the pose",
    )  # fmt: skip
    textures = sorted((n, d) for n, d in extra.items() if not n.endswith(".mtl"))
    files = [*textures, (f"{stem}.mtl", extra[f"{stem}.mtl"]), (main, text.encode("utf-8"))]
    written = _commit(out_dir, files)
    return [written[-1], *written[:-1]]


def _stl_bytes(objects: Sequence[PosedObject], frame: str) -> bytes:
    record = np.dtype([("normal", "<f4", (3,)), ("vertices", "<f4", (3, 3)), ("attribute", "<u2")])
    parts = []
    for index, obj in enumerate(objects):
        posed = _posed(obj.mesh, obj.to_scene)
        part = np.zeros(len(posed.faces), dtype=record)
        part["normal"] = posed.face_normals
        part["vertices"] = posed.triangles
        part["attribute"] = index
        parts.append(part)
    # never start the header with "solid": some readers then take the file for ASCII STL
    header = f"pipeline STL frame={frame} units=pose objects={len(objects)} attribute=object index"
    head = header.encode("ascii")[:80].ljust(80, b" ")
    triangles = np.concatenate(parts)
    return head + np.uint32(len(triangles)).tobytes() + triangles.tobytes()


def _srgb_to_linear(rgb: np.ndarray) -> np.ndarray:
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def _to_opengl(frame: str) -> np.ndarray:
    """(4, 4) taking ``frame`` coordinates into the ``opengl`` frame (both are rotations of PyTorch3D's)."""
    change = np.eye(4)
    change[:3, :3] = frame_matrix("opengl") @ frame_matrix(frame).T
    return change


def _define_object_prim(stage: Any, obj: PosedObject, bake: _Bake, frame: str, texture: str) -> None:
    from pxr import Gf, Sdf, UsdGeom, UsdShade, Vt

    path = f"/root/{obj.name}"
    xform = UsdGeom.Xform.Define(stage, path)
    xform.AddTransformOp().Set(Gf.Matrix4d((_to_opengl(frame) @ obj.to_scene).T.tolist()))  # USD: row vectors
    mesh = UsdGeom.Mesh.Define(stage, f"{path}/mesh")
    points = np.asarray(obj.mesh.vertices, dtype=np.float32)
    faces = np.asarray(obj.mesh.faces, dtype=np.int32)
    mesh.CreatePointsAttr(Vt.Vec3fArray.FromNumpy(points))
    mesh.CreateExtentAttr(Vt.Vec3fArray.FromNumpy(np.stack([points.min(0), points.max(0)])))
    mesh.CreateFaceVertexCountsAttr(Vt.IntArray.FromNumpy(np.full(len(faces), 3, dtype=np.int32)))
    mesh.CreateFaceVertexIndicesAttr(Vt.IntArray.FromNumpy(np.ascontiguousarray(faces.reshape(-1))))
    mesh.CreateSubdivisionSchemeAttr(UsdGeom.Tokens.none)  # else renderers smooth it as a subdivision cage
    mesh.CreateNormalsAttr(Vt.Vec3fArray.FromNumpy(np.asarray(obj.mesh.vertex_normals, dtype=np.float32)))
    mesh.SetNormalsInterpolation(UsdGeom.Tokens.vertex)
    colours = _srgb_to_linear(_vertex_rgb(obj.mesh)).astype(np.float32)
    mesh.CreateDisplayColorPrimvar(UsdGeom.Tokens.vertex).Set(Vt.Vec3fArray.FromNumpy(colours))
    st = UsdGeom.PrimvarsAPI(mesh).CreatePrimvar("st", Sdf.ValueTypeNames.TexCoord2fArray, UsdGeom.Tokens.faceVarying)
    st.Set(Vt.Vec2fArray.FromNumpy(np.ascontiguousarray(bake.uv[bake.faces].reshape(-1, 2), dtype=np.float32)))

    material = UsdShade.Material.Define(stage, f"{path}/material")
    surface = UsdShade.Shader.Define(stage, f"{path}/material/surface")
    surface.CreateIdAttr("UsdPreviewSurface")
    surface.CreateInput("metallic", Sdf.ValueTypeNames.Float).Set(0.0)
    surface.CreateInput("roughness", Sdf.ValueTypeNames.Float).Set(_ROUGHNESS)
    reader = UsdShade.Shader.Define(stage, f"{path}/material/st_reader")
    reader.CreateIdAttr("UsdPrimvarReader_float2")
    reader.CreateInput("varname", Sdf.ValueTypeNames.String).Set("st")
    reader.CreateOutput("result", Sdf.ValueTypeNames.Float2)
    image = UsdShade.Shader.Define(stage, f"{path}/material/texture")
    image.CreateIdAttr("UsdUVTexture")
    image.CreateInput("file", Sdf.ValueTypeNames.Asset).Set(texture)
    image.CreateInput("sourceColorSpace", Sdf.ValueTypeNames.Token).Set("sRGB")
    image.CreateInput("st", Sdf.ValueTypeNames.Float2).ConnectToSource(reader.ConnectableAPI(), "result")
    image.CreateOutput("rgb", Sdf.ValueTypeNames.Float3)
    surface.CreateInput("diffuseColor", Sdf.ValueTypeNames.Color3f).ConnectToSource(image.ConnectableAPI(), "rgb")
    material.CreateSurfaceOutput().ConnectToSource(surface.ConnectableAPI(), "surface")
    UsdShade.MaterialBindingAPI.Apply(mesh.GetPrim()).Bind(material)


def _write_usdz(objects: Sequence[PosedObject], out_dir: Path, main: str, frame: str, size: int) -> list[Path]:
    from pxr import Sdf, Usd, UsdGeom, UsdUtils

    bakes = [_cached_bake(obj, size) for obj in objects]

    def package(tmp: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="usdz-") as work:
            layer = Path(work) / f"{Path(main).stem}.usdc"
            stage = Usd.Stage.CreateNew(str(layer))
            UsdGeom.SetStageUpAxis(stage, UsdGeom.Tokens.y)
            UsdGeom.SetStageMetersPerUnit(stage, 1.0)
            stage.SetDefaultPrim(UsdGeom.Xform.Define(stage, "/root").GetPrim())
            stage.GetRootLayer().customLayerData = {"frame": "opengl", "source_frame": frame, "units": "pose"}
            for obj, bake in zip(objects, bakes, strict=True):
                bake.image.save(Path(work) / f"{obj.name}.png", format="PNG")
                _define_object_prim(stage, obj, bake, frame, f"./{obj.name}.png")  # ./: anchored, not a search path
            stage.GetRootLayer().Save()
            if not UsdUtils.CreateNewUsdzPackage(Sdf.AssetPath(str(layer)), str(tmp)):
                raise RuntimeError(f"usd-core could not package {out_dir / main} (see its warnings above)")

    return [write_with(out_dir / main, package)]


def _write_glb(objects: Sequence[PosedObject], out_dir: Path, main: str, frame: str, size: int) -> list[Path]:
    import trimesh

    scene = trimesh.Scene()
    scene.metadata["frame"] = frame
    for obj in objects:
        bake = _cached_bake(obj, size)
        material = trimesh.visual.material.PBRMaterial(
            name=obj.name, baseColorTexture=bake.image, metallicFactor=0.0, roughnessFactor=_ROUGHNESS
        )
        scene.add_geometry(_textured(obj.mesh, bake, material), node_name=obj.name, geom_name=obj.name,
                           transform=obj.to_scene)  # fmt: skip
    return [write_bytes_atomic(out_dir / main, scene.export(file_type="glb"))]


def _write(fmt: str, objects: Sequence[PosedObject], out_dir: Path, *, scene: bool, frame: str, size: int) -> list[Path]:
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    frame_matrix(frame)  # validates the name
    _check_size(size)
    if not objects:
        raise ValueError("nothing to export: no objects")
    names = [obj.name for obj in objects]
    if len(set(names)) != len(names):
        raise ValueError(f"object names must be unique, got {names}")
    main = FILE_NAMES[fmt][1 if scene else 0]
    out_dir = Path(out_dir)
    if fmt == "stl":
        return [write_bytes_atomic(out_dir / main, _stl_bytes(objects, frame))]
    if fmt == "usdz":
        _require("pxr", "usd-core", "USDZ export")
    _require("xatlas", "xatlas", f"{fmt} export (texture baking)")
    writer = {"obj": _write_obj, "usdz": _write_usdz, "glb-textured": _write_glb}[fmt]
    return writer(objects, out_dir, main, frame, size)


def write_object(obj: PosedObject, fmt: str, out_dir: Path, *, frame: str, texture_size: int = 1024) -> list[Path]:
    """Write one object in format ``fmt`` (a :data:`FORMATS` name) into ``out_dir`` (``objects/NNN/``).

    The object is posed into the scene frame ``frame`` (the frame ``obj.to_scene`` maps into; USDZ converts it
    to Y-up ``opengl``). Returns the files written, main file first.

    Raises:
        ValueError: unknown ``fmt`` (the valid names are listed) or ``frame``, bad ``texture_size``.
        ExportUnavailable: the format's library (xatlas, usd-core) is missing; nothing is written.
    """
    return _write(fmt, [obj], out_dir, scene=False, frame=frame, size=texture_size)


def write_scene(
    objects: Sequence[PosedObject], fmt: str, out_dir: Path, *, frame: str, texture_size: int = 1024
) -> list[Path]:
    """Write every object into one scene file of format ``fmt`` in ``out_dir`` (``scene/``); see :func:`write_object`.

    One part per object, in the order given: an OBJ group + material + texture, a run of STL facets with the
    object's index as attribute, a USD Xform, a glTF node (named ``obj.name``).
    """
    return _write(fmt, list(objects), out_dir, scene=True, frame=frame, size=texture_size)
