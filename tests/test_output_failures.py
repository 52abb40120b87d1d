"""Outputs that cannot be written (issue 19): a full disk, a read-only mount, a run whose files fail alone in its
group, two batch drivers sharing one root, and the CLI's last line of defence against an unexpected error.

The disk cases mount a small tmpfs (root only: CI runs as root; elsewhere they are skipped) and call the CLI as a
subprocess, so that what a user sees (exit code, one line per image, no traceback) is what is checked.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from pipeline.config import PipelineConfig, apply_overrides, load_config
from pipeline.driver import cli
from pipeline.driver.engine import Engine
from pipeline.driver.runner import ActiveRun, RunRequest
from pipeline.driver.summary import DriverRef, SummaryItem, read_summary, summary_clock, write_summary
from pipeline.errors import OutputError, output_error
from tests.conftest import draw_scene

REPO = Path(__file__).resolve().parents[1]
HERE = ["--set", "envs.here.kind=current",
        "--set", "segment.env=here", "--set", "segment.backend=tests.doubles.segmenters:ColorBlobSegmenterDouble",
        "--set", "reconstruct.env=here", "--set", "reconstruct.backend=tests.doubles.reconstructors:CubeReconstructorDouble"]


def _batch(tmp_path: Path, root: Path, *images: Path) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "pipeline", "batch", "--images", *map(str, images), "--prompt", "red", "--out",
            str(root), *HERE, "--set", f"engine.state_dir={tmp_path / 'state'}"]
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs mounted at ``tmp_path/disk`` (unmounted afterwards); skipped where mounting is not allowed."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk: Path) -> None:
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_a_full_disk_is_one_line_per_image_and_no_old_summary_claims_success(tmp_path: Path, small_disk: Path) -> None:
    root = small_disk / "root"
    root.mkdir()
    (root / "batch.json").write_text(json.dumps({"counts": {"succeeded": 12}}))  # an older batch's
    _fill(small_disk)
    images = [draw_scene(tmp_path / f"{name}.png") for name in ("a", "b")]
    proc = _batch(tmp_path, root, *images)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert len(lines) == 2, proc.stdout
    for line in lines:
        assert " failed " in line and f"cannot write in {root}/" in line and "No space left on device" in line, line
    summary = read_summary(root / "batch.json")  # removing the old one may have freed the room for the new one
    if summary is None:
        assert "could not be written (No space left on device)" in proc.stdout
        assert not (root / "batch.json").exists(), "the older summary must not stay behind claiming 12 succeeded"
    else:
        assert summary.counts == {"failed": 2} and f"summary: {root / 'batch.json'}" in proc.stdout
    assert [p.name for p in root.iterdir() if p.is_dir()] == [], "no half-written run directory"


def test_an_up_to_date_root_on_a_read_only_mount_reruns_to_say_so(tmp_path: Path, small_disk: Path) -> None:
    root = small_disk / "root"
    images = [draw_scene(tmp_path / f"{name}.png") for name in ("a", "b")]
    first = _batch(tmp_path, root, *images)
    assert first.returncode == 0, first.stderr
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    again = _batch(tmp_path, root, *images)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Traceback" not in again.stdout + again.stderr
    assert again.stdout.count("up to date") == 2, again.stdout
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before
    stale = _batch(tmp_path, root, images[0], draw_scene(tmp_path / "new.png"))
    assert stale.returncode == 1
    assert "cannot be written (Read-only file system) and its segment stage is not up to date" in stale.stdout


# ---------------------------------------------------------------------------------------------- the engine's lanes


@pytest.fixture
def current_config(tmp_path: Path) -> PipelineConfig:
    return apply_overrides(load_config(), [
        "envs.here.kind=current", "segment.env=here", "segment.backend=tests.doubles.segmenters:ColorBlobSegmenterDouble",
        "reconstruct.env=here", "reconstruct.backend=tests.doubles.reconstructors:CubeReconstructorDouble",
        f"engine.state_dir={tmp_path / 'state'}"])


def test_one_runs_write_failure_fails_that_run_only(tmp_path: Path, current_config: PipelineConfig,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    succeed = ActiveRun.succeed

    def full_for_bad(self: ActiveRun, outcome, result):  # type: ignore[no-untyped-def]
        if self.run_dir.name == "bad":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return succeed(self, outcome, result)

    monkeypatch.setattr(ActiveRun, "succeed", full_for_bad)
    requests = [RunRequest(run_dir=tmp_path / "runs" / name, image=draw_scene(tmp_path / f"{name}.png"),
                           prompts=("red",), stages=("segment",)) for name in ("ok1", "bad", "ok2")]
    with Engine(current_config) as engine:
        handles = [engine.submit(r) for r in requests]
        with pytest.raises(OutputError, match=f"cannot write in {tmp_path / 'runs' / 'bad'}: No space left"):
            handles[1].wait(timeout=60)
        for h in (handles[0], handles[2]):
            assert h.wait(timeout=60).stages[0].result["objects"] == 2
    record = json.loads((tmp_path / "runs" / "bad" / "run.json").read_text())["stages"]["segment"]
    assert record["status"] == "failed" and "No space left" in record["reason"]
    assert not list((tmp_path / "runs" / "bad").glob("*.partial"))


# ---------------------------------------------------------------------------------------------- two drivers, one root


def _item(root: Path, name: str, status: str) -> SummaryItem:
    return SummaryItem(source=f"{name}.png", image=f"{name}.png", run_dir=str(root / name), status=status)  # type: ignore[arg-type]


def _other_drivers_summary(root: Path, *, ended: str | None, pid: int, items: list[SummaryItem]) -> None:
    other = DriverRef(host="elsewhere" if ended is None else "here", pid=pid, started="2026-01-01T00:00:00.000+00:00",
                      ended=ended)
    data = {"schema_version": 2, "started": other.started, "ended": ended, "stopped": None,
            "driver": other.model_dump(), "drivers": [other.model_dump()], "counts": {}, "items": [i.model_dump() for i in items]}
    (root / "batch.json").write_text(json.dumps(data))


def test_a_second_driver_merges_with_the_first_instead_of_marking_its_images_failed(tmp_path: Path) -> None:
    root = tmp_path
    _other_drivers_summary(root, ended=None, pid=1, items=[_item(root, "a", "succeeded"), _item(root, "shared", "succeeded")])
    started = summary_clock()
    ours = [_item(root, "shared", "busy"), _item(root, "b", "failed")]
    assert write_summary(root / "batch.json", ours, started=started, ended=summary_clock()) is None
    summary = read_summary(root / "batch.json")
    assert summary is not None
    assert {Path(i.run_dir).name: i.status for i in summary.items} == {"a": "succeeded", "shared": "succeeded", "b": "failed"}
    assert summary.counts == {"succeeded": 2, "failed": 1} and len(summary.drivers) == 2


def test_an_earlier_batchs_summary_is_replaced_not_merged(tmp_path: Path) -> None:
    root = tmp_path
    _other_drivers_summary(root, ended="2026-01-01T00:10:00.000+00:00", pid=1, items=[_item(root, "old", "succeeded")])
    assert write_summary(root / "batch.json", [_item(root, "b", "succeeded")], started=summary_clock()) is None
    summary = read_summary(root / "batch.json")
    assert summary is not None and [Path(i.run_dir).name for i in summary.items] == ["b"] and len(summary.drivers) == 1


# ---------------------------------------------------------------------------------------------- the CLI's last line


def test_output_error_names_the_file_or_the_folder_and_ignores_other_errors(tmp_path: Path) -> None:
    named = output_error(OSError(errno.EROFS, "Read-only file system", "/x/run.json"))
    assert named is not None and named.message == "cannot write /x/run.json: Read-only file system" and "--out" in named.hint
    folder = output_error(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    assert folder is not None and folder.message == f"cannot write in {tmp_path}: No space left on device"
    assert output_error(OSError(errno.ECONNREFUSED, "refused")) is None


@pytest.mark.parametrize("exc, first_line", [
    (RuntimeError("x" * 5000), "error: internal error: RuntimeError: " + "x" * 300),
    (OSError(errno.ENOSPC, "No space left on device", "/full/out.ply"), "error: cannot write /full/out.ply: No space left on device"),
])
def test_an_unexpected_error_is_one_short_answer_and_debug_shows_the_traceback(
        exc: Exception, first_line: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def boom(*_: object, **__: object) -> PipelineConfig:
        raise exc

    monkeypatch.setattr(cli, "load_config", boom)  # inside main's try, like any command's own code
    assert cli.main(["envs", "check"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[0] == first_line and len(err.splitlines()) == 2 and "Traceback" not in err
    with pytest.raises(type(exc)):
        cli.main(["envs", "check", "--debug"])
