"""The web page in a real browser: Playwright (PyPI) driving Debian's chromium headless (no browser download).

Opens the page of ``serve --demo``, drops a photo on the upload zone, waits for the job, checks that the 3D
canvas draws non-background pixels in splat mode and in mesh mode (screenshot pixel statistics), hides an object
and sees the pixels change, and downloads the zip. Screenshots are kept under tests/artifacts/web/ (git-ignored).
Skipped with a reason where chromium is missing, except in CI (env CI=1), where that is a failure.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from PIL import Image

from tests.conftest import PROJECT_ROOT
from tests.web_helpers import Server, photo_bytes, start_server

CHROMIUM = os.environ.get("PIPELINE_TEST_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = PROJECT_ROOT / "tests" / "artifacts" / "web"
BACKGROUND = (0x20, 0x23, 0x2A)  # viewer.js BACKGROUND


def _need_chromium() -> None:
    if Path(CHROMIUM).exists() or shutil.which(CHROMIUM):
        return
    reason = f"no chromium at {CHROMIUM} (apt-get install chromium, or set PIPELINE_TEST_CHROMIUM)"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}: the browser test must run in CI", pytrace=False)
    pytest.skip(reason)


def _need_web_build() -> None:
    if not (PROJECT_ROOT / "pipeline/driver/web/static/vendor/versions.json").exists():
        reason = "the page's npm assets are not built (npm ci --prefix web && npm run --prefix web build)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}: tests/run_tests.sh builds them in CI", pytrace=False)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def page_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    _need_chromium()
    _need_web_build()
    root = tmp_path_factory.mktemp("browser")
    server = start_server("--demo", "--jobs-dir", str(root / "jobs"), "--set", f"engine.state_dir={root / 'state'}",
                          log=root / "serve.log")
    yield server
    assert server.stop() in (0, -15)


def _drawn(png: bytes) -> tuple[float, np.ndarray]:
    """(fraction of pixels that differ from the viewer's background by more than 12 levels, the RGB array)."""
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)
    differs = np.abs(rgb - np.array(BACKGROUND, dtype=np.int16)).max(axis=2) > 12
    return float(differs.mean()), rgb


def test_page_upload_view_toggle_download(page_server: Server, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    photo = tmp_path / "two-things.png"
    photo.write_bytes(photo_bytes((320, 240)))
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1366, "height": 768}, accept_downloads=True)  # a laptop screen
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(page_server.url + "/")
            page.wait_for_selector("#demo-flag:not([hidden])")
            # drag and drop, as a user would (a DataTransfer holding the photo, dropped on the drop zone)
            dropped = page.evaluate_handle(
                """(b64) => { const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
                   const dt = new DataTransfer(); dt.items.add(new File([bytes], "two-things.png", { type: "image/png" }));
                   return dt; }""", base64.b64encode(photo.read_bytes()).decode())
            page.dispatch_event("#drop", "drop", {"dataTransfer": dropped})
            assert page.text_content("#drop-text") == "two-things.png"
            page.fill("#text", "red, blue")
            page.click("details summary")  # the options
            page.select_option("#frame", "opengl")
            page.click("#submit")
            page.wait_for_selector("#job-state[data-state=succeeded]", timeout=120_000)
            page.wait_for_selector("body[data-viewer=ready]", timeout=120_000)
            assert page.is_visible("#job-demo"), "the result must say: demo backends, not the real models"
            assert "demo backends" in page.text_content("#jobs li"), "so must the job list"
            assert "frame opengl" in page.text_content("#viewer-status"), "the chosen frame reached the job"
            assert page.locator("#objects li").count() == 2
            view = page.locator("#view")

            def shot(name: str) -> tuple[float, np.ndarray]:
                page.evaluate("() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(() => setTimeout(r, 300))))")
                png = view.screenshot()
                (ARTIFACTS / f"{name}.png").write_bytes(png)
                return _drawn(png)

            splat_frac, splat_rgb = shot("splats")
            page.click("#mode-mesh")
            mesh_frac, mesh_rgb = shot("mesh")
            page.screenshot(path=str(ARTIFACTS / "page.png"))
            page.locator("#objects input[type=checkbox]").first.uncheck()
            hidden_frac, hidden_rgb = shot("mesh-one-hidden")
            page.click("#mode-splats")
            splat_hidden_frac, _ = shot("splats-one-hidden")
            with page.expect_download() as info:
                page.click("#download-zip")
            zpath = tmp_path / "job.zip"
            info.value.save_as(zpath)
        finally:
            browser.close()
    print(f"screenshots in {ARTIFACTS}")
    assert not errors, errors
    assert splat_frac > 0.005, f"splat mode drew {splat_frac:.4f} of the canvas"
    assert mesh_frac > 0.005, f"mesh mode drew {mesh_frac:.4f} of the canvas"
    assert np.abs(splat_rgb - mesh_rgb).max() > 12, "splat and mesh mode look the same"
    assert hidden_frac < mesh_frac * 0.95 and np.abs(hidden_rgb - mesh_rgb).max() > 12, (hidden_frac, mesh_frac)
    assert splat_hidden_frac < splat_frac * 0.95, (splat_hidden_frac, splat_frac)
    names = zipfile.ZipFile(zpath).namelist()
    assert any(n.endswith("scene/scene.glb") for n in names) and any(n.endswith("objects/001/gaussians.ply") for n in names)


