"""Input photos: header checks, normalisation, the stat cache, storing the original bytes, decoding once.

The equivalence tests build the same run twice, once in today's layout (the photo's original bytes +
input/manifest.json) and once in the schema-1 layout (the photo re-encoded as input/image.png with its EXIF
orientation applied, exactly as the driver used to write it), run the real stage workers with the backend
doubles in-process on both and compare the outputs byte for byte.
"""

from __future__ import annotations

import io
import os
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps

from pipeline.config import PipelineConfig
from pipeline.driver.runner import RunRequest, Runner
from pipeline.driver.sources import SourceIndex, store_input, store_photo
from pipeline.errors import InputError
from pipeline.handoff import LEGACY_INPUT_IMAGE, MANIFEST_NAME, MASKS_DIR, OBJECTS_DIR, load_manifest, MaskManifest
from pipeline.images import ImageRejected, decode_image, probe_image
from pipeline.inputs import INPUT_MANIFEST, load_input, read_input
from pipeline.stages.protocol import Job, Reporter

DOUBLES = {
    "segment": {"env": "x", "backend": "tests.doubles.segmenters:ColorBlobSegmenterDouble"},
    "reconstruct": {"env": "x", "backend": "tests.doubles.reconstructors:CubeReconstructorDouble", "preview": False},
    "envs": {"x": {"kind": "current"}},
}


def _scene(size: tuple[int, int] = (120, 80)) -> Image.Image:
    """Red boxes and a blue disc on grey, placed asymmetrically (so a wrong orientation moves them)."""
    image = Image.new("RGB", size, (40, 40, 40))
    draw = ImageDraw.Draw(image)
    w, h = size
    draw.rectangle([w * 0.05, h * 0.08, w * 0.3, h * 0.45], fill=(255, 0, 0))
    draw.rectangle([w * 0.55, h * 0.3, w * 0.85, h * 0.75], fill=(255, 0, 0))
    draw.ellipse([w * 0.3, h * 0.55, w * 0.45, h * 0.95], fill=(0, 0, 255))
    return image


def _jpeg(image: Image.Image, orientation: int = 1, quality: int = 92) -> bytes:
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality, exif=exif.tobytes())
    return buf.getvalue()


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- header checks


