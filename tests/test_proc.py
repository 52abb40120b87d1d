"""The process choke point: explicit child environments and whole-group shutdown."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from pipeline.driver.proc import child_environment, run_command, spawn, stop_process_group


def test_child_environment_scrubs_and_orders(monkeypatch) -> None:
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    monkeypatch.setenv("PYTHONHOME", "/bad")
    env = child_environment(bin_dir=Path("/env/bin"), pythonpath=[Path("/proj")], set_vars={"A": "1", "HOME": None})
    assert env["PATH"].split(os.pathsep)[0] == "/env/bin"
    assert env["PYTHONPATH"] == "/proj" and "PYTHONHOME" not in env
    assert env["A"] == "1" and "HOME" not in env


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")


def test_stop_process_group_kills_grandchildren_that_ignore_sigterm(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild.pid"
    code = (
        "import os, signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"p = subprocess.Popen([sys.executable, '-c', 'import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)'])\n"
        f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(60)\n"
    )
    proc = spawn([sys.executable, "-c", code], env=child_environment())
    for _ in range(100):
        if pidfile.exists() and pidfile.read_text():
            break
        time.sleep(0.05)
    grandchild = int(pidfile.read_text())
    t0 = time.monotonic()
    stop_process_group(proc, grace_s=0.5)
    assert time.monotonic() - t0 < 5
    assert proc.poll() is not None
    for _ in range(50):
        if not _alive(grandchild):
            break
        time.sleep(0.05)
    assert not _alive(grandchild)


def test_run_command_logs_argv_and_output_without_raising(tmp_path: Path) -> None:
    log = tmp_path / "cmd.log"
    result = run_command([sys.executable, "-c", "print('hello'); raise SystemExit(3)"], env=child_environment(), log_path=log)
    assert result.returncode == 3
    text = log.read_text()
    assert text.startswith("$ ") and "hello" in text