def test_an_ordinary_photo_gives_splats_and_a_mesh_in_its_colours(page_server: Server, tmp_path: Path) -> None:
    """A shipped sample photo (a red cup on a saucer, JPEG) with a plain phrase and two more formats: the demo
    finds an object, the 3D view shows it in the photo's colours in splat mode and in mesh mode, and the downloads
    give the OBJ files as a zip and the scene's USDZ."""
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    photo = PROJECT_ROOT / "pipeline" / "samples" / "coffee.jpg"
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1366, "height": 768}, accept_downloads=True)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(page_server.url + "/")
            page.set_input_files("#file", str(photo))
            page.fill("#text", "cup")
            page.click("details summary")  # the options: two more formats
            page.check("#exports input[value=obj]")
            page.check("#exports input[value=usdz]")
            page.click("#submit")
            page.wait_for_selector("#job-state[data-state=succeeded]", timeout=120_000)
            page.wait_for_selector("body[data-viewer=ready]", timeout=120_000)
            assert page.locator("#objects li").count() >= 1
            view = page.locator("#view")
            page.evaluate("() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(() => setTimeout(r, 300))))")
            splat_png = view.screenshot()
            page.click("#mode-mesh")
            page.evaluate("() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(() => setTimeout(r, 300))))")
            mesh_png = view.screenshot()
            saved: dict[str, Path] = {}
            for selector, target in (("#downloads a[data-name$='-obj.zip']", "obj.zip"), ("#downloads a[data-name='scene.usdz']", "scene.usdz")):
                with page.expect_download() as info:
                    page.click(selector)
                saved[target] = tmp_path / target
                info.value.save_as(saved[target])
        finally:
            browser.close()
    names = zipfile.ZipFile(saved["obj.zip"]).namelist()
    assert any(n.endswith("scene/scene.obj") for n in names) and any(n.endswith("scene/scene.mtl") for n in names)
    assert any(n.endswith("objects/000/object.obj") for n in names) and any(n.endswith(".png") for n in names)
    assert "gaussians.ply" not in " ".join(names), "the format's zip holds that format's files only"
    assert any(n.endswith((".usdc", ".usda", ".usd")) for n in zipfile.ZipFile(saved["scene.usdz"]).namelist())
    (ARTIFACTS / "photo-splats.png").write_bytes(splat_png)
    (ARTIFACTS / "photo-mesh.png").write_bytes(mesh_png)
    assert not errors, errors
    for name, png in (("splat", splat_png), ("mesh", mesh_png)):
        frac, rgb = _drawn(png)
        assert frac > 0.02, f"{name} mode drew {frac:.4f} of the canvas"
        drawn = rgb[np.abs(rgb - np.array(BACKGROUND, dtype=np.int16)).max(axis=2) > 12]
        r, g, b = drawn.mean(axis=0)
        assert r > g + 15 and r > b + 15, f"{name} mode: the cup is red in the photo, the view's mean colour is {r:.0f},{g:.0f},{b:.0f}"
