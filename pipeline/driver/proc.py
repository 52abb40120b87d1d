"""The only module that starts processes.

Rules: argument lists only (never ``shell=True``); every child gets its own session and process group
(``start_new_session=True``) so that stopping it stops everything it started; stopping is SIGTERM to the
group, a grace period, then SIGKILL. Children get an explicit environment built by :func:`child_environment`.
Secrets travel only through that environment, never through argv, and argv is what gets logged.
While a :class:`~pipeline.driver.reaper.ChildGuard` is active, every child started here is registered with it,
so that it is stopped even if the driver is killed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Callable, Mapping, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.driver.reaper import ChildGuard

__all__ = [
    "SCRUBBED_VARIABLES",
    "CommandResult",
    "child_environment",
    "spawn",
    "stop_process_group",
    "run_command",
    "tail_lines",
    "capture_output",
    "push_guard",
    "pop_guard",
]

_guards: list["ChildGuard"] = []  # active guards of this process, innermost last


def push_guard(guard: "ChildGuard") -> None:
    """Make ``guard`` the one that registers children started from now on."""
    _guards.append(guard)


def pop_guard(guard: "ChildGuard") -> None:
    """Stop registering children with ``guard``."""
    if guard in _guards:
        _guards.remove(guard)

# Variables that would make a child interpreter load the wrong packages or the wrong env.
SCRUBBED_VARIABLES = (
    "PYTHONPATH",
    "PYTHONHOME",
    "PYTHONSTARTUP",
    "PYTHONUSERBASE",
    "__PYVENV_LAUNCHER__",
    "VIRTUAL_ENV",
    "CONDA_PREFIX",
    "CONDA_DEFAULT_ENV",
    "CONDA_PROMPT_MODIFIER",
)


@dataclass(frozen=True)
class CommandResult:
    """Outcome of :func:`run_command`; a non-zero ``returncode`` is not an exception here."""

    argv: tuple[str, ...]
    returncode: int
    duration_s: float
    log_path: Path | None


def child_environment(
    *,
    bin_dir: Path | None = None,
    set_vars: Mapping[str, str | None] | None = None,
    pythonpath: Sequence[Path] = (),
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Build a child's environment: ``base`` (default ``os.environ``) minus :data:`SCRUBBED_VARIABLES`,
    ``bin_dir`` first on PATH, ``PYTHONPATH`` = ``pythonpath`` only, then ``set_vars`` (``None`` deletes)."""
    env = dict(os.environ if base is None else base)
    for name in SCRUBBED_VARIABLES:
        env.pop(name, None)
    if bin_dir is not None:
        env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", "")]).rstrip(os.pathsep)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(str(p) for p in pythonpath)
    env["PYTHONUNBUFFERED"] = "1"
    for key, value in (set_vars or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: Path | None = None,
    stdin: int | IO[bytes] | None = subprocess.DEVNULL,
    stdout: int | IO[bytes] | None = None,
    stderr: int | IO[bytes] | None = None,
    text: bool = False,
    guarded: bool = True,
) -> subprocess.Popen:
    """Start ``argv`` in a new session (own process group) with exactly ``env``; register it with the active
    child guard unless ``guarded`` is False."""
    if isinstance(argv, str):
        raise TypeError("argv must be a list of arguments, not a string")
    if guarded and _guards:
        _guards[-1].ready()  # its guardian runs before the child exists: no window where a kill leaves it behind
    proc = subprocess.Popen(
        [str(a) for a in argv],
        env=dict(env),
        cwd=str(cwd) if cwd else None,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        start_new_session=True,
        text=text,
        bufsize=1 if text else -1,
    )
    if guarded and _guards:
        _guards[-1].watch(proc.pid, Path(str(argv[0])).name + " " + " ".join(str(a) for a in argv[1:4]))
    return proc


def stop_process_group(proc: subprocess.Popen, *, grace_s: float = 10.0) -> int | None:
    """SIGTERM the child's process group, wait up to ``grace_s``, then SIGKILL it. Returns the exit code.

    Safe to call on a process that already exited; also reaps it. The whole group is signalled, so
    grandchildren (vLLM's engine processes, a worker's helpers) go too.
    """
    pgid = proc.pid  # start_new_session=True makes the child the leader of its own group
    if proc.poll() is None:
        _signal_group(pgid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    # The leader may have exited while members of its group live on: always finish the group off.
    _signal_group(pgid, signal.SIGKILL)
    for guard in _guards:
        guard.forget(pgid)
    try:
        return proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:  # pragma: no cover - a process that survives SIGKILL
        return None


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run_command(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    log_path: Path | None = None,
    cwd: Path | None = None,
    timeout_s: float | None = None,
    on_poll: Callable[[], None] | None = None,
    poll_s: float = 0.5,
) -> CommandResult:
    """Run ``argv`` to completion, output appended to ``log_path`` (or discarded); never raises on exit codes.

    ``on_poll``, when given, is called every ``poll_s`` seconds while the child runs (progress displays that
    read the growing log). On timeout or Ctrl-C the child's group is stopped; Ctrl-C is re-raised after cleanup.
    """
    t0 = time.monotonic()
    log = open(log_path, "ab") if log_path else None
    try:
        if log:
            log.write(("$ " + " ".join(str(a) for a in argv) + "\n").encode())
            log.flush()
        out = log if log else subprocess.DEVNULL
        proc = spawn(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        try:
            returncode = _wait(proc, None if timeout_s is None else t0 + timeout_s, on_poll, poll_s)
        except subprocess.TimeoutExpired:
            stop_process_group(proc)
            returncode = -signal.SIGKILL
        except BaseException:
            stop_process_group(proc, grace_s=3.0)
            raise
    finally:
        if log:
            log.close()
    return CommandResult(tuple(str(a) for a in argv), returncode, time.monotonic() - t0, log_path)


def _wait(proc: subprocess.Popen, deadline: float | None, on_poll: Callable[[], None] | None, poll_s: float) -> int:
    """Wait for ``proc``, calling ``on_poll`` between waits; TimeoutExpired once past ``deadline``."""
    while True:
        waits = [poll_s] if on_poll is not None else []
        if deadline is not None:
            waits.append(max(0.0, deadline - time.monotonic()))
        try:
            return proc.wait(timeout=min(waits) if waits else None)
        except subprocess.TimeoutExpired:
            if deadline is not None and time.monotonic() >= deadline:
                raise
        if on_poll is not None:
            on_poll()


def tail_lines(path: Path | None, n: int = 20) -> str:
    """The last ``n`` lines of a text file ('' if it does not exist)."""
    if path is None or not Path(path).exists():
        return ""
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - 64 * 1024))
        data = fh.read().decode("utf-8", errors="replace")
    return "\n".join(data.splitlines()[-n:])


def capture_output(argv: Sequence[str], *, env: Mapping[str, str], timeout_s: float = 120.0) -> tuple[int, str]:
    """Run a short command and return ``(returncode, stdout)``; stderr is discarded. Group-killed on timeout."""
    proc = spawn(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except BaseException:
        stop_process_group(proc, grace_s=2.0)
        proc.communicate()
        return -1, ""
    return proc.returncode, out
