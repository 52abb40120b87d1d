"""One error hierarchy for everything the user can get wrong or the stages can fail at.

Every error carries a message (what went wrong, where) and a hint (what to do next). The CLI prints
``error: <message>`` and ``hint: <hint>`` and exits with the error's ``exit_code``; the traceback is shown
only with ``--debug``.
"""

from __future__ import annotations

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
