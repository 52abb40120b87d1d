"""``batch --executor slurm`` against a real single-node SLURM (slurmctld + slurmd + munge), with the backend doubles
in the two test venvs. Skipped with the reason where the cluster cannot start (not root, SLURM not installed);
never in CI (``CI`` set): there a missing cluster is a failure.

Covers: a batch of 16 images as 4 array tasks per stage linked with ``aftercorr``, where one shard fails in
segmentation (its 3D task is cancelled, the others finish); ``batch-status``; ``--resume`` after the fault is
cleared (only the failed images are resubmitted, finished ones untouched); a task sent the warning signal
mid-shard (requeued, nothing lost, nothing redone); ``--dry-run`` scripts; the pure parts (modes, exit policy).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from pipeline.config import apply_overrides, load_config
from pipeline.driver.slurm import arrays_for, task_exit_code, wait_for
from tests.conftest import draw_scene, run_cli
from tests.slurm_cluster import start_cluster, unavailable

SMALL = ["--set", "slurm.segment.mem=300M", "--set", "slurm.reconstruct.mem=400M", "--set", "slurm.segment.cpus=1",
         "--set", "slurm.reconstruct.cpus=1", "--set", "slurm.shard_size=4"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    reason = unavailable()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the SLURM tests: {reason}")
        pytest.skip(reason)
    running = start_cluster(tmp_path_factory.mktemp("slurm"))
    yield running
    running.stop()


@pytest.fixture
def slurm_config(venv_config: Path, tmp_path: Path) -> Path:
    """The venv config with the marker-fail segmenter double (behaves like the colour-blob one without a marker)."""
    config = yaml.safe_load(venv_config.read_text())
    config["segment"]["backend"] = "tests.doubles.faulty:MarkerFailSegmenterDouble"
    path = tmp_path / "slurm-config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _list(tmp_path: Path, good: int, bad: int, marker: Path) -> Path:
    photos = tmp_path / "photos"
    photos.mkdir()
    lines = []
    for i in range(good + bad):
        image = draw_scene(photos / f"p{i:02d}.png")
        row = {"image": str(image), "prompt": "red box"}
        if i >= good:
            row["segment.options.fail_if_exists"] = str(marker)
        lines.append(json.dumps(row))
    listing = tmp_path / "list.jsonl"
    listing.write_text("\n".join(lines) + "\n")
    return listing


def _status(root: Path, *extra: str):
    return run_cli("batch-status", str(root), *extra)


def _manifest_mtimes(root: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in root.glob("*/objects/manifest.json")}


@pytest.mark.slow
def test_per_stage_arrays_a_failed_shard_and_resume(cluster, slurm_config: Path, tmp_path: Path) -> None:
    marker = tmp_path / "broken-node"
    marker.write_text("x")
    root = tmp_path / "out"
    listing = _list(tmp_path, good=12, bad=4, marker=marker)
    sub = run_cli("batch", "--list", str(listing), "--out", str(root), "--executor", "slurm",
                  "--config", str(slurm_config), *SMALL)
    assert sub.returncode == 0, sub.stderr + sub.stdout
    assert "16 image(s) in 4 shard(s)" in sub.stdout and "reconstruct job" in sub.stdout
    assert wait_for(root, 300), subprocess.run(["squeue"], capture_output=True, text=True).stdout

    status = _status(root)
    assert status.returncode == 1, status.stderr
    assert "images: 12 done, 4 failed" in status.stdout
    shard3 = next(line for line in status.stdout.splitlines() if "shard 003" in line)
    assert "segment failed" in shard3 and "reconstruct cancelled" in shard3, status.stdout
    for n in range(3):
        line = next(line for line in status.stdout.splitlines() if f"shard {n:03d}" in line)
        assert "segment completed" in line and "reconstruct completed" in line and "4 done" in line, status.stdout
    failed = [line for line in status.stdout.splitlines() if line.startswith("failed:")]
    assert len(failed) == 4 and all("failing on purpose" in line and "logs/segment-" in line for line in failed)
    done_before = _manifest_mtimes(root)
    assert len(done_before) == 12

    marker.unlink()  # the fault is fixed
    resumed = _status(root, "--resume", "--set", "slurm.segment.time=00:20:00")  # e.g. more time for the retry
    assert resumed.returncode == 0, resumed.stderr + resumed.stdout
    assert "resubmitting 4 image(s)" in resumed.stdout and "4 image(s) in 1 shard(s)" in resumed.stdout
    newest = sorted(p for p in (root / ".slurm").iterdir() if p.is_dir())[-1]
    assert "#SBATCH --time=00:20:00" in (newest / "segment.sbatch").read_text()
    assert wait_for(root, 300)
    final = _status(root)
    assert final.returncode == 0 and "images: 16 done, 0 failed, 0 not finished" in final.stdout, final.stdout
    after = _manifest_mtimes(root)
    assert len(after) == 16 and all(after[p] == t for p, t in done_before.items())  # nothing finished was redone


@pytest.mark.slow
def test_a_warned_task_requeues_and_finishes_without_redoing(cluster, slurm_config: Path, tmp_path: Path) -> None:
    root = tmp_path / "out"
    listing = _list(tmp_path, good=4, bad=0, marker=tmp_path / "unused")
    sub = run_cli("batch", "--list", str(listing), "--out", str(root), "--executor", "slurm", "--config",
                  str(slurm_config), *SMALL, "--set", "slurm.mode=combined", "--set", "reconstruct.options={delay_s: 1.5}")
    assert sub.returncode == 0, sub.stderr + sub.stdout
    (record,) = [json.loads(p.read_text()) for p in root.glob(".slurm/*/submission.json")]
    assert list(record["jobs"]) == ["all"]
    deadline = time.monotonic() + 120
    while not _manifest_mtimes(root):
        assert time.monotonic() < deadline, "no image finished"
        time.sleep(0.2)
    finished = _manifest_mtimes(root)
    subprocess.run(["scancel", "--signal=USR1", "--batch", f"{record['jobs']['all']}_0"], check=True)
    assert wait_for(root, 300)
    status = _status(root)
    assert status.returncode == 0 and "images: 4 done" in status.stdout, status.stdout
    after = _manifest_mtimes(root)
    assert len(after) == 4 and all(after[p] == t for p, t in finished.items())
    (log,) = list(root.glob(".slurm/*/logs/all-*_0.out"))
    assert "requeueing" in log.read_text()
    show = subprocess.run(["scontrol", "show", "job", "-o", record["jobs"]["all"]], capture_output=True, text=True).stdout
    assert "Restarts=1" in show, show


def test_dry_run_prints_scripts_and_submits_nothing(cluster, slurm_config: Path, tmp_path: Path) -> None:
    root = tmp_path / "out"
    listing = _list(tmp_path, good=9, bad=0, marker=tmp_path / "unused")
    dry = run_cli("batch", "--list", str(listing), "--out", str(root), "--executor", "slurm", "--dry-run",
                  "--config", str(slurm_config), *SMALL, "--set", "slurm.partition=debug", "--set", "slurm.parallelism=2",
                  "--set", "slurm.reconstruct.gpu_type=h100")
    assert dry.returncode == 0, dry.stderr
    out = dry.stdout
    assert out.count("#!/bin/bash") == 2 and "#SBATCH --array=0-2%2" in out and "#SBATCH --partition=debug" in out
    assert "#SBATCH --gres=gpu:1" in out and "#SBATCH --gres=gpu:h100:1" in out
    assert "--dependency=aftercorr:<segment job id> --kill-on-invalid-dep=yes" in out
    assert "#SBATCH --signal=B:USR1@300" in out and "scontrol requeue" in out
    assert "HF_TOKEN" not in out and not (root / ".slurm").exists()
    assert subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip() == ""


# ---------------------------------------------------------------------------- without a cluster


def test_batch_status_takes_set_only_with_resume_and_never_a_config_file(tmp_path: Path) -> None:
    alone = run_cli("batch-status", str(tmp_path), "--set", "slurm.segment.time=00:20:00")
    assert alone.returncode == 2 and "--set only applies with --resume" in alone.stderr, alone.stderr
    (tmp_path / "any.yaml").write_text("segment: {threshold: 0.3}\n")
    with_file = run_cli("batch-status", str(tmp_path), "--resume", "--config", str(tmp_path / "any.yaml"))
    assert with_file.returncode == 2 and "--config does not apply" in with_file.stderr, with_file.stderr
    assert "Traceback" not in alone.stderr + with_file.stderr


def test_modes_pick_per_stage_arrays_when_the_requests_differ() -> None:
    base = load_config()
    assert [a.label for a in arrays_for(base, ("segment", "reconstruct"))] == ["segment", "reconstruct"]
    same = apply_overrides(base, ["slurm.reconstruct.mem=32G"])
    (combined,) = arrays_for(same, ("segment", "reconstruct"))
    assert combined.label == "all" and combined.stages == ("segment", "reconstruct")
    forced = apply_overrides(base, ["slurm.mode=combined", "slurm.segment.cpus=16"])
    (larger,) = arrays_for(forced, ("segment", "reconstruct"))
    assert larger.resources.mem == "64G" and larger.resources.cpus == 16
    assert [a.label for a in arrays_for(base, ("reconstruct",))] == ["reconstruct"]


def test_a_task_fails_only_when_no_image_of_its_shard_finished() -> None:
    assert task_exit_code(["succeeded", "failed"], 1) == 0
    assert task_exit_code(["no objects"], 0) == 0
    assert task_exit_code(["failed", "failed"], 1) == 1
    assert task_exit_code(["failed"], 143) == 143
    assert task_exit_code([], 0) == 0
