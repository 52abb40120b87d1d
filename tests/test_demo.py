"""The demo backends on photo-like images, and ``python -m pipeline demo`` end to end (non-interactive).

The segmenter must find a textured object on a textured background (not only pure colours), honour colour words,
and give full-size masks; the lifter must put every Gaussian and mesh vertex where its pixel is seen from the
photo's camera, with the photo's colours, and wind the mesh towards the camera.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.backends.demo import _SH_C0, DemoReliefReconstructor, DemoSalientSegmenter, focal_px
from pipeline.config import PipelineConfig
from pipeline.stages.frames import Z_UP_FROM_Y_UP, pose_matrix, transform_points
from tests.conftest import PROJECT_ROOT, run_cli


def _photo(width: int = 480, height: int = 360, seed: int = 0) -> tuple[Image.Image, np.ndarray]:
    """A noisy wooden-brown gradient with a noisy red ellipse right of centre: (the image, the ellipse's mask)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    base = np.stack([120 + 40 * xs / width, 80 + 30 * ys / height, 50 + 0 * xs], -1)
    ellipse = ((xs - 0.6 * width) / (0.2 * width)) ** 2 + ((ys - 0.55 * height) / (0.25 * height)) ** 2 < 1
    base[ellipse] = (200, 30, 35)
    noisy = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(noisy), ellipse


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.fixture(scope="module")
def config() -> PipelineConfig:
    return PipelineConfig()


def test_segmenter_finds_a_textured_object_for_any_phrase(config: PipelineConfig) -> None:
    image, truth = _photo()
    seg = DemoSalientSegmenter(config.segment)
    seg.set_image(image)
    plain, red, blue = seg.predict(["the mug", "red thing", "blue"])
    assert plain.masks.shape[1:] == truth.shape and plain.masks.dtype == bool
    assert len(plain.scores) >= 1 and max(_iou(m, truth) for m in plain.masks) > 0.8
    assert np.all(plain.scores >= 0.5) and np.all(plain.scores <= 1.0)
    best = int(np.argmax([_iou(m, truth) for m in plain.masks]))
    x0, y0, x1, y1 = plain.boxes[best]
    ys, xs = np.nonzero(plain.masks[best])
    assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert len(red.scores) >= 1 and max(_iou(m, truth) for m in red.masks) > 0.8, "the ellipse is red"
    assert len(blue.scores) == 0, "nothing in the photo is blue"


def test_segmenter_masks_of_a_large_photo_are_full_size(config: PipelineConfig) -> None:
    small, truth = _photo()
    large = small.resize((1920, 1440), Image.Resampling.BICUBIC)
    seg = DemoSalientSegmenter(config.segment)
    seg.set_image(large)
    (found,) = seg.predict(["object"])
    assert found.masks.shape[1:] == (1440, 1920)
    big_truth = np.asarray(Image.fromarray(truth).resize((1920, 1440)))
    assert max(_iou(m, big_truth) for m in found.masks) > 0.8


def test_predict_before_set_image_is_an_error(config: PipelineConfig) -> None:
    with pytest.raises(RuntimeError, match="set_image"):
        DemoSalientSegmenter(config.segment).predict(["x"])


def _project(points_cam: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel (u, v) of PyTorch3D camera points (x left, y up, z forward) through the lifter's pinhole."""
    f = focal_px(height, width)
    return (-points_cam[:, 0] / points_cam[:, 2] * f + width / 2, -points_cam[:, 1] / points_cam[:, 2] * f + height / 2)


def test_lifter_puts_the_relief_where_the_object_is_seen(config: PipelineConfig) -> None:
    image, truth = _photo()
    rgb = np.asarray(image)
    rec = DemoReliefReconstructor(config.reconstruct)
    out = rec.reconstruct(rec.prepare(rgb), truth, seed=3)
    pose = pose_matrix(np.asarray(out.pose.quat_wxyz), np.asarray(out.pose.translation), np.asarray(out.pose.scale))
    assert out.pose.frame == "pytorch3d_camera"
    # Gaussians: canonical, inside ±0.5; posed, each lands on a pixel of the mask in that pixel's colour
    xyz = out.gaussians.xyz
    assert np.abs(xyz).max() <= 0.5
    cam = transform_points(pose, xyz)
    assert np.all(cam[:, 2] > 1.0), "in front of the camera"
    u, v = _project(cam, *truth.shape)
    inside = truth[np.clip(v.astype(int), 0, truth.shape[0] - 1), np.clip(u.astype(int), 0, truth.shape[1] - 1)]
    assert inside.mean() > 0.97
    colour = 0.5 + _SH_C0 * out.gaussians.f_dc
    assert np.abs(colour.mean(axis=0) - np.array([200, 30, 35]) / 255).max() < 0.05
    # the relief bulges towards the camera: the middle is nearer than the rim
    middle = np.hypot(u - 0.6 * truth.shape[1], v - 0.55 * truth.shape[0]) < 20
    assert cam[middle, 2].mean() < cam[~middle, 2].mean() - 0.05
    # mesh: canonical y-up; back in the camera frame it projects onto the mask and faces the camera
    verts = transform_points(pose, out.mesh.vertices @ Z_UP_FROM_Y_UP.T)
    mu, mv = _project(verts, *truth.shape)
    assert truth[np.clip(mv.astype(int), 0, 359), np.clip(mu.astype(int), 0, 479)].mean() > 0.97
    tri = verts[out.mesh.faces]
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    towards = np.einsum("ij,ij->i", normals, -tri.mean(axis=1))
    assert (towards > 0).mean() > 0.95, "faces are wound towards the camera"
    assert out.mesh.visual.vertex_colors.shape == (len(out.mesh.vertices), 4)


def test_lifter_refuses_an_empty_mask(config: PipelineConfig) -> None:
    rec = DemoReliefReconstructor(config.reconstruct)
    with pytest.raises(ValueError, match="empty mask"):
        rec.reconstruct(rec.prepare(np.zeros((10, 10, 3), np.uint8)), np.zeros((10, 10), bool), seed=0)


@pytest.mark.slow
def test_demo_command_runs_the_samples_and_checks_the_page(tmp_path: Path) -> None:
    jobs = tmp_path / "demo"
    result = run_cli("demo", "--jobs-dir", str(jobs), "--port", "0", "--set", f"engine.state_dir={tmp_path / 'state'}",
                     timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    samples = json.loads((PROJECT_ROOT / "pipeline/samples/samples.json").read_text())
    lines = [line for line in result.stdout.splitlines() if line.startswith("  ")]
    assert len(lines) == len(samples) and all("object" in line and "scene.glb" in line for line in lines), result.stdout
    assert "the page answers at http://127.0.0.1:" in result.stdout
    for job in (p for p in jobs.iterdir() if p.is_dir()):
        record = json.loads((job / "job.json").read_text())
        assert record["state"] == "succeeded" and record["demo"] is True
        objects = json.loads((job / "objects/manifest.json").read_text())
        assert len(objects["objects"]) >= 1 and (job / "scene/scene.glb").stat().st_size > 1000


def test_demo_refuses_a_missing_photo(tmp_path: Path) -> None:
    result = run_cli("demo", str(tmp_path / "nope.jpg"), "--jobs-dir", str(tmp_path / "demo"), timeout=60)
    assert result.returncode == 2 and "image not found" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "demo").exists(), "nothing started, nothing written"
