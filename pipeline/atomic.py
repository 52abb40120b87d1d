"""Atomic file writes and content hashes.

Every output of the pipeline is written to a temporary name in the same directory and renamed into place
(``os.replace``), so a reader never sees a half-written file. Directories of outputs are built under a
staging name (``<name>.partial``) and renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

__all__ = ["sha256_file", "sha256_bytes", "write_bytes_atomic", "write_json_atomic", "write_with", "fresh_dir", "replace_dir"]

_CHUNK = 1 << 20


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's content, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_with(path: Path, writer: Callable[[Path], Any]) -> Path:
    """Call ``writer(tmp_path)`` then rename ``tmp_path`` to ``path``; the temp file is removed on failure.

    The temporary name keeps the suffix of ``path`` so that writers which pick a format by extension work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f"{path.suffix}.tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        writer(tmp_path)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return write_with(path, lambda tmp: tmp.write_bytes(data))


def write_json_atomic(path: Path, payload: Any) -> Path:
    """Write ``payload`` (JSON-serialisable) as indented UTF-8 JSON, atomically."""
    text = json.dumps(payload, indent=2, sort_keys=False, ensure_ascii=False) + "\n"
    return write_bytes_atomic(path, text.encode("utf-8"))


def fresh_dir(path: Path) -> Path:
    """An empty staging directory at ``path`` (whatever a killed worker left there is removed first)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def replace_dir(staging: Path, final: Path) -> None:
    """Move a completed staging directory to ``final``, replacing what was there.

    The old directory is first renamed aside and then deleted, so ``final`` is never a mix of both.
    """
    final = Path(final)
    if final.exists():
        trash = final.with_name(f".{final.name}.old")
        if trash.exists():
            shutil.rmtree(trash)
        os.replace(final, trash)
        os.replace(staging, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, final)
