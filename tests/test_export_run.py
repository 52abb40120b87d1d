"""Export formats of whole runs: ``reconstruct.exports`` in the 3D stage, added later by a rerun (the 3D is not
computed again) or by ``python -m pipeline export``, one object's failure isolated, a missing library recorded.

The stages run in this interpreter (env kind ``current``) with the test doubles: three objects (two red boxes and
a blue disc) as cubes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import trimesh

from pipeline.handoff import ObjectsManifest, load_manifest
from tests.conftest import draw_scene, run_cli

_STAGES = ("--set", "envs.here.kind=current", "--set", "segment.env=here",
           "--set", "segment.backend=tests.doubles.segmenters:ColorBlobSegmenterDouble",
           "--set", "reconstruct.env=here", "--set", "reconstruct.backend=tests.doubles.reconstructors:CubeReconstructorDouble")


def _run(tmp_path: Path, *extra: str):
    image = tmp_path / "scene.png"
    if not image.exists():
        draw_scene(image)
    return run_cli("run", "--image", str(image), "--prompt", "red box, blue ball", "--out", str(tmp_path / "run"), *_STAGES,
                   "--set", f"engine.state_dir={tmp_path / 'state'}", *extra, timeout=180)


def _manifest(run: Path) -> ObjectsManifest:
    return load_manifest(run / "objects/manifest.json", ObjectsManifest)


def test_exports_are_written_by_the_stage_then_added_without_3d_work(tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = _run(tmp_path, "--export", "obj,stl")
    assert first.returncode == 0, first.stderr
    manifest = _manifest(run)
    assert {(r.format, r.target) for r in manifest.exports} == {(f, t) for f in ("obj", "stl") for t in (0, 1, 2, "scene")}
    assert all(r.error is None and r.files for r in manifest.exports)
    scene_stl = trimesh.load(run / "scene/scene.stl")
    scene_glb = trimesh.load(run / "scene/scene.glb").to_geometry()
    assert abs(scene_stl.bounds - scene_glb.bounds).max() < 1e-5, "STL and GLB agree on where the scene is"
    mesh_before = (run / "objects/000/mesh.glb").stat().st_mtime_ns

    # a rerun asking for one more format: the 3D stage is up to date, only the new format is written
    again = _run(tmp_path, "--export", "obj,stl,glb-textured")
    assert again.returncode == 0, again.stderr
    assert "reconstruct: skip (up to date)" in again.stderr and "export glb-textured: 3 object(s) and the scene" in again.stderr
    assert (run / "objects/000/mesh.glb").stat().st_mtime_ns == mesh_before
    assert (run / "scene/scene_textured.glb").is_file()
    assert {r.format for r in _manifest(run).exports} == {"obj", "stl", "glb-textured"}

    # and the export command, on the finished run
    added = run_cli("export", str(run), "--formats", "usdz", timeout=120)
    assert added.returncode == 0, added.stderr
    assert (run / "scene/scene.usdz").is_file() and (run / "objects/002/object.usdz").is_file()
    assert {r.format for r in _manifest(run).exports} == {"obj", "stl", "glb-textured", "usdz"}


def test_one_broken_object_fails_alone_and_is_recorded(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert _run(tmp_path).returncode == 0
    (run / "objects/001/mesh.glb").write_bytes(b"not a glb")
    result = run_cli("export", str(run), "--formats", "stl", timeout=120)
    assert result.returncode == 1
    failed = [r for r in _manifest(run).exports if r.error]
    assert [r.target for r in failed] == [1], _manifest(run).exports
    assert "export stl failed for object 001" in result.stdout
    assert (run / "objects/000/mesh.stl").is_file() and (run / "objects/002/mesh.stl").is_file()


def test_a_missing_library_is_recorded_with_the_package_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.stages.export_run import export_notes, export_run

    run = tmp_path / "run"
    assert _run(tmp_path).returncode == 0
    monkeypatch.setitem(sys.modules, "pxr", None)  # `import pxr` now fails, as without usd-core
    updated = export_run(run, _manifest(run), ["usdz", "stl"], texture_size=64)
    usdz = [r for r in updated.exports if r.format == "usdz"]
    assert len(usdz) == 4 and all(r.error and "usd-core" in r.error for r in usdz)
    assert all(r.error is None for r in updated.exports if r.format == "stl"), "the other format is unaffected"
    (note,) = export_notes(updated)
    assert note.startswith("export usdz failed for objects 000, 001, 002 and the scene:") and "pip install usd-core" in note


def test_batch_lines_carry_export(tmp_path: Path) -> None:
    image = draw_scene(tmp_path / "a.png")
    lines = tmp_path / "jobs.jsonl"
    lines.write_text(json.dumps({"image": image.name, "prompt": "blue ball", "export": "stl"}) + "\n")
    result = run_cli("batch", "--list", str(lines), "--out", str(tmp_path / "out"), *_STAGES,
                     "--set", f"engine.state_dir={tmp_path / 'state'}", timeout=180)
    assert result.returncode == 0, result.stderr
    (run,) = [p for p in (tmp_path / "out").iterdir() if p.is_dir()]
    assert (run / "scene/scene.stl").is_file()
