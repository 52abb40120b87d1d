"""Fetch one gated checkpoint with the ``huggingface_hub`` client of the stage env this runs in.

    <env>/bin/python -m pipeline.fetch_weights sam3 --repo facebook/sam3 [--revision REV]
    <env>/bin/python -m pipeline.fetch_weights sam3d-objects --repo facebook/sam-3d-objects --dest DIR

``sam3``: ``sam3.pt`` into the Hugging Face cache (``HF_HOME``/``HF_HUB_CACHE``), where the SAM3 backend
looks for it. ``sam3d-objects``: the repo's ``checkpoints/`` folder (``pipeline.yaml``, its sub-configs and the
``*.ckpt`` files) downloaded under ``<DIR>.download`` (a rerun resumes there) and moved to ``DIR``, the
folder ``reconstruct.sam3d.checkpoint_dir`` names.

The token comes from the environment (``HF_TOKEN``) or the client's own token file (``hf auth login``); it is
never an argument and never printed. Started by :mod:`pipeline.driver.weights`; imports nothing of the driver.
While downloading it prints ``progress: <GiB> GiB`` every few seconds. Exit codes: 0 fetched or already there,
3 the hub refused the token (HTTP 401/403: licence not accepted for its account, or a bad token), 4 repo or
revision not found, 5 hub unreachable or offline, 1 anything else; the last line says which.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import Callable, Sequence

__all__ = ["EXIT_REFUSED", "EXIT_NOT_FOUND", "EXIT_OFFLINE", "SAM3D_SUBFOLDER", "main"]

EXIT_REFUSED = 3
EXIT_NOT_FOUND = 4
EXIT_OFFLINE = 5
SAM3D_SUBFOLDER = "checkpoints"


def _classify(exc: BaseException) -> tuple[int, str]:
    """Exit code and one line for a hub failure (by class name and HTTP status, so test doubles work)."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if "GatedRepoError" in names or status in (401, 403):
        return EXIT_REFUSED, f"error: refused by the hub (HTTP {status or 403}, {type(exc).__name__})"
    if {"RepositoryNotFoundError", "RevisionNotFoundError", "EntryNotFoundError"} & names or status == 404:
        return EXIT_NOT_FOUND, f"error: not found on the hub (HTTP {status or 404}, {type(exc).__name__})"
    if {"LocalEntryNotFoundError", "OfflineModeIsEnabled"} & names or isinstance(exc, (ConnectionError, TimeoutError)):
        return EXIT_OFFLINE, f"error: the hub cannot be reached ({type(exc).__name__})"
    return 1, f"error: {type(exc).__name__}: {exc}".splitlines()[0]


def _size_gib(path: Path) -> float:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total / 2**30


def _with_progress(fn: Callable[[], str], watched: Path, every_s: float = 5.0) -> str:
    """Run ``fn`` while printing the size of ``watched`` every ``every_s`` seconds."""
    stop = threading.Event()

    def report() -> None:
        while not stop.wait(every_s):
            print(f"progress: {_size_gib(watched):.2f} GiB", flush=True)

    thread = threading.Thread(target=report, daemon=True)
    thread.start()
    try:
        return fn()
    finally:
        stop.set()
        thread.join(timeout=1)


def _fetch_sam3(repo: str, revision: str | None) -> None:
    from huggingface_hub import constants, hf_hub_download

    from pipeline.backends.sam3_assets import CHECKPOINT_NAME

    watched = Path(constants.HF_HUB_CACHE) / ("models--" + repo.replace("/", "--"))
    path = _with_progress(lambda: hf_hub_download(repo_id=repo, filename=CHECKPOINT_NAME, revision=revision), watched)
    print(f"fetched {repo}/{CHECKPOINT_NAME} -> {path}", flush=True)


def _complete(dest: Path) -> bool:
    from pipeline.backends.sam3d import check_checkpoint_dir
    from pipeline.errors import BackendError

    try:
        check_checkpoint_dir(dest, random_weights=False)
    except BackendError:
        return False
    return True


def _fetch_sam3d(repo: str, revision: str | None, dest: Path) -> None:
    from huggingface_hub import snapshot_download

    from pipeline.atomic import replace_dir

    if _complete(dest):
        print(f"already there: {dest}", flush=True)
        return
    staging = dest.with_name(dest.name + ".download")
    staging.mkdir(parents=True, exist_ok=True)
    _with_progress(lambda: snapshot_download(repo_id=repo, revision=revision, local_dir=str(staging),
                                             allow_patterns=[f"{SAM3D_SUBFOLDER}/*"]), staging)
    folder = staging / SAM3D_SUBFOLDER
    if not (folder / "pipeline.yaml").is_file():
        raise FileNotFoundError(f"{repo} has no {SAM3D_SUBFOLDER}/pipeline.yaml (got {sorted(p.name for p in staging.iterdir())})")
    replace_dir(folder, dest)
    shutil.rmtree(staging, ignore_errors=True)
    if not _complete(dest):
        raise FileNotFoundError(f"{dest} lacks files its pipeline.yaml names")
    print(f"fetched {repo}/{SAM3D_SUBFOLDER} -> {dest}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, fetch, map hub failures to the exit codes above."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.fetch_weights")
    parser.add_argument("what", choices=("sam3", "sam3d-objects"))
    parser.add_argument("--repo", required=True)
    parser.add_argument("--revision")
    parser.add_argument("--dest", type=Path, help="sam3d-objects: the checkpoint folder to fill")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # bars are noise in a log; we print sizes
    try:
        if args.what == "sam3":
            _fetch_sam3(args.repo, args.revision)
        else:
            if args.dest is None:
                parser.error("sam3d-objects needs --dest")
            _fetch_sam3d(args.repo, args.revision, args.dest)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure becomes one exit code and one line
        code, line = _classify(exc)
        print(line, flush=True)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
