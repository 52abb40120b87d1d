"""Source photos by identity: the sha256 of a file's bytes, computed once and cached by the file's stat.

:meth:`SourceIndex.identify` turns a path into a :class:`SourcePhoto` (sha256, size, header facts) without
decoding pixels (:func:`pipeline.images.probe_image`). It keeps two small tables in SQLite under the engine's
state dir (``sources.sqlite``), the way git's index and DVC's state database avoid rehashing unchanged files:

- **stat → sha256**, keyed by the resolved path. An entry is trusted only when the file's device, inode, size,
  ``st_mtime_ns`` **and** ``st_ctime_ns`` all equal the recorded ones. The ctime is what makes this safe: no user
  call can set it, and every write, rename onto the path or ``os.utime`` moves it, so a file changed and then
  given its old size and mtime back is hashed again. **Racy files** (as in git's "racy git"): a file whose
  mtime or ctime is less than :data:`RACY_WINDOW_NS` before the moment it was hashed may have been written again
  within the timestamp granularity of its filesystem without a visible stat change; such an entry is never
  trusted, so the file is hashed again (its bytes read, not its pixels) until it is older than the window.
- **sha256 → facts**: the header facts (format, orientation, sizes, mode) and the structural check, which are a
  function of the bytes alone, stored once per content (and per :data:`FACTS_VERSION`).

A rerun over unchanged files therefore reads no file at all, and a changed file costs one read + hash. When the
state dir cannot be written (read-only, full) the index works from memory for this process, and a store that
cannot be read (damaged, or locked on a network filesystem) counts as a miss: it is a cache, never an error. Thread-safe; several driver processes may share one store (SQLite's own locking).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.atomic import write_with
from pipeline.errors import InputError, ManifestError
from pipeline.handoff import INPUT_DIR, LEGACY_INPUT_IMAGE, FileRecord, InputManifest, write_manifest
from pipeline.images import DEFAULT_MAX_PIXELS, NORMALISATION, ImageFacts, decode_image, probe_image
from pipeline.inputs import INPUT_MANIFEST, SOURCE_STEM, image_identity, load_input

StoreMode = Literal["copy", "hardlink", "reflink"]
_FICLONE = 0x40049409  # Linux ioctl: share the source's blocks (btrfs, XFS, bcachefs); EOPNOTSUPP elsewhere

__all__ = ["SourcePhoto", "SourceIndex", "STORE_NAME", "RACY_WINDOW_NS", "FACTS_VERSION", "read_source", "store_input",
           "store_photo", "StoreMode"]

STORE_NAME = "sources.sqlite"
RACY_WINDOW_NS = 2_000_000_000  # 2 s: FAT's mtime granularity, coarser than any other common filesystem's
FACTS_VERSION = 1  # bump when probe_image learns something new: cached facts of older versions are recomputed
_SCHEMA = """
CREATE TABLE IF NOT EXISTS stat (path TEXT PRIMARY KEY, dev INTEGER, ino INTEGER, size INTEGER,
    mtime_ns INTEGER, ctime_ns INTEGER, sha256 TEXT, hashed_ns INTEGER);
CREATE TABLE IF NOT EXISTS facts (sha256 TEXT, version INTEGER, facts TEXT, PRIMARY KEY (sha256, version));
"""


@dataclass(frozen=True)
class SourcePhoto:
    """A checked source photo: absolute ``path``, ``sha256`` of its bytes, ``size`` in bytes, header ``facts``."""

    path: Path
    sha256: str
    size: int
    facts: ImageFacts

    @property
    def identity(self) -> str:
        """The image identity every stage fingerprint uses (see :func:`pipeline.inputs.image_identity`)."""
        return image_identity(self.sha256)


def read_source(path: Path) -> tuple[bytes, os.stat_result]:
    """The bytes of a user's photo and the stat taken before reading them, or a one-line InputError."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise InputError(f"image not found: {path}", hint="check the --image path") from None
    except OSError as exc:
        raise InputError(f"cannot read image {path}: {exc.strerror}", hint="check the file's permissions") from None
    if not path.is_file():
        raise InputError(f"image path is not a file: {path}", hint="pass an image file, e.g. photo.jpg")
    try:
        return path.read_bytes(), st
    except OSError as exc:
        raise InputError(f"cannot read image {path}: {exc.strerror}", hint="check the file's permissions") from None


