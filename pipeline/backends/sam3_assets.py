"""What the SAM3 backend needs before torch: the device, the BPE vocab and the checkpoint file.

Pure Python (hashlib, importlib): the Hugging Face hub client is imported only inside
:func:`resolve_checkpoint`, and hub failures are turned into :class:`~pipeline.errors.BackendError` by
:func:`hub_error`, which reads the exception by class name and HTTP status so tests can pass fakes.

- Device: ``auto | cpu | cuda | cuda:N`` → ``"cpu"`` or ``"cuda:N"`` (:func:`parse_device`).
- BPE vocab: ``sam3`` 0.1.4's wheel lacks ``bpe_simple_vocab_16e6.txt.gz``; the ``open_clip_torch`` wheel
  (installed by ``envs/sam3.yml``) ships the identical OpenAI-CLIP file. ``segment.sam3.bpe_path`` overrides.
  Either way the sha256 is checked (:func:`locate_bpe`).
- Checkpoint: ``segment.sam3.checkpoint`` is a local ``.pt`` path or a hub repo id (default
  ``facebook/sam3``, gated) whose ``sam3.pt`` is fetched through the HF cache; ``HF_ENDPOINT``,
  ``HF_HOME``/``HF_HUB_CACHE``, ``HF_TOKEN`` and ``HF_HUB_OFFLINE`` are honoured by ``huggingface_hub``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Callable

from pipeline.errors import BackendError

__all__ = [
    "BPE_NAME",
    "BPE_SHA256",
    "CHECKPOINT_NAME",
    "parse_device",
    "locate_bpe",
    "is_local_checkpoint",
    "resolve_checkpoint",
    "hub_error",
    "checkpoint_load_error",
]

BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
BPE_PACKAGE = "open_clip"  # from the open_clip_torch distribution
CHECKPOINT_NAME = "sam3.pt"
_GATED_HINT = (
    "accept the licence at https://huggingface.co/{repo} with your account, then `export HF_TOKEN=hf_...` "
    "(or `hf auth login`); or download {file} yourself and set segment.sam3.checkpoint to its path"
)


# ------------------------------------------------------------------------------------------- device


def parse_device(spec: str, cuda_count: int) -> str:
    """``auto | cpu | cuda | cuda:N`` → ``"cpu"`` or ``"cuda:N"``, checked against ``cuda_count`` visible GPUs.

    ``auto`` is ``cuda:0`` when a GPU is visible, else ``cpu``; ``cuda`` is ``cuda:0``. Indices count the GPUs
    visible to the worker (after ``CUDA_VISIBLE_DEVICES``).
    """
    text = spec.strip().lower()
    if text == "auto":
        return "cuda:0" if cuda_count > 0 else "cpu"
    if text == "cpu":
        return "cpu"
    kind, sep, index_text = text.partition(":")
    if kind != "cuda" or (sep and not index_text.isdigit()):
        raise BackendError(
            f"segment.device {spec!r} is not a device",
            hint="use auto, cpu, cuda or cuda:N (N = GPU index, e.g. cuda:1)",
        )
    index = int(index_text) if sep else 0
    if cuda_count == 0:
        raise BackendError(
            f"segment.device is {spec!r} but no CUDA GPU is visible to the sam3 env",
            hint="set segment.device=cpu (slow), or check the driver, CUDA_VISIBLE_DEVICES and that the env's "
            "torch is a CUDA build (python -c 'import torch; print(torch.version.cuda)')",
        )
    if index >= cuda_count:
        raise BackendError(
            f"segment.device is {spec!r} but only {cuda_count} GPU(s) are visible (cuda:0..cuda:{cuda_count - 1})",
            hint="pick a visible index, or check CUDA_VISIBLE_DEVICES in segment.variables",
        )
    return f"cuda:{index}"


# ------------------------------------------------------------------------------------------- BPE vocab


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _packaged_bpe(package: str) -> Path | None:
    """The vocab inside an installed package, found without importing it (open_clip's import pulls in torch)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / BPE_NAME
        if candidate.is_file():
            return candidate
    return None


def locate_bpe(override: Path | None, *, package: str = BPE_PACKAGE) -> Path:
    """The CLIP BPE vocab to pass as ``bpe_path``: ``override`` if set, else the copy in ``package``; sha-checked."""
    if override is not None:
        path = Path(override).expanduser()
        if not path.is_file():
            raise BackendError(
                f"segment.sam3.bpe_path {path} does not exist",
                hint=f"point it at {BPE_NAME}, or unset it to use the copy shipped by open_clip_torch",
            )
        source = "segment.sam3.bpe_path"
    else:
        found = _packaged_bpe(package)
        if found is None:
            raise BackendError(
                f"the CLIP BPE vocab {BPE_NAME} was not found: the sam3 wheel does not ship it and "
                f"package {package!r} (open_clip_torch) is not installed in this env",
                hint="recreate the env from envs/sam3.yml (it installs open_clip_torch), or "
                "`pip install open_clip_torch` into it, or set segment.sam3.bpe_path",
            )
        path, source = found, f"the {package} package"
    digest = _sha256(path)
    if digest != BPE_SHA256:
        raise BackendError(
            f"{path} (from {source}) is not the CLIP BPE vocab SAM3 was trained with: sha256 {digest[:12]}…, "
            f"expected {BPE_SHA256[:12]}…",
            hint="replace the file with the original bpe_simple_vocab_16e6.txt.gz, or fix segment.sam3.bpe_path",
        )
    return path


# ------------------------------------------------------------------------------------------- checkpoint


def is_local_checkpoint(value: str) -> bool:
    """True if ``checkpoint`` names a file (absolute, ``./``/``~`` relative, or ending in ``.pt``/``.pth``)."""
    return (
        value.startswith(("/", "./", "../", "~"))
        or value.endswith((".pt", ".pth"))
        or Path(value).expanduser().is_file()
    )


def _class_names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def _status(exc: BaseException) -> int | None:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return status if isinstance(status, int) else None


def _repo_cache_dir(cache_dir: str | os.PathLike[str] | None, repo: str) -> str:
    folder = "models--" + repo.replace("/", "--")
    return os.path.join(os.fspath(cache_dir), folder) if cache_dir else f"<HF cache>/{folder}"


def hub_error(
    exc: BaseException, *, repo: str, filename: str, cache_dir: str | os.PathLike[str] | None = None
) -> BackendError:
    """Turn a ``huggingface_hub`` download failure into a BackendError that says what to do."""
    names, status, text = _class_names(exc), _status(exc), str(exc)
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if "Consistency check failed" in text:
        where = _repo_cache_dir(cache_dir, repo)
        return BackendError(
            f"the download of {filename} from {repo} is corrupt (Consistency check failed: size mismatch)",
            hint=f"delete {where}/blobs/*.incomplete and the {filename} link under {where}/snapshots/, then rerun; "
            "or rerun with --redownload (segment.sam3.redownload=true) to fetch it again",
        )
    if "GatedRepoError" in names or status in (401, 403):
        token = "HF_TOKEN is set" if os.environ.get("HF_TOKEN") else "no HF_TOKEN is set"
        return BackendError(
            f"{repo} is a gated model and the hub refused {filename} (HTTP {status or 403}; {token})",
            hint=_GATED_HINT.format(repo=repo, file=filename),
        )
    if "RepositoryNotFoundError" in names or "RevisionNotFoundError" in names or status == 404:
        return BackendError(
            f"{repo}/{filename} was not found on {endpoint} (HTTP {status or 404})",
            hint="check segment.sam3.checkpoint (a repo id such as facebook/sam3, or a local .pt path) "
            "and segment.sam3.revision",
        )
    if "LocalEntryNotFoundError" in names or "OfflineModeIsEnabled" in names:
        return BackendError(
            f"{filename} of {repo} is not in the HF cache and the hub cannot be reached (offline or no network)",
            hint="download it once with network access (unset HF_HUB_OFFLINE), set HF_ENDPOINT to a reachable "
            "mirror, or set segment.sam3.checkpoint to a local sam3.pt",
        )
    return BackendError(
        f"downloading {filename} from {repo} via {endpoint} failed: {type(exc).__name__}: {text}".splitlines()[0],
        hint="check the network / HF_ENDPOINT and retry, or set segment.sam3.checkpoint to a local sam3.pt",
    )


def checkpoint_load_error(exc: BaseException, path: Path, *, from_hub: bool) -> BackendError:
    """A checkpoint that exists but cannot be read (truncated, not a torch file)."""
    if from_hub:
        hint = f"delete {path} (a link into the HF cache; delete its blob too) or rerun with --redownload"
    else:
        hint = f"re-download or re-copy {path}; it must be the sam3.pt of facebook/sam3"
    return BackendError(f"checkpoint {path} cannot be loaded ({type(exc).__name__}: {exc})".splitlines()[0], hint=hint)


Downloader = Callable[..., str]


def resolve_checkpoint(
    checkpoint: str,
    *,
    revision: str | None = None,
    redownload: bool = False,
    download: Downloader | None = None,
) -> tuple[Path, bool]:
    """The local checkpoint file, downloading ``sam3.pt`` through the HF cache if ``checkpoint`` is a repo id.

    Returns ``(path, from_hub)``. ``download`` defaults to ``huggingface_hub.hf_hub_download`` (tests pass a
    fake with the same keyword arguments). ``redownload`` forces a fresh download of a cached file.
    """
    if is_local_checkpoint(checkpoint):
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise BackendError(
                f"segment.sam3.checkpoint {path} does not exist",
                hint="download sam3.pt from the gated repo facebook/sam3 and point segment.sam3.checkpoint at it, "
                "or use the repo id facebook/sam3",
            )
        return path, False
    cache_dir = None
    if download is None:
        from huggingface_hub import constants, hf_hub_download

        download, cache_dir = hf_hub_download, constants.HF_HUB_CACHE
    try:
        local = download(repo_id=checkpoint, filename=CHECKPOINT_NAME, revision=revision, force_download=redownload)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - every hub failure becomes one BackendError with a hint
        raise hub_error(exc, repo=checkpoint, filename=CHECKPOINT_NAME, cache_dir=cache_dir) from exc
    return Path(local), True
