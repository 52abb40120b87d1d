"""OBJ, STL, USDZ and textured-GLB exports (pipeline.stages.exports), read back with independent readers.

Objects are ellipsoids with a smooth vertex-colour field, posed by a random pose into the opencv frame (the
default scene frame, y down, so a missing frame conversion shows). Readers: trimesh (OBJ, STL, GLB), usd-core
(USDZ), numpy (the binary STL records, the GLB's JSON chunk) and a bilinear texture sampler written here.
Stated bake errors (8-bit units, sampled at every vertex's UV): vertex colours mean ≤ 1, max ≤ 4; Gaussians
mean ≤ 1.5, max ≤ 8 (measured: 0.1 / 1 and 0.25 / 3).
"""

from __future__ import annotations

import json
import os
import struct
import sys
import zipfile

import numpy as np
import pytest
import trimesh
from PIL import Image

from pipeline.backends.base import GaussianSet
from pipeline.stages import exports
from pipeline.stages.exports import FORMATS, ExportUnavailable, PosedObject, bake_texture, write_object, write_scene
from pipeline.stages.frames import FRAMES, Z_UP_FROM_Y_UP, frame_matrix, glb_node_matrix, pose_matrix, transform_points

SH_C0 = 0.28209479177387814
Y_UP_FROM_Z_UP = np.eye(4)
Y_UP_FROM_Z_UP[:3, :3] = Z_UP_FROM_Y_UP.T


def vertex_field(p: np.ndarray) -> np.ndarray:
    """The mesh's smooth colour field (N, 3) in 0..255 at y-up mesh coordinates."""
    return np.clip(np.stack([127.5 + 110 * np.sin(2 * p[:, 0]), 127.5 + 110 * np.cos(1.5 * p[:, 1] + 0.3),
                             127.5 + 110 * np.sin(p[:, 2] + p[:, 0])], axis=1), 0, 255)  # fmt: skip


def gaussian_field(p: np.ndarray) -> np.ndarray:
    """A different field, carried by the Gaussians only (so the bake's source shows)."""
    return np.clip(np.stack([127.5 + 110 * np.cos(3 * p[:, 1]), 127.5 + 110 * np.sin(2 * p[:, 2]),
                             127.5 - 100 * p[:, 0]], axis=1), 0, 255)  # fmt: skip


def ellipsoid(subdivisions: int = 3, axes=(0.5, 0.35, 0.25)) -> trimesh.Trimesh:
    mesh = trimesh.creation.icosphere(subdivisions=subdivisions)
    mesh.vertices = mesh.vertices * np.asarray(axes)
    rgb = np.rint(vertex_field(mesh.vertices))
    mesh.visual.vertex_colors = np.column_stack([rgb, np.full(len(rgb), 255)]).astype(np.uint8)
    return mesh


def surface_gaussians(axes=(0.5, 0.35, 0.25), *, floaters: bool = False) -> GaussianSet:
    """Dense small Gaussians on the ellipsoid, in the canonical z-up frame, coloured by ``gaussian_field``;
    with ``floaters``, a transparent pure-green copy of each (opacity 3e-4) that the bake must ignore."""
    points = trimesh.creation.icosphere(subdivisions=6).vertices * np.asarray(axes)  # y-up mesh coordinates
    colour = gaussian_field(points) / 255.0
    opacity = np.full(len(points), 4.0)
    if floaters:
        points = np.concatenate([points, points * 1.002])
        colour = np.concatenate([colour, np.tile([0.0, 1.0, 0.0], (len(colour), 1))])
        opacity = np.concatenate([opacity, np.full(len(opacity), -8.0)])
    n = len(points)
    return GaussianSet(
        xyz=(points @ Z_UP_FROM_Y_UP.T).astype(np.float32),
        f_dc=((colour - 0.5) / SH_C0).astype(np.float32),
        opacity=opacity.astype(np.float32),
        log_scale=np.full((n, 3), np.log(0.005), np.float32),
        rot_wxyz=np.tile(np.float32([1, 0, 0, 0]), (n, 1)),
    )


