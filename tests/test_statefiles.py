"""The engine's per-driver files: named by host and pid, removed once their driver is dead."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from pipeline.driver.statefiles import KEEP_LOGS_S, driver_file, remove_dead_drivers_files


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_dead_drivers_configs_go_their_logs_after_a_day_and_the_rest_stays(tmp_path: Path) -> None:
    host, dead = socket.gethostname(), _dead_pid()
    (tmp_path / "logs").mkdir()
    mine = driver_file(tmp_path, "segment", ".json")
    assert mine.name == f"segment-{host}-{os.getpid()}.json"
    files = {
        "dead_config": tmp_path / f"reconstruct-{host}-{dead}.json",
        "dead_new_log": tmp_path / "logs" / f"segment-{host}-{dead}.log",
        "dead_old_log": tmp_path / "logs" / f"vlm-{host}-{dead}.log",
        "mine": mine,
        "other_host": tmp_path / f"segment-elsewhere-{dead}.json",
        "child_record": tmp_path / f"children-{host}-{dead}.json",  # the reaper's, needed to stop its children
        "legacy_old": tmp_path / f"segment-{dead}.json",
        "legacy_new": tmp_path / f"reconstruct-{dead}.json",
        "sources": tmp_path / "sources.sqlite",
    }
    for path in files.values():
        path.write_text("x")
    old = time.time() - KEEP_LOGS_S * 8
    for key in ("dead_old_log", "legacy_old"):
        os.utime(files[key], (old, old))
    removed = set(remove_dead_drivers_files(tmp_path))
    assert removed == {files["dead_config"], files["dead_old_log"], files["legacy_old"]}
    assert all(p.exists() for k, p in files.items() if p not in removed)
