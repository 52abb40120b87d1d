"""``envs create --weights``: fetch the gated checkpoints the configured stages need, each in its stage env.

Jobs (:func:`weights_jobs`), only for stages that use the built-in backends with real weights:

- SAM3 (``segment.backend: sam3``): ``sam3.pt`` of ``segment.sam3.checkpoint`` when that is a hub repo id
  (default ``facebook/sam3``), at ``segment.sam3.revision``, into the Hugging Face cache where the backend
  looks for it. A local ``.pt`` is not fetched, only checked.
- SAM 3D Objects (``reconstruct.backend: sam3d``): the ``checkpoints/`` folder of ``facebook/sam-3d-objects``
  into ``reconstruct.sam3d.checkpoint_dir`` (relative paths are relative to the project, like the worker's).

Each job runs ``<env python> -m pipeline.fetch_weights …`` in its stage env (which holds ``huggingface_hub``;
the driver's env does not) with that env's child environment. The token travels only there: ``HF_TOKEN`` is
inherited from the caller's environment, or the client reads the token file ``hf auth login`` wrote; argv
and the log never hold it. Without any token nothing is tried: the error says what to do.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping, Sequence

from pipeline.config import PROJECT_ROOT, PipelineConfig
from pipeline.driver.envprogress import StepDisplay
from pipeline.driver.envs import ENVS_ROOT, Env, pipeline_command, resolve_env
from pipeline.driver.proc import run_command, tail_lines
from pipeline.errors import WeightsFetchFailed
from pipeline.fetch_weights import EXIT_NOT_FOUND, EXIT_OFFLINE, EXIT_REFUSED

__all__ = [
    "SAM3D_REPO",
    "WeightsJob",
    "weights_jobs",
    "hf_home",
    "find_token",
    "weights_present",
    "weights_argv",
    "weights_environment",
    "no_token_help",
    "token_note",
    "fetch_weights",
    "shown_path",
]

SAM3D_REPO = "facebook/sam-3d-objects"
TOKENS_URL = "https://huggingface.co/settings/tokens"


@dataclass(frozen=True)
class WeightsJob:
    """One gated checkpoint: which (``sam3`` or ``sam3d-objects``), fetched in env ``env`` for ``stage``."""

    what: Literal["sam3", "sam3d-objects"]
    env: str
    stage: str
    repo: str
    revision: str | None = None
    dest: Path | None = None  # sam3d-objects: the checkpoint folder

    @property
    def licence_url(self) -> str:
        """The hub page where the licence is accepted."""
        return f"https://huggingface.co/{self.repo}"


def weights_jobs(config: PipelineConfig, names: Sequence[str] | None = None) -> list[WeightsJob]:
    """The gated checkpoints the configured stages need, for the envs in ``names`` (default: all)."""
    from pipeline.backends.sam3_assets import is_local_checkpoint

    jobs: list[WeightsJob] = []
    seg, rec = config.segment, config.reconstruct
    if seg.backend == "sam3" and not seg.sam3.random_weights and not is_local_checkpoint(seg.sam3.checkpoint):
        jobs.append(WeightsJob("sam3", seg.env, "segment", seg.sam3.checkpoint, seg.sam3.revision))
    if rec.backend == "sam3d" and not rec.sam3d.random_weights:
        dest = Path(rec.sam3d.checkpoint_dir).expanduser()
        jobs.append(WeightsJob("sam3d-objects", rec.env, "reconstruct", SAM3D_REPO,
                               dest=dest if dest.is_absolute() else PROJECT_ROOT / dest))
    return [j for j in jobs if not names or j.env in names]


def hf_home(environ: Mapping[str, str]) -> Path:
    """``HF_HOME``, else ``$XDG_CACHE_HOME/huggingface``, else ``~/.cache/huggingface`` (as the client does)."""
    if environ.get("HF_HOME"):
        return Path(environ["HF_HOME"]).expanduser()
    cache = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "huggingface"


def _hub_cache(environ: Mapping[str, str]) -> Path:
    cache = environ.get("HF_HUB_CACHE") or environ.get("HUGGINGFACE_HUB_CACHE")
    return Path(cache).expanduser() if cache else hf_home(environ) / "hub"


def _token_file(environ: Mapping[str, str]) -> Path:
    return Path(environ["HF_TOKEN_PATH"]).expanduser() if environ.get("HF_TOKEN_PATH") else hf_home(environ) / "token"


def find_token(environ: Mapping[str, str]) -> str | None:
    """Where the hub client will find a token: ``"HF_TOKEN"``, the token file's path, or None."""
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if environ.get(var, "").strip():
            return var
    path = _token_file(environ)
    try:
        return str(path) if path.read_text().strip() else None
    except OSError:
        return None


def weights_present(job: WeightsJob, environ: Mapping[str, str]) -> bool:
    """True when the checkpoint is already where the backend reads it (the HF cache, or the folder)."""
    if job.what == "sam3d-objects":
        from pipeline.backends.sam3d import check_checkpoint_dir
        from pipeline.errors import BackendError

        try:
            check_checkpoint_dir(job.dest or Path("."), random_weights=False)
        except BackendError:
            return False
        return True
    from pipeline.backends.sam3_assets import CHECKPOINT_NAME

    repo = _hub_cache(environ) / ("models--" + job.repo.replace("/", "--"))
    revision = job.revision or "main"
    commit = revision if re.fullmatch(r"[0-9a-f]{40}", revision) else None
    if commit is None:
        try:
            commit = (repo / "refs" / revision).read_text().strip()
        except OSError:
            return False
    return (repo / "snapshots" / commit / CHECKPOINT_NAME).is_file()


