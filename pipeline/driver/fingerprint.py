"""Stage fingerprints: one sha256 over the canonical JSON of everything that determines a stage's outputs.

Components: the stage's inputs (content hashes), its config section (minus keys that cannot change the
outputs, see :data:`EXCLUDED_KEYS`), the model identity (backend + weights), the env identity and the
stage code version (hash of the source files that run the stage). A rerun skips a stage whose recorded
fingerprint matches and whose outputs still match their recorded hashes.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping

from pipeline.backends import backend_source

__all__ = ["EXCLUDED_KEYS", "canonical_json", "fingerprint", "code_version", "section_params"]

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # pipeline/
# Keys of a stage's config section that only say *where* or *how visibly* to run, not *what* to compute. The 3D
# stage's extra file formats are among them: a format added later is written from the finished objects (the 3D is
# not computed again), see pipeline/stages/export_run.py.
EXCLUDED_KEYS = frozenset({"env", "variables", "device", "preview", "exports", "texture_size"})

_STAGE_SOURCES: dict[str, tuple[str, ...]] = {
    "segment": ("stages/segment.py", "stages/postprocess.py", "images.py", "inputs.py", "stages/agent/loop.py", "stages/agent/prompts.py", "stages/agent/client.py"),
    "reconstruct": ("stages/reconstruct.py", "stages/scene.py", "stages/frames.py", "images.py", "inputs.py"),
}


def canonical_json(value: Any) -> str:
    """Sorted-key, compact JSON: equal values always give equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def fingerprint(components: Mapping[str, Any]) -> str:
    """``sha256:<hex>`` of the canonical JSON of ``components``."""
    return "sha256:" + hashlib.sha256(canonical_json(components).encode("utf-8")).hexdigest()


def _hash_files(paths: Iterable[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        if path.exists():
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@lru_cache(maxsize=None)
def code_version(stage: str, backend: str) -> str:
    """Hash of the stage's worker, its helpers and its backend's source (found without importing it)."""
    files = [PACKAGE_DIR / rel for rel in _STAGE_SOURCES[stage]]
    source = backend_source(stage, backend)
    if source is not None:
        files.append(source)
    return _hash_files(files)


def section_params(section: Mapping[str, Any]) -> dict[str, Any]:
    """A stage config section as it enters the fingerprint: :data:`EXCLUDED_KEYS` removed."""
    return {k: v for k, v in section.items() if k not in EXCLUDED_KEYS}