def make_object(seed: int, *, frame: str = "opencv", mesh=None, gaussians: GaussianSet | None = None) -> PosedObject:
    rng = np.random.default_rng(seed)
    q = rng.normal(size=4)
    pose = pose_matrix(q / np.linalg.norm(q), rng.uniform([-1, -1, 2], [1, 1, 5]), [rng.uniform(0.5, 2.0)] * 3)
    change = np.eye(4)
    change[:3, :3] = frame_matrix(frame)
    return PosedObject(
        name=f"object_{seed:03d}",
        mesh=ellipsoid() if mesh is None else mesh,
        to_scene=glb_node_matrix(pose, frame),
        gaussians=gaussians,
        gaussians_to_scene=None if gaussians is None else change @ pose,
    )


def posed_points(obj: PosedObject) -> np.ndarray:
    return transform_points(obj.to_scene, obj.mesh.vertices)


def bbox(points: np.ndarray) -> np.ndarray:
    return np.stack([np.min(points, axis=0), np.max(points, axis=0)])


def sample(image: Image.Image, uv: np.ndarray) -> np.ndarray:
    """Bilinear RGB samples (N, 3) at ``uv`` (v up, texel centres at (i + 0.5) / size: the OpenGL rule)."""
    texels = np.asarray(image.convert("RGB"), dtype=np.float64)
    height, width = texels.shape[:2]
    x, y = uv[:, 0] * width - 0.5, (1.0 - uv[:, 1]) * height - 0.5
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]

    def at(row, col):
        return texels[np.clip(row, 0, height - 1), np.clip(col, 0, width - 1)]

    return (at(y0, x0) * (1 - fx) * (1 - fy) + at(y0, x0 + 1) * fx * (1 - fy)
            + at(y0 + 1, x0) * (1 - fx) * fy + at(y0 + 1, x0 + 1) * fx * fy)  # fmt: skip


def glb_json(path) -> dict:
    """The JSON chunk of a GLB file, parsed from its bytes (glTF 2.0 §4.4)."""
    data = path.read_bytes()
    magic, version, _ = struct.unpack_from("<4sII", data, 0)
    assert (magic, version) == (b"glTF", 2)
    length, kind = struct.unpack_from("<I4s", data, 12)
    assert kind == b"JSON"
    return json.loads(data[20 : 20 + length])


def baked_vertex_count(obj: PosedObject, size: int) -> int:
    return len(bake_texture(obj.mesh, size).vertices)


def leftovers(directory) -> list[str]:
    return [name for name in os.listdir(directory) if name.startswith(".") or "tmp" in name]


# ---------------------------------------------------------------------------------------------- interface


def test_formats_and_unknown_format_lists_the_names(tmp_path):
    assert set(FORMATS) == {"obj", "stl", "usdz", "glb-textured"}
    with pytest.raises(ValueError) as info:
        write_object(make_object(1), "fbx", tmp_path, frame="opencv")
    assert all(name in str(info.value) for name in FORMATS)
    with pytest.raises(ValueError, match="obj, stl, usdz, glb-textured"):
        write_scene([make_object(1)], "ply", tmp_path, frame="opencv")
    assert os.listdir(tmp_path) == []


def test_bad_frame_name_and_texture_size_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown frame"):
        write_object(make_object(1), "stl", tmp_path, frame="blender")
    with pytest.raises(ValueError, match="texture size"):
        write_object(make_object(1), "obj", tmp_path, frame="opencv", texture_size=8)
    with pytest.raises(ValueError, match="letters, digits"):
        PosedObject(name="object 1", mesh=ellipsoid(), to_scene=np.eye(4))
    with pytest.raises(ValueError, match=r"\(4, 4\)"):
        PosedObject(name="object_001", mesh=ellipsoid(), to_scene=np.eye(3))
    with pytest.raises(ValueError, match="unique"):
        write_scene([make_object(1), make_object(1)], "stl", tmp_path, frame="opencv")


