"""How the CLI reports a stage that fails: one line with the cause, the log's path; the traceback stays in the log
and ``--debug`` shows it."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import draw_scene, run_cli


def _failing_segment(tmp_path: Path, *extra: str):
    marker = tmp_path / "fail"
    marker.touch()
    return run_cli("segment", "--image", str(draw_scene(tmp_path / "scene.png")), "--prompt", "red", "--out", str(tmp_path / "run"),
                   "--set", "envs.here.kind=current", "--set", "segment.env=here",
                   "--set", "segment.backend=tests.doubles.faulty:MarkerFailSegmenterDouble",
                   "--set", f"segment.options.fail_if_exists={marker}", "--set", f"engine.state_dir={tmp_path / 'state'}",
                   *extra, timeout=120)


def test_a_backend_error_is_one_line_and_the_log_keeps_the_traceback(tmp_path: Path) -> None:
    result = _failing_segment(tmp_path)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if not line.startswith("segment: ")]
    assert errors[0] == f"error: stage 'segment' failed: RuntimeError: failing on purpose: {tmp_path / 'fail'} exists"
    assert len(errors) == 2 and errors[1].startswith("  full log: "), result.stderr
    assert "Traceback" not in result.stderr
    assert "Traceback (most recent call last)" in (tmp_path / "run/logs/segment.log").read_text()


def test_debug_shows_the_log_tail(tmp_path: Path) -> None:
    result = _failing_segment(tmp_path, "--debug")
    assert result.returncode != 0
    assert "last lines of the log:" in result.stderr and "raise RuntimeError" in result.stderr