def weights_argv(env: Env, job: WeightsJob) -> list[str]:
    """``<env python> -u -m pipeline.fetch_weights WHAT --repo R [--revision V] [--dest D]`` (no token)."""
    argv = [str(env.python), "-u", "-m", "pipeline.fetch_weights", job.what, "--repo", job.repo]
    if job.revision:
        argv += ["--revision", job.revision]
    if job.dest is not None:
        argv += ["--dest", str(job.dest)]
    return argv


def weights_environment(config: PipelineConfig, env: Env, job: WeightsJob) -> dict[str, str]:
    """The child environment of the job: the env's, plus the stage's variables (HF_HOME may be one of them).
    ``HF_TOKEN`` comes along from the caller's environment like every other variable."""
    return env.child_env(dict(config.stage(job.stage).variables))


def shown_path(path: Path) -> str:
    """``path`` relative to the current directory when it is inside it (shorter advice), else absolute."""
    absolute = Path(os.path.abspath(path))  # not resolved: a venv's python is a symlink out of the venv
    try:
        return str(absolute.relative_to(Path.cwd()))
    except ValueError:
        return str(absolute)


def no_token_help(config: PipelineConfig, jobs: Sequence[WeightsJob], *, rerun: str) -> list[str]:
    """What to do when no token is found: licences to accept, how to give a token, the command to rerun."""
    from pipeline.driver.envbuild import target_env

    hf = shown_path(target_env(config, jobs[0].env).bin_dir / "hf") if jobs else "hf"
    lines = ["the weights are gated; to fetch them:",
             "  1. accept the licence on the hub (signed in):"]
    lines += [f"       {url}" for url in dict.fromkeys(j.licence_url for j in jobs)]
    lines += [f"  2. give a read token ({TOKENS_URL}), either",
              "       export HF_TOKEN=hf_...",
              "     or log in once with the stage env's CLI (not in the driver's env):",
              f"       {hf} auth login",
              f"  3. rerun: {rerun}"]
    return lines


def token_note(config: PipelineConfig, names: Sequence[str]) -> str | None:
    """A warning before a long build when the weights fetch at its end will find no token."""
    if not weights_jobs(config, names) or find_token(os.environ):
        return None
    return ("note: no Hugging Face token found (HF_TOKEN, or hf auth login); the envs are built first, "
            "then the weights step stops and says how to give one")


def _failure(job: WeightsJob, code: int, log: Path, rerun: str) -> WeightsFetchFailed:
    status = re.findall(r"HTTP (\d{3})", tail_lines(log, 3))
    http = f"HTTP {status[-1]}" if status else "refused"
    if code == EXIT_REFUSED:
        return WeightsFetchFailed(
            f"the hub refused {job.repo} ({http}): the licence is not accepted for this token's account",
            hint=f"accept it at {job.licence_url} signed in as the token's owner (or use a valid token), "
            f"then rerun `{rerun}`",
        )
    if code == EXIT_NOT_FOUND:
        return WeightsFetchFailed(f"{job.repo} (revision {job.revision or 'main'}) was not found on the hub",
                                  hint="check segment.sam3.checkpoint / segment.sam3.revision")
    reason = "the hub cannot be reached (offline, or HF_HUB_OFFLINE is set)" if code == EXIT_OFFLINE else f"exit {code}"
    return WeightsFetchFailed(
        f"fetching {job.repo} failed: {reason}; last lines of {log}:\n{tail_lines(log, 10)}",
        hint=f"check the network, HF_ENDPOINT or a proxy, then rerun `{rerun}` (downloads resume)",
    )


def fetch_weights(config: PipelineConfig, names: Sequence[str], *, display: StepDisplay) -> int:
    """Fetch every missing checkpoint for the envs in ``names``; 0 when all are there.

    Raises:
        WeightsFetchFailed: no token (nothing is tried), a refused licence, or a failed download.
    """
    rerun = f"{pipeline_command()} envs create --weights" + (f" {' '.join(names)}" if names else "")
    jobs = weights_jobs(config, names)
    if not jobs:
        display.note("weights: none of these envs' stages needs gated weights")
        return 0
    todo: list[tuple[WeightsJob, Env, dict[str, str]]] = []
    for job in jobs:
        env = resolve_env(config, job.env)
        environ = weights_environment(config, env, job)
        if weights_present(job, environ):
            where = shown_path(job.dest) if job.dest else "the Hugging Face cache"
            display.note(f"weights: {job.repo} already in {where}")
        else:
            todo.append((job, env, environ))
    if not todo:
        return 0
    if any(find_token(environ) is None for _, _, environ in todo):
        where = _token_file(todo[0][2])
        raise WeightsFetchFailed(f"no Hugging Face token found (HF_TOKEN is not set; no token file at {where})",
                                 hint="\n".join(no_token_help(config, [j for j, _, _ in todo], rerun=rerun)))
    for i, (job, env, environ) in enumerate(todo, 1):
        log = ENVS_ROOT / "logs" / f"weights-{job.what}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("")  # one fetch per log (the client resumes partial downloads itself)
        display.start(f"weights {job.repo}", i, len(todo), job.what, log, "lines")
        try:
            result = run_command(weights_argv(env, job), env=environ, log_path=log, cwd=PROJECT_ROOT,
                                 on_poll=display.poll)
        except BaseException:
            display.finish(False, "interrupted")
            raise
        display.finish(result.returncode == 0, f"failed (exit {result.returncode})")
        if result.returncode != 0:
            raise _failure(job, result.returncode, log, rerun)
    display.note(f"weights: done; next: {pipeline_command()} envs check")
    return 0