@pytest.mark.parametrize(("module", "package", "fmt"), [("xatlas", "xatlas", "obj"), ("xatlas", "xatlas", "glb-textured"),
                                                        ("pxr", "usd-core", "usdz")])  # fmt: skip
def test_missing_library_names_the_package_and_writes_nothing(tmp_path, monkeypatch, module, package, fmt):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(ExportUnavailable, match=f"pip install {package}"):
        write_object(make_object(2), fmt, tmp_path / "o", frame="opencv", texture_size=64)
    with pytest.raises(ExportUnavailable, match=f"pip install {package}"):
        write_scene([make_object(2)], fmt, tmp_path / "s", frame="opencv", texture_size=64)
    assert not (tmp_path / "o").exists() and not (tmp_path / "s").exists()


def test_stl_needs_no_optional_library(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "xatlas", None)
    monkeypatch.setitem(sys.modules, "pxr", None)
    with pytest.raises(ExportUnavailable, match="pip install xatlas"):
        bake_texture(ellipsoid(), 64)
    assert [p.name for p in write_object(make_object(3), "stl", tmp_path, frame="opencv")] == ["mesh.stl"]


# ---------------------------------------------------------------------------------------------- texture baking


def test_bake_reproduces_the_vertex_colours():
    mesh = ellipsoid(subdivisions=3)
    baked = bake_texture(mesh, 512)
    image = baked.visual.material.baseColorTexture
    assert image.size == (512, 512) and image.mode == "RGB"
    assert baked.visual.material.metallicFactor == 0.0
    assert len(baked.faces) == len(mesh.faces) and len(baked.vertices) >= len(mesh.vertices)
    assert np.all((baked.visual.uv >= 0) & (baked.visual.uv <= 1))
    error = np.abs(sample(image, baked.visual.uv) - np.rint(vertex_field(baked.vertices)))
    assert error.mean() <= 1.0 and error.max() <= 4.0, (error.mean(), error.max())
    # seams are padded: no texel is left black (every field value is above 17)
    assert np.asarray(image).reshape(-1, 3).max(axis=1).min() > 0


def test_bake_from_gaussians_reproduces_their_colours_and_ignores_transparent_ones():
    mesh = ellipsoid(subdivisions=4)
    gaussians = surface_gaussians(floaters=True)
    baked = bake_texture(mesh, 512, gaussians=gaussians, gaussians_to_mesh=Y_UP_FROM_Z_UP)
    got = sample(baked.visual.material.baseColorTexture, baked.visual.uv)
    error = np.abs(got - gaussian_field(baked.vertices))
    assert error.mean() <= 1.5 and error.max() <= 8.0, (error.mean(), error.max())
    # the mapping matters: read as if already in mesh coordinates, the colours land elsewhere
    wrong = bake_texture(mesh, 512, gaussians=gaussians)
    assert np.abs(sample(wrong.visual.material.baseColorTexture, wrong.visual.uv) - gaussian_field(wrong.vertices)).mean() > 10


def test_bakes_are_memoised_by_content(tmp_path, monkeypatch):
    calls = []
    real = exports._bake
    monkeypatch.setattr(exports, "_bake", lambda *a: calls.append(1) or real(*a))
    exports._BAKES.clear()
    obj = make_object(4)
    write_object(obj, "obj", tmp_path / "o", frame="opencv", texture_size=128)
    write_object(obj, "glb-textured", tmp_path / "o", frame="opencv", texture_size=128)
    write_scene([obj], "glb-textured", tmp_path / "s", frame="opencv", texture_size=128)
    assert len(calls) == 1
    obj.mesh.visual.vertex_colors = np.tile(np.uint8([10, 20, 30, 255]), (len(obj.mesh.vertices), 1))
    write_object(obj, "glb-textured", tmp_path / "o", frame="opencv", texture_size=128)
    assert len(calls) == 2


