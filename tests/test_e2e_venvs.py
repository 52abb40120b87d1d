"""End to end on CPU through two real, separate venvs built by ``python -m pipeline envs create``.

The stages run the real workers with the test doubles of ``tests/doubles`` as backends. Covers: the handoff
files and manifests, a rerun that skips both stages, ``--force`` of one stage, a worker killed with SIGKILL
then a rerun that completes, and the bad inputs of the CLI.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.conftest import PROJECT_ROOT, draw_scene, processes_matching, run_cli

pytestmark = pytest.mark.slow


def _run(config: Path, image: Path, out: Path, *extra: str):
    return run_cli("run", "--image", str(image), "--prompt", "red box, blue ball", "--config", str(config), "--out", str(out), *extra)


def _mtime(path: Path) -> int:
    return path.stat().st_mtime_ns


def test_full_chain_writes_the_handoff_contract(venv_config: Path, tmp_path: Path) -> None:
    image = draw_scene(tmp_path / "scene.png")
    run_dir = tmp_path / "run"
    result = _run(venv_config, image, run_dir)
    assert result.returncode == 0, result.stderr

    masks = json.loads((run_dir / "masks/manifest.json").read_text())
    assert masks["schema_version"] == 2 and masks["mode"] == "prompt"
    # the input is the photo's own bytes, described by input/manifest.json; nothing re-encoded
    stored = json.loads((run_dir / "input/manifest.json").read_text())
    assert (run_dir / stored["file"]["path"]).read_bytes() == image.read_bytes()
    assert stored["file"]["path"] == "input/source.png" and not (run_dir / "input/image.png").exists()
    assert masks["image"] == stored["file"] and (run_dir / masks["preview"]).is_file()
    assert sorted(o["label"] for o in masks["objects"]) == ["blue ball", "red box", "red box"]
    for obj in masks["objects"]:
        mask = np.asarray(Image.open(run_dir / obj["file"]))
        assert mask.shape == (64, 96) and set(np.unique(mask)) <= {0, 255}
        assert obj["area"] == int((mask == 255).sum())
    objects = json.loads((run_dir / "objects/manifest.json").read_text())
    assert len(objects["objects"]) == 3
    for i in range(3):
        names = {Path(f["path"]).name for f in objects["objects"][i]["files"]}
        assert {"gaussians.ply", "mesh.glb", "pose.json"} <= names
    assert {"scene.ply", "scene.glb"} <= {Path(f["path"]).name for f in objects["scene"]}
    record = json.loads((run_dir / "run.json").read_text())
    assert record["stages"]["segment"]["status"] == "succeeded"
    assert record["stages"]["reconstruct"]["status"] == "succeeded"
    assert record["config"]["segment"]["env"] == "seg-test"
    # each worker ran with its own venv's interpreter
    seg_log = (run_dir / "logs/segment.log").read_text().splitlines()[0]
    rec_log = (run_dir / "logs/reconstruct.log").read_text().splitlines()[0]
    assert "/seg/bin/python" in seg_log and "/rec/bin/python" in rec_log
    assert not list(run_dir.glob("*.partial"))

    # a rerun skips both stages and rewrites nothing
    before = {p: _mtime(p) for p in (run_dir / "masks/manifest.json", run_dir / "objects/manifest.json")}
    again = _run(venv_config, image, run_dir)
    assert again.returncode == 0, again.stderr
    assert "segment: skip (up to date)" in again.stderr
    assert "reconstruct: skip (up to date)" in again.stderr
    assert before == {p: _mtime(p) for p in before}

    # --force reconstruct redoes that stage only
    forced = _run(venv_config, image, run_dir, "--force", "reconstruct")
    assert forced.returncode == 0, forced.stderr
    assert "segment: skip" in forced.stderr and "reconstruct: run (forced)" in forced.stderr
    assert _mtime(run_dir / "masks/manifest.json") == before[run_dir / "masks/manifest.json"]
    assert _mtime(run_dir / "objects/manifest.json") != before[run_dir / "objects/manifest.json"]

    # a changed config key reruns the stage it belongs to, and dry-run says so without touching anything
    dry = run_cli("run", "--image", str(image), "--prompt", "red box, blue ball", "--config", str(venv_config),
                  "--out", str(run_dir), "--set", "segment.threshold=0.92", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "segment: run (inputs, config or code changed)" in dry.stdout
    assert "reconstruct: run (upstream 'segment' runs)" in dry.stdout

    # a deleted output file is noticed
    (run_dir / "masks/001.png").unlink()
    dry = run_cli("run", "--image", str(image), "--prompt", "red box, blue ball", "--config", str(venv_config), "--out", str(run_dir), "--dry-run")
    assert "segment: run (masks/001.png is missing)" in dry.stdout


def test_sigkilled_stage_leaves_no_manifest_and_a_rerun_completes(venv_config: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    image = draw_scene(tmp_path / "scene.png")
    run_dir = tmp_path / "killed"
    args = [sys.executable, "-m", "pipeline", "run", "--image", str(image), "--prompt", "red box", "--config", str(venv_config),
            "--out", str(run_dir), "--set", "reconstruct.options={delay_s: 2}"]
    driver = subprocess.Popen(args, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    pids: list[int] = []
    while time.monotonic() < deadline and not pids:
        pids = processes_matching("pipeline.stages.reconstruct", str(venv_config.parent / "state"))
        time.sleep(0.1)
    assert pids, "the reconstruct worker never started"
    time.sleep(0.5)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    _, stderr = driver.communicate(timeout=120)
    assert driver.returncode == 1
    assert "stage 'reconstruct' failed" in stderr and "full log:" in stderr and "Traceback" not in stderr
    assert (run_dir / "masks/manifest.json").exists()
    assert not (run_dir / "objects/manifest.json").exists()
    assert json.loads((run_dir / "run.json").read_text())["stages"]["reconstruct"]["status"] == "failed"

    rerun = run_cli("run", "--image", str(image), "--prompt", "red box", "--config", str(venv_config), "--out", str(run_dir))
    assert rerun.returncode == 0, rerun.stderr
    assert "segment: skip (up to date)" in rerun.stderr
    assert "reconstruct: run (no previous output)" in rerun.stderr
    assert (run_dir / "objects/manifest.json").exists()


def test_reconstruct_from_a_masks_folder(venv_config: Path, tmp_path: Path) -> None:
    image = draw_scene(tmp_path / "scene.png")
    masks = tmp_path / "mymasks"
    masks.mkdir()
    ys, xs = np.mgrid[:64, :96]
    Image.fromarray(((xs < 30) & (ys < 30)).astype(np.uint8) * 255).save(masks / "a.png")
    Image.fromarray(((xs > 50) & (ys > 20)).astype(np.uint8) * 255).save(masks / "b.png")
    out = tmp_path / "from-masks"
    result = run_cli("reconstruct", "--masks", str(masks), "--image", str(image), "--config", str(venv_config), "--out", str(out))
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "masks/manifest.json").read_text())
    assert manifest["mode"] == "import" and [o["label"] for o in manifest["objects"]] == ["a", "b"]
    assert len(json.loads((out / "objects/manifest.json").read_text())["objects"]) == 2
    # the same folder of masks with a different image size is refused before anything is written
    small = draw_scene(tmp_path / "small.png", size=(48, 32))
    bad_out = tmp_path / "bad"
    bad = run_cli("reconstruct", "--masks", str(masks), "--image", str(small), "--config", str(venv_config), "--out", str(bad_out))
    assert bad.returncode == 2 and "but the image is 48×32" in bad.stderr
    assert not bad_out.exists()


def _assert_clean_error(result, expected: str, out: Path | None = None) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert expected in result.stderr, result.stderr
    assert result.stderr.count("error:") == 1
    if out is not None:
        assert not out.exists(), "a refused run must not write anything"


def test_bad_inputs_fail_cleanly(venv_config: Path, tmp_path: Path) -> None:
    image = draw_scene(tmp_path / "scene.png")
    out = tmp_path / "never"
    cfg = ["--config", str(venv_config), "--out", str(out)]
    _assert_clean_error(run_cli("run", "--image", str(tmp_path / "missing.jpg"), "--prompt", "x", *cfg), "image not found", out)
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    _assert_clean_error(run_cli("run", "--image", str(text), "--prompt", "x", *cfg), "is not a readable image", out)
    _assert_clean_error(run_cli("run", "--image", str(image), "--query", "  ", *cfg), "--query is empty", out)
    _assert_clean_error(run_cli("run", "--image", str(image), "--query", "a", "--prompt", "b", *cfg), "not allowed with argument", out)
    _assert_clean_error(run_cli("run", "--image", str(image), *cfg), "give one of --query TEXT or --prompt TEXT", out)
    _assert_clean_error(run_cli("run", "--image", str(image), "--prompt", "x", *cfg, "--set", "segment.treshold=1"),
                        "unknown config key 'segment.treshold' in --set", out)
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text("segment:\n  max_objects: many\n")
    _assert_clean_error(run_cli("run", "--image", str(image), "--prompt", "x", "--config", str(bad_cfg), "--out", str(out)),
                        f"config key 'segment.max_objects' in {bad_cfg}", out)
    _assert_clean_error(run_cli("run", "--image", str(image), "--prompt", "x", *cfg, "--set", f"envs.seg-test.prefix={tmp_path}/nowhere"),
                        "venv env 'seg-test' not found", out)
    _assert_clean_error(run_cli("run", "--image", str(image), "--prompt", "x", *cfg, "--force", "render"), "--force 'render': unknown stage", out)


def test_a_run_directory_in_use_is_refused(venv_config: Path, tmp_path: Path) -> None:
    image = draw_scene(tmp_path / "scene.png")
    run_dir = tmp_path / "busy"
    run_dir.mkdir()
    with open(run_dir / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        result = run_cli("run", "--image", str(image), "--prompt", "red box", "--config", str(venv_config), "--out", str(run_dir))
    _assert_clean_error(result, "is in use by another run")
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]