def test_probe_reads_the_header_only_and_refuses_bad_files_with_a_reason() -> None:
    scene = _scene()
    data = _jpeg(scene, orientation=6)
    facts = probe_image(data, name="p.jpg")
    assert (facts.format, facts.orientation, facts.stored_width, facts.stored_height) == ("JPEG", 6, 120, 80)
    assert (facts.width, facts.height) == (80, 120)  # orientation 6 swaps the displayed sides
    for bad, reason in ((b"", "empty"), (b"%PDF-1.4 not an image", "not_image"),
                        (data[: len(data) // 2], "corrupt"), (_png(scene)[:-20], "corrupt")):
        with pytest.raises(ImageRejected) as err:
            probe_image(bad, name="p")
        assert err.value.reason == reason and "\n" not in err.value.message


def test_a_small_file_that_claims_100_megapixels_is_refused_before_any_decode(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.png"
    Image.new("1", (10_000, 10_000)).save(bomb)  # ~12 KB on disk, 100 MP once decoded
    assert bomb.stat().st_size < 100_000
    with pytest.raises(ImageRejected) as err:
        probe_image(bomb.read_bytes(), name=str(bomb), max_pixels=40_000_000)
    assert err.value.reason == "too_large" and "run.max_pixels" in (err.value.hint or "")
    # the CLI's runner applies the same limit (run.max_pixels), before a run directory exists
    runner = Runner(PipelineConfig.model_validate({**DOUBLES, "engine": {"state_dir": str(tmp_path / "state")}}))
    with pytest.raises(InputError):
        runner.open(RunRequest(run_dir=tmp_path / "run", image=bomb, prompts=("red",)))
    assert not (tmp_path / "run").exists()


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    ramp = (np.arange(256 * 16, dtype=np.uint32).reshape(16, 256) * 16).astype(np.uint16)  # 0 … 65520
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    out = np.asarray(decode_image(buf.getvalue()))
    assert out.shape == (16, 256, 3)
    expected = np.clip(np.rint(ramp / 257.0), 0, 255).astype(np.uint8)
    assert np.array_equal(out[..., 0], expected)
    assert (out == 255).mean() < 0.01  # it used to come out 99.6 % white


def test_palette_alpha_and_rotated_images_give_the_displayed_size_in_rgb() -> None:
    scene = _scene((60, 40))
    for image in (scene.convert("P"), scene.convert("RGBA"), scene.convert("LA")):
        data = _png(image)
        out = decode_image(data)
        assert out.mode == "RGB" and out.size == (60, 40)
        assert probe_image(data, name="x").width == 60
    rotated = decode_image(_jpeg(scene, orientation=8))
    assert rotated.size == (40, 60)


# ---------------------------------------------------------------------------------------------- the stat cache


def test_an_unchanged_file_is_not_read_again_and_a_changed_one_is(tmp_path: Path) -> None:
    photo = tmp_path / "p.jpg"
    photo.write_bytes(_jpeg(_scene()))
    index = SourceIndex(tmp_path / "state", racy_window_ns=0)
    first = index.identify(photo, max_pixels=10**8)
    assert index.hashed == 1
    again = SourceIndex(tmp_path / "state", racy_window_ns=0)  # a new process: the cache is on disk
    assert again.identify(photo, max_pixels=10**8).sha256 == first.sha256 and again.hashed == 0

    # same size, same mtime restored: the ctime still moves, so the change is seen
    st = photo.stat()
    data = bytearray(photo.read_bytes())
    data[-3] ^= 0xFF
    photo.write_bytes(bytes(data))
    os.utime(photo, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert photo.stat().st_size == st.st_size and photo.stat().st_mtime_ns == st.st_mtime_ns
    changed = again.identify(photo, max_pixels=10**8)
    assert changed.sha256 != first.sha256 and again.hashed == 1


def test_a_file_hashed_within_the_racy_window_is_hashed_again(tmp_path: Path) -> None:
    photo = tmp_path / "p.png"
    photo.write_bytes(_png(_scene()))
    index = SourceIndex(tmp_path / "state")  # 2 s window: the file was written just now
    index.identify(photo, max_pixels=10**8)
    index.identify(photo, max_pixels=10**8)
    assert index.hashed == 2 and index.probed == 1  # read twice, but its header facts are cached by content


def test_a_read_only_state_dir_still_works_from_memory(tmp_path: Path) -> None:
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("x")
    photo = tmp_path / "p.png"
    photo.write_bytes(_png(_scene()))
    assert SourceIndex(blocked / "state").identify(photo, max_pixels=10**8).size == photo.stat().st_size


def test_a_damaged_store_is_a_cache_miss_not_an_error(tmp_path: Path) -> None:
    photo = tmp_path / "p.png"
    photo.write_bytes(_png(_scene()))
    state = tmp_path / "state"
    state.mkdir()
    (state / "sources.sqlite").write_bytes(b"this is not a database" * 100)
    index = SourceIndex(state, racy_window_ns=0)
    assert index.identify(photo, max_pixels=10**8).size == photo.stat().st_size
    assert index.identify(photo, max_pixels=10**8).facts.width == 120


def test_a_rerun_reads_no_pixels_and_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    photo = tmp_path / "p.jpg"
    photo.write_bytes(_jpeg(_scene(), orientation=6))
    config = PipelineConfig.model_validate({**DOUBLES, "engine": {"state_dir": str(tmp_path / "state")}})
    run_dir = tmp_path / "run"
    _run_stages(config, run_dir, photo)
    index = SourceIndex(tmp_path / "state", racy_window_ns=0)
    index.identify(photo, max_pixels=10**8)  # (the run itself hashed within the racy window)
    index.hashed = 0

    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("a pixel decoder was called")

    monkeypatch.setattr(Image, "open", refuse)
    runner = Runner(config, photos=lambda p: index.identify(p, max_pixels=10**8))
    plan = runner.plan(RunRequest(run_dir=run_dir, image=photo, prompts=("red", "blue")))
    assert [(d.stage, d.action) for d in plan] == [("segment", "skip"), ("reconstruct", "skip")]
    assert index.hashed == 0


# ---------------------------------------------------------------------------------------------- storing the input


def test_the_run_keeps_the_original_bytes_and_says_how_to_normalise_them(tmp_path: Path) -> None:
    photo = tmp_path / "p.jpg"
    photo.write_bytes(_jpeg(_scene(), orientation=6))
    stored = store_photo(tmp_path / "run", photo)
    assert (tmp_path / "run" / stored.file.path).read_bytes() == photo.read_bytes()
    assert stored.file.path == "input/source.jpg" and stored.facts["orientation"] == 6
    assert (stored.width, stored.height) == (80, 120)
    assert load_input(tmp_path / "run") == stored
    image, _ = read_input(tmp_path / "run")
    assert image.size == (80, 120)


def test_hardlink_mode_shares_the_file_and_a_format_no_stage_reads_is_reencoded(tmp_path: Path) -> None:
    photo = tmp_path / "p.png"
    photo.write_bytes(_png(_scene()))
    index = SourceIndex(None)
    stored = store_input(tmp_path / "a", index.identify(photo, max_pixels=10**8), mode="hardlink")
    assert stored.stored_as == "hardlink" and os.path.samefile(tmp_path / "a" / stored.file.path, photo)
    gif = tmp_path / "p.gif"
    _scene().save(gif)
    stored = store_input(tmp_path / "b", index.identify(gif, max_pixels=10**8))
    assert stored.stored_as == "png" and stored.file.path == "input/source.png"
    assert read_input(tmp_path / "b")[0].size == (120, 80)


def test_a_photo_edited_between_planning_and_running_fails_that_run(tmp_path: Path) -> None:
    photo = tmp_path / "p.png"
    photo.write_bytes(_png(_scene()))
    planned = SourceIndex(None).identify(photo, max_pixels=10**8)
    photo.write_bytes(_png(_scene((100, 80))))
    runner = Runner(PipelineConfig.model_validate({**DOUBLES, "engine": {"state_dir": str(tmp_path / "s")}}),
                    photos=lambda _p: planned)
    with pytest.raises(InputError, match="changed after the run was planned"):
        runner.open(RunRequest(run_dir=tmp_path / "run", image=photo, prompts=("red",)))
    assert not (tmp_path / "run" / INPUT_MANIFEST).exists()


def test_a_worker_refuses_a_stored_input_that_no_longer_matches_its_manifest(tmp_path: Path) -> None:
    photo = tmp_path / "p.png"
    photo.write_bytes(_png(_scene()))
    stored = store_photo(tmp_path / "run", photo)
    (tmp_path / "run" / stored.file.path).write_bytes(_png(_scene((100, 80))))
    with pytest.raises(InputError, match="changed after the run was planned"):
        read_input(tmp_path / "run")


# ---------------------------------------------------------------------------------------------- same outputs


def _run_stages(config: PipelineConfig, run_dir: Path, photo: Path | None) -> None:
    """Segment then reconstruct ``run_dir`` in-process with the real stage workers (photo None: use its input)."""
    from pipeline.stages.reconstruct import ReconstructWorker
    from pipeline.stages.segment import SegmentWorker

    runner = Runner(config, photos=lambda p: SourceIndex(None).identify(p, max_pixels=10**8))
    active = runner.open(RunRequest(run_dir=run_dir, image=photo, prompts=("red", "blue")))
    reporter = Reporter(io.StringIO())
    try:
        for stage, worker in (("segment", SegmentWorker(config)), ("reconstruct", ReconstructWorker(config))):
            outcome = active.decide(stage)
            job: Job = active.begin(stage)
            result = worker.run(job, config, reporter)
            active.succeed(outcome, result.result() if isinstance(result, Future) else result)
    finally:
        active.close()


def _legacy_run(tmp_path: Path, name: str, data: bytes) -> Path:
    """A schema-1 run dir: the photo decoded, EXIF-rotated, RGB, saved as input/image.png (the old recipe)."""
    run_dir = tmp_path / name
    (run_dir / "input").mkdir(parents=True)
    ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB").save(run_dir / LEGACY_INPUT_IMAGE, format="PNG")
    return run_dir


def _outputs(run_dir: Path) -> dict[str, bytes]:
    """Every mask and object file (not the manifests, which carry times and paths)."""
    return {p.relative_to(run_dir).as_posix(): p.read_bytes()
            for folder in (MASKS_DIR, OBJECTS_DIR) for p in sorted((run_dir / folder).rglob("*"))
            if p.is_file() and p.name not in (MANIFEST_NAME, "preview.jpg")}


@pytest.mark.parametrize("kind", ["png", "jpeg", "jpeg-rotated"])
def test_outputs_equal_those_of_the_old_reencoded_input(tmp_path: Path, kind: str) -> None:
    data = {"png": lambda: _png(_scene()), "jpeg": lambda: _jpeg(_scene()),
            "jpeg-rotated": lambda: _jpeg(_scene(), orientation=6)}[kind]()
    photo = tmp_path / ("p.png" if kind == "png" else "p.jpg")
    photo.write_bytes(data)
    config = PipelineConfig.model_validate({**DOUBLES, "engine": {"state_dir": str(tmp_path / "state")}})
    _run_stages(config, tmp_path / "new", photo)
    legacy = _legacy_run(tmp_path, "old", data)
    _run_stages(config, legacy, None)  # schema-1 directories are read as they are
    new, old = _outputs(tmp_path / "new"), _outputs(legacy)
    assert len([k for k in new if k.startswith("masks/")]) == 3
    assert new.keys() == old.keys() and all(new[k] == old[k] for k in new)
    masks = load_manifest(tmp_path / "new" / MASKS_DIR / MANIFEST_NAME, MaskManifest)
    assert (masks.width, masks.height) == ((80, 120) if kind == "jpeg-rotated" else (120, 80))
    with Image.open(tmp_path / "new" / masks.preview) as preview:
        assert preview.size == (masks.width, masks.height)  # small photos are not upscaled


def test_the_preview_of_a_12_megapixel_photo_fits_in_1600_pixels(tmp_path: Path) -> None:
    from pipeline.stages.segment import write_preview

    write_preview(tmp_path / "p.jpg", _scene((4032, 3024)))
    with Image.open(tmp_path / "p.jpg") as preview:
        assert preview.format == "JPEG" and max(preview.size) <= 1600 and preview.size == (1344, 1008)


def test_every_entry_point_splits_phrases_the_same_way(tmp_path: Path) -> None:
    from pipeline.api import Pipeline
    from pipeline.driver.batch import read_items
    from pipeline.driver.runner import split_phrases

    assert split_phrases("horse, rider") == split_phrases(["horse", " rider "]) == ("horse", "rider")
    photo = tmp_path / "p.png"
    photo.write_bytes(_png(_scene()))
    api = Pipeline(PipelineConfig.model_validate({"run": {"out_root": str(tmp_path / "out")}}))
    assert api.request(photo, prompt="horse, rider").prompts == ("horse", "rider")
    (tmp_path / "l.jsonl").write_text('{"image": "p.png", "prompt": "horse, rider"}\n')
    (item,) = read_items(list_file=tmp_path / "l.jsonl", out_root=tmp_path / "out")
    assert item.prompts == ("horse", "rider")
    # the same request names the same default run directory from the API and from a folder batch
    (folder_item,) = read_items(images=[str(photo)], prompts=["horse, rider"], out_root=tmp_path / "out")
    assert api.request(photo, prompt="horse, rider").run_dir == folder_item.run_dir