# ---------------------------------------------------------------------------------------------- OBJ


def test_obj_object_round_trip(tmp_path):
    obj = make_object(5)
    written = write_object(obj, "obj", tmp_path, frame="opencv", texture_size=256)
    assert [p.name for p in written] == ["object.obj", "object_texture.png", "object.mtl"]
    assert sorted(os.listdir(tmp_path)) == ["object.mtl", "object.obj", "object_texture.png"]
    mtl = (tmp_path / "object.mtl").read_text()
    assert "map_Kd object_texture.png" in mtl and "Ks 0.0" in mtl
    assert "mtllib object.mtl" in (tmp_path / "object.obj").read_text()
    loaded = trimesh.load(tmp_path / "object.obj", process=False)
    assert len(loaded.vertices) == baked_vertex_count(obj, 256)
    assert len(loaded.faces) == len(obj.mesh.faces)
    np.testing.assert_allclose(bbox(loaded.vertices), bbox(posed_points(obj)), atol=1e-5)
    assert loaded.visual.material.image.size == (256, 256)
    # the texture, read back through the OBJ's own UVs, still carries the colour field at the posed vertices
    canonical = transform_points(np.linalg.inv(obj.to_scene), loaded.vertices)
    error = np.abs(sample(loaded.visual.material.image, loaded.visual.uv) - np.rint(vertex_field(canonical)))
    assert error.mean() <= 1.5


def test_obj_scene_has_one_group_material_and_texture_per_object(tmp_path):
    objects = [make_object(6), make_object(7)]
    written = write_scene(objects, "obj", tmp_path, frame="opencv", texture_size=128)
    assert [p.name for p in written] == ["scene.obj", "scene_object_006.png", "scene_object_007.png", "scene.mtl"]
    assert leftovers(tmp_path) == []
    text = (tmp_path / "scene.obj").read_text()
    assert "o object_006" in text and "o object_007" in text
    mtl = (tmp_path / "scene.mtl").read_text()
    assert mtl.count("newmtl") == 2 and "map_Kd scene_object_006.png" in mtl and "map_Kd scene_object_007.png" in mtl
    loaded = trimesh.load(tmp_path / "scene.obj", process=False, force="scene")
    assert len(loaded.geometry) == 2
    parts = sorted(loaded.geometry.values(), key=lambda g: g.visual.material.image.filename or "")
    for obj in objects:
        match = [g for g in parts if np.allclose(bbox(g.vertices), bbox(posed_points(obj)), atol=1e-5)]
        assert len(match) == 1 and len(match[0].faces) == len(obj.mesh.faces)


# ---------------------------------------------------------------------------------------------- STL


def stl_records(path) -> tuple[bytes, np.ndarray]:
    data = path.read_bytes()
    (count,) = struct.unpack_from("<I", data, 80)
    record = np.dtype([("normal", "<f4", (3,)), ("vertices", "<f4", (3, 3)), ("attribute", "<u2")])
    assert len(data) == 84 + 50 * count  # binary, no trailing bytes
    return data[:80], np.frombuffer(data, dtype=record, count=count, offset=84)


def test_stl_object_is_binary_posed_and_watertight(tmp_path):
    obj = make_object(8)
    write_object(obj, "stl", tmp_path, frame="opencv")
    header, records = stl_records(tmp_path / "mesh.stl")
    assert not header.startswith(b"solid") and b"frame=opencv" in header
    assert len(records) == len(obj.mesh.faces)
    np.testing.assert_allclose(bbox(records["vertices"].reshape(-1, 3)), bbox(posed_points(obj)), atol=1e-5)
    loaded = trimesh.load(tmp_path / "mesh.stl")
    loaded.merge_vertices()
    assert len(loaded.faces) == len(obj.mesh.faces) and loaded.is_watertight
    # outward normals survive the pose (a proper rotation): the posed volume is positive
    assert loaded.volume > 0