class SourceIndex:
    """The stat cache of source photos (see the module docstring). ``state_dir`` None: memory only."""

    def __init__(self, state_dir: Path | None, *, racy_window_ns: int = RACY_WINDOW_NS) -> None:
        self.racy_window_ns = racy_window_ns
        self._lock = threading.Lock()
        self._db = self._connect(state_dir)
        self.hashed = 0  # files read and hashed by this index (for tests and benchmarks)
        self.probed = 0  # header checks run (new content)

    @staticmethod
    def _connect(state_dir: Path | None) -> sqlite3.Connection:
        if state_dir is not None:
            try:
                Path(state_dir).mkdir(parents=True, exist_ok=True)
                db = sqlite3.connect(str(Path(state_dir) / STORE_NAME), timeout=10, check_same_thread=False)
                # a cache: an entry lost to a crash or power cut is only hashed again, so no fsync per commit
                db.execute("PRAGMA synchronous=OFF")
                db.executescript(_SCHEMA)
                return db
            except (OSError, sqlite3.Error):
                pass  # a read-only or full state dir: this process works from memory
        db = sqlite3.connect(":memory:", check_same_thread=False)
        db.executescript(_SCHEMA)
        return db

    def close(self) -> None:
        """Close the store."""
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ the two tables

    def _cached_sha(self, key: str, st: os.stat_result) -> str | None:
        row = self._read("SELECT dev, ino, size, mtime_ns, ctime_ns, sha256, hashed_ns FROM stat WHERE path = ?", (key,))
        if row is None:
            return None
        dev, ino, size, mtime_ns, ctime_ns, sha, hashed_ns = row
        same = (dev, ino, size, mtime_ns, ctime_ns) == (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        racy = max(mtime_ns, ctime_ns) >= hashed_ns - self.racy_window_ns
        return sha if same and not racy else None

    def _remember_sha(self, key: str, st: os.stat_result, sha: str, hashed_ns: int) -> None:
        self._write("INSERT OR REPLACE INTO stat VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (key, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, sha, hashed_ns))

    def _cached_facts(self, sha: str, max_pixels: int) -> ImageFacts | None:
        row = self._read("SELECT facts FROM facts WHERE sha256 = ? AND version = ?", (sha, FACTS_VERSION))
        if row is None:
            return None
        facts = ImageFacts.model_validate(json.loads(row[0]))
        return facts if facts.pixels <= max_pixels else None  # over this run's limit: probe again to refuse it

    def _remember_facts(self, sha: str, facts: ImageFacts) -> None:
        self._write("INSERT OR REPLACE INTO facts VALUES (?, ?, ?)", (sha, FACTS_VERSION, facts.model_dump_json()))

    def _read(self, sql: str, args: tuple) -> tuple | None:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchone()
            except sqlite3.Error:
                return None  # a damaged or locked store (e.g. on a network filesystem) is a miss, never an error

    def _write(self, sql: str, args: tuple) -> None:
        with self._lock:
            try:
                self._db.execute(sql, args)
                self._db.commit()
            except sqlite3.Error:
                pass  # a cache that cannot be written is only slower

    # ------------------------------------------------------------------ the public calls

    def identify(self, path: Path, *, max_pixels: int) -> SourcePhoto:
        """Check ``path`` and name it by content: cached when its stat is unchanged, else read and hashed once.

        Raises a one-line InputError for a missing, unreadable, empty, truncated, oversized or non-image file.
        """
        path = Path(path).expanduser()
        key = str(path.resolve())
        try:
            st = path.stat()
        except OSError:
            st = None  # read_source below says what is wrong with it
        sha = self._cached_sha(key, st) if st is not None and stat.S_ISREG(st.st_mode) else None
        facts = self._cached_facts(sha, max_pixels) if sha else None
        if sha is None or facts is None:
            hashed_ns = time.time_ns()
            data, st = read_source(path)
            sha = hashlib.sha256(data).hexdigest()
            self.hashed += 1
            self._remember_sha(key, st, sha, hashed_ns)
            facts = self._cached_facts(sha, max_pixels)
            if facts is None:
                facts = probe_image(data, name=str(path), max_pixels=max_pixels)
                self.probed += 1
                self._remember_facts(sha, facts)
        return SourcePhoto(Path(key), sha, st.st_size, facts)

    def seed(self, path: Path, sha256: str, facts: ImageFacts, *, written_here: bool = False) -> None:
        """Record a file whose bytes the caller just hashed and checked (e.g. a web upload written to disk).

        ``written_here``: this process wrote the file itself from exactly those bytes into a folder nobody else
        writes (a job's upload), so there is no racy window to wait out: the entry is trusted at once.
        """
        path = Path(path)
        st = path.stat()
        hashed_ns = time.time_ns()
        if written_here:
            hashed_ns = max(hashed_ns, st.st_mtime_ns, st.st_ctime_ns) + self.racy_window_ns + 1
        self._remember_sha(str(path.resolve()), st, sha256, hashed_ns)
        self._remember_facts(sha256, facts)


# ---------------------------------------------------------------------------------------------- a run's input


def store_input(run_dir: Path, photo: SourcePhoto, *, mode: StoreMode = "copy") -> InputManifest:
    """Keep ``photo`` in ``run_dir/input/`` without re-encoding it, then write ``input/manifest.json`` last.

    Nothing is written when the run already holds these bytes. The bytes are read once here and must still
    hash to ``photo.sha256`` (a photo edited between planning and running fails this run with an InputError,
    never mixing two versions). ``mode``: ``copy``; ``hardlink`` (the run shares the file with its source: no
    copy, but an edit of the source then shows in the run, and the stages refuse it); ``reflink`` (a
    copy-on-write clone where the filesystem supports it, else a copy). Formats not every stage reads are
    re-encoded once as PNG (level 1). A photo inside the run directory (a web upload) is always hard-linked.
    """
    run_dir = Path(run_dir)
    try:
        current = load_input(run_dir)
    except (InputError, ManifestError):
        current = None
    if current is not None and current.stored_as != "legacy" and current.file.sha256 == photo.sha256 \
            and current.normalisation == NORMALISATION and (run_dir / current.file.path).is_file() \
            and (run_dir / current.file.path).stat().st_size == current.file.size:
        return current
    folder = run_dir / INPUT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    if _inside(photo.path, run_dir) and photo.facts.kept_as_is:
        mode = "hardlink"
    dest = folder / f"{SOURCE_STEM}.{photo.facts.ext}"
    stored_as, record = _store_bytes(photo, dest, mode)
    for old in [*folder.glob(f"{SOURCE_STEM}.*"), run_dir / LEGACY_INPUT_IMAGE]:
        if old != dest and old.is_file():
            old.unlink()
    manifest = InputManifest(file=record, identity=photo.identity, normalisation=NORMALISATION,
                             facts=photo.facts.model_dump(), source=str(photo.path), stored_as=stored_as)
    write_manifest(run_dir / INPUT_MANIFEST, manifest)
    return manifest


def store_photo(run_dir: Path, path: Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> InputManifest:
    """Check the photo at ``path`` and make it ``run_dir``'s input, without a stat cache: for tests, benchmarks
    and tools that build run directories by hand (the driver goes through :class:`SourceIndex`)."""
    return store_input(run_dir, SourceIndex(None).identify(path, max_pixels=max_pixels))


def _inside(path: Path, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


def _store_bytes(photo: SourcePhoto, dest: Path, mode: StoreMode) -> tuple[str, FileRecord]:
    """Put the photo at ``dest`` (atomically); return how it was stored and its file record."""
    rel = f"{INPUT_DIR}/{dest.name}"
    if not photo.facts.kept_as_is:
        data, _ = read_source(photo.path)
        _check_unchanged(photo, data)
        image = decode_image(data, name=str(photo.path))
        write_with(dest, lambda tmp: image.save(tmp, format="PNG", compress_level=1))
        return "png", FileRecord(path=rel, sha256=hashlib.sha256(dest.read_bytes()).hexdigest(), size=dest.stat().st_size)
    stored_as: str = mode
    if mode == "hardlink":
        try:
            _link(photo.path, dest)
        except OSError:
            stored_as = "copy"  # another filesystem, or links not allowed: copy instead
    if stored_as in ("copy", "reflink"):
        data, _ = read_source(photo.path)
        _check_unchanged(photo, data)
        stored_as = "reflink" if mode == "reflink" and _try_reflink(photo.path, dest) else "copy"
        if stored_as == "copy":
            write_with(dest, lambda tmp: tmp.write_bytes(data))
    else:
        _check_unchanged(photo, dest.read_bytes())
    return stored_as, FileRecord(path=rel, sha256=photo.sha256, size=photo.size)


def _check_unchanged(photo: SourcePhoto, data: bytes) -> None:
    if hashlib.sha256(data).hexdigest() != photo.sha256:
        raise InputError(f"{photo.path} changed after the run was planned (its content no longer matches)",
                         hint="leave the photo alone while a run uses it, then run the command again")


def _link(source: Path, dest: Path) -> None:
    tmp = dest.with_name(f".{dest.name}.link")
    tmp.unlink(missing_ok=True)
    os.link(source, tmp)
    os.replace(tmp, dest)


def _try_reflink(source: Path, dest: Path) -> bool:
    """Clone ``source`` to ``dest`` copy-on-write (Linux FICLONE); False where the filesystem cannot."""
    try:
        import fcntl
    except ImportError:
        return False
    tmp = dest.with_name(f".{dest.name}.clone")
    try:
        with open(source, "rb") as src, open(tmp, "wb") as dst:
            fcntl.ioctl(dst.fileno(), _FICLONE, src.fileno())
        os.replace(tmp, dest)
        return True
    except OSError:
        tmp.unlink(missing_ok=True)
        return False
