"""TEST DOUBLE of ``huggingface_hub`` — not the real client; nothing here touches the network.

Put ``tests/doubles/fake_hub`` first on ``PYTHONPATH`` and ``pipeline.fetch_weights`` imports this instead of
the real package. It implements the two calls the fetcher makes, writing small stand-in files:

- ``hf_hub_download(repo_id, filename, revision)``: ``<HF cache>/models--<repo>/snapshots/<commit>/<filename>``
  plus ``refs/<revision or main>``, the real cache layout;
- ``snapshot_download(repo_id, revision, local_dir, allow_patterns)``: ``<local_dir>/checkpoints/pipeline.yaml``
  naming two sub-configs and two ``*.ckpt`` files, and those files.

``FAKE_HUB_MODE``: ``ok`` (default), ``gated`` (raises ``GatedRepoError`` with HTTP 403, as the hub does for
an account that has not accepted the licence) or ``offline`` (``LocalEntryNotFoundError``).
``FAKE_HUB_RECORD``: a file that gets one JSON line per call with the call's arguments, the process argv and the
``HF_TOKEN`` the call saw — so tests can check the token arrived through the environment and not through argv.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from huggingface_hub import constants

__all__ = ["GatedRepoError", "LocalEntryNotFoundError", "hf_hub_download", "snapshot_download", "constants"]

FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


class _Response:
    def __init__(self, status_code: int) -> None:
        self.status_code = status_code


class HfHubHTTPError(Exception):
    """Like the real one: carries ``response.status_code``."""

    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.response = _Response(status_code)


class GatedRepoError(HfHubHTTPError):
    """The hub's answer for a gated repo whose licence the token's account has not accepted."""


class LocalEntryNotFoundError(Exception):
    """The hub cannot be reached and the file is not cached."""


def _record(call: str, **kwargs: object) -> None:
    path = os.environ.get("FAKE_HUB_RECORD")
    if path:
        entry = {"call": call, "kwargs": {k: str(v) for k, v in kwargs.items()}, "argv": sys.argv,
                 "token": os.environ.get("HF_TOKEN")}
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")


def _maybe_fail(repo_id: str) -> None:
    mode = os.environ.get("FAKE_HUB_MODE", "ok")
    if mode == "gated":
        raise GatedRepoError(f"403 Client Error. Cannot access gated repo for url https://huggingface.co/{repo_id}", 403)
    if mode == "offline":
        raise LocalEntryNotFoundError("cannot reach the hub (fake offline mode)")


def hf_hub_download(repo_id: str, filename: str, revision: str | None = None, **kwargs: object) -> str:
    """Write a stand-in file into the HF cache layout and return its path."""
    _record("hf_hub_download", repo_id=repo_id, filename=filename, revision=revision)
    _maybe_fail(repo_id)
    repo = Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    target = repo / "snapshots" / FAKE_COMMIT / filename
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"fake checkpoint")
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / (revision or "main")).write_text(FAKE_COMMIT)
    return str(target)


def snapshot_download(repo_id: str, revision: str | None = None, local_dir: str | None = None,
                      allow_patterns: object = None, **kwargs: object) -> str:
    """Write a stand-in ``checkpoints/`` folder under ``local_dir`` and return ``local_dir``."""
    _record("snapshot_download", repo_id=repo_id, revision=revision, local_dir=local_dir, allow_patterns=allow_patterns)
    _maybe_fail(repo_id)
    folder = Path(local_dir or ".") / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pipeline.yaml").write_text(
        "ss_generator_config_path: ss_generator.yaml\nss_generator_ckpt_path: ss_generator.ckpt\n"
        "slat_generator_config_path: slat_generator.yaml\nslat_generator_ckpt_path: slat_generator.ckpt\n"
    )
    for name in ("ss_generator.yaml", "ss_generator.ckpt", "slat_generator.yaml", "slat_generator.ckpt"):
        (folder / name).write_text("fake\n")
    return str(local_dir)