def test_stl_watertight_only_where_the_mesh_is(tmp_path):
    box = trimesh.creation.box(extents=(0.4, 0.3, 0.2))
    write_object(make_object(9, mesh=box), "stl", tmp_path / "box", frame="opencv")
    loaded = trimesh.load(tmp_path / "box" / "mesh.stl")
    loaded.merge_vertices()
    assert loaded.is_watertight and len(loaded.faces) == 12
    open_box = trimesh.Trimesh(box.vertices, box.faces[:-2], process=False)
    write_object(make_object(9, mesh=open_box), "stl", tmp_path / "open", frame="opencv")
    loaded = trimesh.load(tmp_path / "open" / "mesh.stl")
    loaded.merge_vertices()
    assert not loaded.is_watertight


def test_stl_scene_groups_facets_per_object(tmp_path):
    objects = [make_object(10), make_object(11, mesh=trimesh.creation.box()), make_object(12)]
    write_scene(objects, "stl", tmp_path, frame="opencv")
    header, records = stl_records(tmp_path / "scene.stl")
    assert header.rstrip() == b"pipeline STL frame=opencv units=pose objects=3 attribute=object index"
    assert records["attribute"].tolist() == sum(([i] * len(o.mesh.faces) for i, o in enumerate(objects)), [])
    for i, obj in enumerate(objects):
        part = records["vertices"][records["attribute"] == i].reshape(-1, 3)
        np.testing.assert_allclose(bbox(part), bbox(posed_points(obj)), atol=1e-5)
    loaded = trimesh.load(tmp_path / "scene.stl")
    assert len(loaded.faces) == sum(len(o.mesh.faces) for o in objects)
    assert len(loaded.split(only_watertight=False)) == 3  # the objects are its connected parts
    assert loaded.face_attributes["stl"].tolist() == records["attribute"].tolist()


# ---------------------------------------------------------------------------------------------- USDZ


def usd_stage(path):
    from pxr import Usd

    return Usd.Stage.Open(str(path))


def to_opengl(frame: str) -> np.ndarray:
    change = np.eye(4)
    change[:3, :3] = frame_matrix("opengl") @ frame_matrix(frame).T
    return change


def usd_bounds(prim, obj: PosedObject, frame: str) -> tuple[np.ndarray, np.ndarray]:
    """(BBoxCache's world range, expected range): the cache bounds the posed local extent box, so the
    expectation is the posed canonical bbox's 8 corners converted to opengl."""
    from pxr import Usd, UsdGeom

    cache = UsdGeom.BBoxCache(Usd.TimeCode.Default(), [UsdGeom.Tokens.default_])
    box = cache.ComputeWorldBound(prim).ComputeAlignedRange()
    lo, hi = bbox(obj.mesh.vertices)
    corners = np.array([[(lo, hi)[i][0], (lo, hi)[j][1], (lo, hi)[k][2]] for i in (0, 1) for j in (0, 1) for k in (0, 1)])
    expected = bbox(transform_points(to_opengl(frame) @ obj.to_scene, corners))
    return np.array([list(box.GetMin()), list(box.GetMax())]), expected


def usd_world_points(mesh_prim) -> np.ndarray:
    """The mesh's points moved by its composed local-to-world transform (USD matrices act on row vectors)."""
    from pxr import Usd, UsdGeom

    matrix = np.array(UsdGeom.Xformable(mesh_prim).ComputeLocalToWorldTransform(Usd.TimeCode.Default()))
    points = np.array(UsdGeom.Mesh(mesh_prim).GetPointsAttr().Get(), dtype=np.float64)
    return points @ matrix[:3, :3] + matrix[3, :3]


