"""One error hierarchy for everything the user can get wrong or the stages can fail at.

Every error carries a message (what went wrong, where) and a hint (what to do next). The CLI prints
``error: <message>`` and ``hint: <hint>`` and exits with the error's ``exit_code``; the traceback is shown
only with ``--debug``.
"""

from __future__ import annotations

import errno
from pathlib import Path

__all__ = [
    "PipelineError",
    "UsageError",
    "ConfigError",
    "InputError",
    "EnvNotFound",
    "EnvCreateFailed",
    "WeightsFetchFailed",
    "RunLocked",
    "ManifestError",
    "StageFailed",
    "BackendError",
    "ServiceNotReady",
    "VLMError",
    "RunCancelled",
    "OutputError",
    "output_error",
]

EXIT_STAGE_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class PipelineError(Exception):
    """Base class: ``message`` says what went wrong, ``hint`` says what to do about it."""

    exit_code: int = EXIT_STAGE_FAILED

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class UsageError(PipelineError):
    """Wrong command-line usage or API arguments."""

    exit_code = EXIT_USAGE


class ConfigError(PipelineError):
    """An unknown key, a wrong type or an unreadable config file."""

    exit_code = EXIT_USAGE


class InputError(PipelineError):
    """A missing, unreadable or inconsistent input (image, masks folder, run directory)."""

    exit_code = EXIT_USAGE


class EnvNotFound(PipelineError):
    """A stage's env does not exist where the config says it is."""

    exit_code = EXIT_USAGE


class EnvCreateFailed(PipelineError):
    """Building an env from its spec failed."""


class WeightsFetchFailed(PipelineError):
    """Gated checkpoints could not be fetched: no Hugging Face token, a licence not accepted, no network."""


class RunLocked(PipelineError):
    """Another run holds the lock of this run directory."""

    exit_code = EXIT_USAGE


class ManifestError(PipelineError):
    """A manifest is missing, corrupt or of an unknown schema version."""

    def __init__(self, path: Path, reason: str, *, hint: str | None = None) -> None:
        super().__init__(f"manifest {path}: {reason}", hint=hint)
        self.path = path


class StageFailed(PipelineError):
    """A stage worker exited non-zero or reported an error; carries the log path and its last lines."""

    def __init__(
        self,
        stage: str,
        message: str,
        *,
        log_path: Path | None = None,
        tail: str = "",
        hint: str | None = None,
        returncode: int | None = None,
    ) -> None:
        super().__init__(f"stage '{stage}' failed: {message}", hint=hint)
        self.stage = stage
        self.log_path = log_path
        self.tail = tail
        self.returncode = returncode


class BackendError(PipelineError):
    """Raised inside a stage worker by a backend: model loading, weights, CUDA out of memory."""


class ServiceNotReady(PipelineError):
    """A managed server (vLLM) exited, failed to bind, or did not become ready in time."""


class VLMError(PipelineError):
    """The VLM gave no usable answer within the retry budget, or the endpoint refused the request."""


class RunCancelled(PipelineError):
    """A run was cancelled, or the engine stopped, while one of its stages ran; that worker was stopped."""

    exit_code = EXIT_INTERRUPTED


class OutputError(PipelineError):
    """An output could not be written: a full disk, a read-only file system, no write permission."""


_OUTPUT_HINTS = {
    errno.ENOSPC: "free space on that disk (df -h shows it), or write elsewhere with --out; a rerun skips what finished",
    errno.EDQUOT: "your disk quota is used up: free some of it, or write elsewhere with --out",
    errno.EROFS: "that file system is mounted read-only: write elsewhere with --out DIR on a writable disk",
    errno.EACCES: "you may not write there: pass --out DIR to a folder you own",
    errno.EPERM: "you may not write there: pass --out DIR to a folder you own",
}


def output_error(exc: OSError, where: Path | None = None) -> OutputError | None:
    """The write failure ``exc`` as an :class:`OutputError` naming the file (or, when the OS error names none,
    the folder ``where`` it was written in) and the fix; None when ``exc`` is not a write failure a user can fix
    (full disk, quota, read-only, permission)."""
    hint = _OUTPUT_HINTS.get(exc.errno or 0)
    if hint is None:
        return None
    place = f" {exc.filename}" if exc.filename else (f" in {where}" if where is not None else "")
    return OutputError(f"cannot write{place}: {exc.strerror or exc}", hint=hint)
