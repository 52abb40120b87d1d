"""Batch mode end to end on CPU through two real venvs (the doubles as backends), like a user would run it.

Covers: one warm worker per stage for the whole batch, a corrupt image among good ones, a rerun that skips
everything and one that redoes only 3D (``--from reconstruct``), a worker SIGKILLed mid-batch (restarted; only
that image fails), Ctrl-C mid-batch (exit 130, no orphans, finished images kept and skipped on rerun), a killed
driver (its workers die within a second), the Python API's warm block, JSONL lines with their own options and
errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT, draw_scene, processes_matching, run_cli

pytestmark = pytest.mark.slow


def _images(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        draw_scene(folder / f"img{i:02d}.png")
    return folder


def _summary(root: Path) -> dict:
    return json.loads((root / "batch.json").read_text())


def _state(config: Path) -> str:
    return str(config.parent / "state")


def _wait_for(predicate, timeout: float = 60.0) -> None:  # noqa: ANN001 - a callable returning bool
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def _start_batch(config: Path, photos: Path, root: Path, *, delay_s: float) -> subprocess.Popen:
    """``python -m pipeline batch`` over ``photos`` in the background, ``delay_s`` per reconstructed object."""
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "batch", "--images", str(photos), "--prompt", "red box", "--out", str(root),
         "--config", str(config), "--set", f"reconstruct.options={{delay_s: {delay_s}}}"],
        cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _worker_pids(config: Path, stage: str) -> list[int]:
    return processes_matching(f"pipeline.stages.{stage}", _state(config))


def test_batch_runs_warm_skips_on_rerun_and_reports_a_corrupt_image(venv_config: Path, tmp_path: Path) -> None:
    photos = _images(tmp_path / "photos", 4)
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    root = tmp_path / "batch"
    result = run_cli("batch", "--images", str(photos), "--prompt", "red box", "--out", str(root), "--config", str(venv_config))
    assert result.returncode == 1, result.stderr
    summary = _summary(root)
    assert summary["counts"] == {"succeeded": 4, "failed": 1}
    broken = next(i for i in summary["items"] if i["source"].endswith("broken.jpg"))
    assert "is not a readable image" in broken["error"] and not Path(broken["run_dir"]).exists()
    assert "failed: " in result.stdout and "broken.jpg" in result.stdout
    good = [i for i in summary["items"] if i["status"] == "succeeded"]
    for item in good:
        run_dir = Path(item["run_dir"])
        assert (run_dir / "objects/manifest.json").exists() and item["objects"] == 2
        # one warm worker per stage served every image: the per-run log says which job of the worker it was
        header = (run_dir / "logs/segment.log").read_text().splitlines()
        assert "/seg/bin/python" in header[0] and "warm worker pid" in header[1]
    pids = {(Path(i["run_dir"]) / "logs/reconstruct.log").read_text().splitlines()[1].split(",")[0] for i in good}
    assert len(pids) == 1, f"one reconstruct worker for the whole batch, got {pids}"
    assert not _worker_pids(venv_config, "segment") and not _worker_pids(venv_config, "reconstruct")

    before = {i["run_dir"]: (Path(i["run_dir"]) / "objects/manifest.json").stat().st_mtime_ns for i in good}
    again = run_cli("batch", "--images", str(photos / "img*.png"), "--prompt", "red box", "--out", str(root), "--config", str(venv_config))
    assert again.returncode == 0, again.stderr
    assert _summary(root)["counts"] == {"succeeded": 4}
    assert all(i["stages"] == {"segment": "skip (up to date)", "reconstruct": "skip (up to date)"} for i in _summary(root)["items"])
    assert before == {d: (Path(d) / "objects/manifest.json").stat().st_mtime_ns for d in before}

    masks_before = {d: (Path(d) / "masks/manifest.json").stat().st_mtime_ns for d in before}
    redo = run_cli("batch", "--images", str(photos / "img*.png"), "--prompt", "red box", "--out", str(root),
                   "--config", str(venv_config), "--from", "reconstruct")  # fmt: skip
    assert redo.returncode == 0, redo.stderr
    items = _summary(root)["items"]
    assert all(i["stages"]["segment"] == "skip (up to date)" for i in items), [i["stages"] for i in items]
    assert not any(i["stages"]["reconstruct"].startswith("skip") for i in items), [i["stages"] for i in items]
    assert masks_before == {d: (Path(d) / "masks/manifest.json").stat().st_mtime_ns for d in before}
    assert all(before[d] != (Path(d) / "objects/manifest.json").stat().st_mtime_ns for d in before)


def test_jsonl_lines_carry_their_own_requests_and_bad_lines_are_reported(venv_config: Path, tmp_path: Path) -> None:
    photos = _images(tmp_path / "photos", 2)
    listing = tmp_path / "list.jsonl"
    listing.write_text("\n".join([
        json.dumps({"image": "photos/img00.png", "prompt": "red box"}),
        "{not json",
        json.dumps({"image": "photos/img01.png", "prompt": "blue ball", "threshold": 0.99}),
        json.dumps({"image": "photos/img01.png"}),
        json.dumps({"image": "photos/img00.png", "prompt": "red box", "segment.max_objects": 1, "out": "one-box"}),
    ]) + "\n")
    root = tmp_path / "out"
    result = run_cli("batch", "--list", str(listing), "--out", str(root), "--config", str(venv_config))
    assert result.returncode == 1, result.stderr
    items = _summary(root)["items"]
    assert [i["status"] for i in items] == ["succeeded", "invalid", "no objects", "invalid", "succeeded"]
    assert items[1]["source"] == "list.jsonl:2" and items[1]["error"].startswith("not valid JSON")
    assert items[3]["source"] == "list.jsonl:4"
    assert items[3]["error"] == "no 'query' or 'prompt' (and none given on the command line)"
    assert items[0]["objects"] == 2 and items[4]["objects"] == 1 and items[4]["run_dir"] == str(root / "one-box")
    record = json.loads((Path(items[2]["run_dir"]) / "run.json").read_text())
    assert record["config"]["segment"]["threshold"] == 0.99  # the line's own option reached its run
    assert photos.exists()


def test_a_worker_killed_mid_batch_fails_only_its_image(venv_config: Path, tmp_path: Path) -> None:
    photos = _images(tmp_path / "photos", 5)
    root = tmp_path / "batch"
    driver = _start_batch(venv_config, photos, root, delay_s=0.4)
    _wait_for(lambda: len(list(root.glob("*/objects/manifest.json"))) >= 1)
    (victim,) = _worker_pids(venv_config, "reconstruct")
    os.kill(victim, signal.SIGKILL)
    out, err = driver.communicate(timeout=120)
    assert driver.returncode == 1, err
    summary = _summary(root)
    assert summary["counts"] == {"succeeded": 4, "failed": 1}, summary
    failed = next(i for i in summary["items"] if i["status"] == "failed")
    assert "stage 'reconstruct' failed: the worker exited with code -9" in failed["error"]
    record = json.loads((Path(failed["run_dir"]) / "run.json").read_text())
    assert record["stages"]["reconstruct"]["status"] == "failed"
    assert not list(Path(failed["run_dir"]).glob("*.partial"))
    # the images after the killed one were done by a restarted worker
    pids = {(Path(i["run_dir"]) / "logs/reconstruct.log").read_text().splitlines()[1].split(",")[0]
            for i in summary["items"] if i["status"] == "succeeded"}
    assert len(pids) == 2, pids


def test_ctrl_c_mid_batch_stops_everything_and_keeps_finished_images(venv_config: Path, tmp_path: Path) -> None:
    photos = _images(tmp_path / "photos", 6)
    root = tmp_path / "batch"
    args = [sys.executable, "-m", "pipeline", "batch", "--images", str(photos), "--prompt", "red box", "--out", str(root),
            "--config", str(venv_config), "--set", "reconstruct.options={delay_s: 1.0}"]
    driver = subprocess.Popen(args, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: len(list(root.glob("*/objects/manifest.json"))) >= 2)
    driver.send_signal(signal.SIGINT)
    _, err = driver.communicate(timeout=60)
    assert driver.returncode == 130, err
    assert "Traceback" not in err
    assert not _worker_pids(venv_config, "segment") and not _worker_pids(venv_config, "reconstruct")
    summary = _summary(root)
    assert summary["stopped"] == "SIGINT"
    done = [i for i in summary["items"] if i["status"] == "succeeded"]
    statuses = [(i["status"], i["error"]) for i in summary["items"]]
    assert 2 <= len(done) < 6 and {s for s, _ in statuses} <= {"succeeded", "cancelled"}, statuses
    assert not list(root.glob("*/*.partial")), list(root.glob("*/*.partial"))
    rerun = run_cli(*args[3:])  # the same batch again (the same options, so the same fingerprints)
    assert rerun.returncode == 0, rerun.stderr + rerun.stdout
    stages = {i["run_dir"]: i["stages"] for i in _summary(root)["items"]}
    for item in done:
        assert stages[item["run_dir"]] == {"segment": "skip (up to date)", "reconstruct": "skip (up to date)"}


def test_a_killed_driver_takes_its_workers_with_it(venv_config: Path, tmp_path: Path) -> None:
    photos = _images(tmp_path / "photos", 3)
    root = tmp_path / "batch"
    driver = _start_batch(venv_config, photos, root, delay_s=5)
    _wait_for(lambda: bool(_worker_pids(venv_config, "reconstruct")) and bool(list(root.glob("*/objects.partial"))))
    driver.kill()
    driver.wait()
    t0 = time.monotonic()
    _wait_for(lambda: not _worker_pids(venv_config, "reconstruct") and not _worker_pids(venv_config, "segment"), timeout=5)
    assert time.monotonic() - t0 < 1.5
    time.sleep(0.3)
    assert not list(root.glob("*/objects/manifest.json")), "nothing may be finished after the driver died"


def test_the_python_api_keeps_workers_warm_across_runs(venv_config: Path, tmp_path: Path) -> None:
    script = tmp_path / "api.py"
    script.write_text(f"""