@pytest.mark.parametrize("frame", sorted(FRAMES))
def test_usdz_object_is_y_up_metres_and_posed(tmp_path, frame):
    from pxr import Usd, UsdGeom, UsdShade

    obj = make_object(13, frame=frame)
    assert [p.name for p in write_object(obj, "usdz", tmp_path, frame=frame, texture_size=128)] == ["object.usdz"]
    assert os.listdir(tmp_path) == ["object.usdz"]
    with zipfile.ZipFile(tmp_path / "object.usdz") as archive:
        assert sorted(archive.namelist()) == ["object.usdc", "object_013.png"]
    stage = usd_stage(tmp_path / "object.usdz")
    assert UsdGeom.GetStageUpAxis(stage) == UsdGeom.Tokens.y
    assert UsdGeom.GetStageMetersPerUnit(stage) == 1.0
    root = stage.GetDefaultPrim()
    xforms = [p for p in root.GetChildren() if p.IsA(UsdGeom.Xform)]
    assert [p.GetName() for p in xforms] == ["object_013"]
    mesh = UsdGeom.Mesh(xforms[0].GetChild("mesh"))
    assert len(mesh.GetPointsAttr().Get()) == len(obj.mesh.vertices)
    assert len(mesh.GetFaceVertexIndicesAttr().Get()) == 3 * len(obj.mesh.faces)
    np.testing.assert_allclose(*usd_bounds(root, obj, frame), atol=1e-5)
    posed_opengl = transform_points(to_opengl(frame), posed_points(obj))
    np.testing.assert_allclose(bbox(usd_world_points(mesh.GetPrim())), bbox(posed_opengl), atol=1e-5)
    if frame == "opengl":  # the USD transform is the scene pose itself
        np.testing.assert_allclose(bbox(usd_world_points(mesh.GetPrim())), bbox(posed_points(obj)), atol=1e-5)
    material, _ = UsdShade.MaterialBindingAPI(mesh.GetPrim()).ComputeBoundMaterial()
    shader = UsdShade.Shader(stage.GetPrimAtPath(material.GetPath().AppendChild("surface")))
    assert shader.GetInput("metallic").Get() == 0.0
    texture = UsdShade.Shader(stage.GetPrimAtPath(material.GetPath().AppendChild("texture")))
    assert texture.GetInput("file").Get().resolvedPath.endswith("object_013.png]")
    assert stage.GetRootLayer().customLayerData["source_frame"] == frame


def test_usdz_scene_has_one_xform_per_object(tmp_path):
    from pxr import Usd, UsdGeom

    objects = [make_object(14), make_object(15), make_object(16)]
    write_scene(objects, "usdz", tmp_path, frame="opencv", texture_size=64)
    stage = usd_stage(tmp_path / "scene.usdz")
    root = stage.GetDefaultPrim()
    xforms = [p for p in root.GetChildren() if p.IsA(UsdGeom.Xform)]
    assert [p.GetName() for p in xforms] == ["object_014", "object_015", "object_016"]
    for prim, obj in zip(xforms, objects):
        np.testing.assert_allclose(*usd_bounds(prim, obj, "opencv"), atol=1e-5)
        posed_opengl = transform_points(to_opengl("opencv"), posed_points(obj))
        np.testing.assert_allclose(bbox(usd_world_points(prim.GetChild("mesh"))), bbox(posed_opengl), atol=1e-5)
    with zipfile.ZipFile(tmp_path / "scene.usdz") as archive:
        assert sorted(archive.namelist()) == ["object_014.png", "object_015.png", "object_016.png", "scene.usdc"]


# ---------------------------------------------------------------------------------------------- textured GLB


def test_glb_textured_object_round_trip(tmp_path):
    obj = make_object(17)
    assert [p.name for p in write_object(obj, "glb-textured", tmp_path, frame="opencv", texture_size=256)] == [
        "mesh_textured.glb"
    ]
    gltf = glb_json(tmp_path / "mesh_textured.glb")
    assert [n["name"] for n in gltf["nodes"]] == ["object_017"]
    assert gltf["scene"] == 0 and gltf["scenes"][0]["extras"]["frame"] == "opencv"
    (material,) = gltf["materials"]
    pbr = material["pbrMetallicRoughness"]
    assert pbr["metallicFactor"] == 0.0 and pbr["roughnessFactor"] == pytest.approx(0.9)
    assert "baseColorTexture" in pbr
    attributes = gltf["meshes"][0]["primitives"][0]["attributes"]
    assert "TEXCOORD_0" in attributes and "COLOR_0" not in attributes
    scene = trimesh.load(tmp_path / "mesh_textured.glb", force="scene", process=False)
    (geometry,) = scene.geometry.values()
    assert len(geometry.vertices) == baked_vertex_count(obj, 256)
    np.testing.assert_allclose(bbox(scene.to_geometry().vertices), bbox(posed_points(obj)), atol=1e-5)
    error = np.abs(sample(geometry.visual.material.baseColorTexture, geometry.visual.uv)
                   - np.rint(vertex_field(geometry.vertices)))  # fmt: skip
    assert error.mean() <= 1.5


def test_glb_textured_bakes_from_the_gaussians_when_given(tmp_path):
    obj = make_object(18, mesh=ellipsoid(subdivisions=4), gaussians=surface_gaussians())
    write_object(obj, "glb-textured", tmp_path, frame="opencv", texture_size=512)
    scene = trimesh.load(tmp_path / "mesh_textured.glb", force="scene", process=False)
    (geometry,) = scene.geometry.values()
    got = sample(geometry.visual.material.baseColorTexture, geometry.visual.uv)
    assert np.abs(got - gaussian_field(geometry.vertices)).mean() <= 1.5
    assert np.abs(got - np.rint(vertex_field(geometry.vertices))).mean() > 10


def test_glb_textured_scene_has_one_node_per_object(tmp_path):
    objects = [make_object(19), make_object(20)]
    write_scene(objects, "glb-textured", tmp_path, frame="opencv", texture_size=64)
    gltf = glb_json(tmp_path / "scene_textured.glb")
    assert sorted(n["name"] for n in gltf["nodes"] if "mesh" in n) == ["object_019", "object_020"]
    assert len(gltf["materials"]) == 2 and all(m["pbrMetallicRoughness"]["metallicFactor"] == 0 for m in gltf["materials"])
    scene = trimesh.load(tmp_path / "scene_textured.glb", force="scene", process=False)
    for obj in objects:
        matrix, name = scene.graph[obj.name]
        np.testing.assert_allclose(matrix, obj.to_scene, atol=1e-6)
        placed = transform_points(matrix, scene.geometry[name].vertices)
        np.testing.assert_allclose(bbox(placed), bbox(posed_points(obj)), atol=1e-5)


# ---------------------------------------------------------------------------------------------- atomicity


def test_files_appear_only_complete(tmp_path, monkeypatch):
    obj = make_object(21)
    for fmt in FORMATS:
        write_object(obj, fmt, tmp_path, frame="opencv", texture_size=64)
    assert leftovers(tmp_path) == []
    # a failure after the texture was renamed: the OBJ (renamed last) is absent, no temporary file is left
    real_replace = os.replace
    renamed = []

    def fail_second(src, dst):
        if renamed:
            raise OSError("disk full")
        renamed.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(exports.os, "replace", fail_second)
    with pytest.raises(OSError, match="disk full"):
        write_object(obj, "obj", tmp_path / "obj", frame="opencv", texture_size=64)
    assert sorted(os.listdir(tmp_path / "obj")) == ["object_texture.png"]
    monkeypatch.undo()
    # USD packaging failing: no usdz, no temporary file
    from pxr import UsdUtils

    monkeypatch.setattr(UsdUtils, "CreateNewUsdzPackage", lambda *a: False)
    (tmp_path / "usd").mkdir()
    with pytest.raises(RuntimeError, match="could not package"):
        write_object(obj, "usdz", tmp_path / "usd", frame="opencv", texture_size=64)
    assert os.listdir(tmp_path / "usd") == []