import json, sys
from pathlib import Path
from pipeline.api import Pipeline
from tests.conftest import draw_scene
imgs = [draw_scene(Path({str(tmp_path)!r}) / f"a{{i}}.png") for i in range(3)]
with Pipeline.from_config({str(venv_config)!r}, overrides=["run.out_root={tmp_path / 'out'}"]) as p:
    first = p.run(imgs[0], prompt="red box")
    rest = p.batch(imgs[1:], prompt="blue ball")
    pids = [p._engine.health()["stages"][s]["pid"] for s in ("segment", "reconstruct")]
print(json.dumps({{"first": len(first.objects), "rest": [len(r.objects) for r in rest], "pids": pids}}))
""")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    assert data["first"] == 2 and data["rest"] == [1, 1]
    assert all(data["pids"]), "both workers stay up inside the block"
    assert not any(os.path.exists(f"/proc/{pid}") for pid in data["pids"]), "leaving the block stops every worker"


def test_bad_batch_usage_is_one_line(venv_config: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli("batch", "--images", str(empty), "--prompt", "x", "--out", str(tmp_path / "o"), "--config", str(venv_config))
    assert result.returncode == 2 and "error: no images in" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("batch", "--images", str(empty), "--out", str(tmp_path / "o"), "--config", str(venv_config))
    assert result.returncode == 2 and "give exactly one of --query TEXT or --prompt TEXT" in result.stderr
    assert not (tmp_path / "o").exists()
