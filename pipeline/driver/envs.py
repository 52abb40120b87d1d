"""Stage envs: where each stage's interpreter lives, how a child is started in it.

Kinds (``envs.<name>.kind`` in config):

- ``conda``: a conda/mamba/micromamba env, by ``name`` (looked up in the usual envs directories and in
  ``.envs/``) or by ``prefix``.
- ``venv``: a virtual environment at ``prefix`` (default ``.envs/<name>``).
- ``current``: the driver's own interpreter and import path (its ``PYTHONPATH`` is kept; tests, single-env
  installs, the demo server).

The driver never activates an env and never uses ``conda run`` (it buffers output and drops signals): it runs
``<prefix>/bin/python`` by absolute path with an explicit child environment (the env's ``bin`` first on PATH,
``CONDA_PREFIX`` or ``VIRTUAL_ENV`` set, ``PYTHONPATH`` = the project root only, ``PYTHONHOME`` removed, plus
the env's and the stage's declared ``variables``). Conda activation scripts (``etc/conda/activate.d``) therefore
do not run: declare what they would set (``CUDA_HOME``, ``CC``, …) under ``envs.<name>.variables``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from pipeline.config import PROJECT_ROOT, EnvConfig, PipelineConfig
from pipeline.errors import EnvNotFound
from pipeline.driver.proc import child_environment

__all__ = ["ENVS_ROOT", "Env", "resolve_env", "conda_search_dirs", "pipeline_command"]

ENVS_ROOT = PROJECT_ROOT / ".envs"
STAMP_NAME = ".pipeline-env.json"
BUILD_STATE_NAME = ".pipeline-env-build.json"


@dataclass(frozen=True)
class Env:
    """A resolved env: its ``name`` in config, ``kind``, ``prefix`` and declared ``variables``."""

    name: str
    kind: str
    prefix: Path
    variables: Mapping[str, str] = field(default_factory=dict)
    spec: str | None = None

    @property
    def bin_dir(self) -> Path:
        """Directory of the env's executables."""
        return self.prefix / "bin" if self.kind != "current" else Path(sys.executable).parent

    @property
    def python(self) -> Path:
        """Absolute path of the env's interpreter (not resolved through symlinks: a venv's python is one)."""
        if self.kind == "current":
            return Path(sys.executable)
        return self.prefix / "bin" / "python"

    @property
    def stamp(self) -> Path:
        """File written when ``envs create`` finished this env: holds the hash of its spec."""
        return self.prefix / STAMP_NAME

    @property
    def build_state(self) -> Path:
        """File recording which build steps of ``envs create`` finished (a half-built env has it, no stamp)."""
        return self.prefix / BUILD_STATE_NAME

    def is_half_built(self) -> bool:
        """True when ``envs create`` started this env and has not finished its last step."""
        return self.kind != "current" and self.build_state.exists() and not self.stamp.exists()

    def exists(self) -> bool:
        """True when the env's interpreter is there."""
        return self.python.exists()

    def describe(self) -> dict[str, str]:
        """Identity used in fingerprints: name, kind and absolute prefix."""
        return {"name": self.name, "kind": self.kind, "prefix": str(self.prefix)}

    def child_env(self, extra: Mapping[str, str | None] | None = None) -> dict[str, str]:
        """The environment for a child running in this env, with ``extra`` variables on top."""
        marker: dict[str, str | None] = {}
        if self.kind == "conda":
            marker = {"CONDA_PREFIX": str(self.prefix), "CONDA_DEFAULT_ENV": self.name}
        elif self.kind == "venv":
            marker = {"VIRTUAL_ENV": str(self.prefix)}
        pythonpath = [PROJECT_ROOT]
        if self.kind == "current":  # the driver's interpreter *and* its import path
            pythonpath += [Path(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        return child_environment(
            bin_dir=self.bin_dir,
            pythonpath=pythonpath,
            set_vars={**marker, **self.variables, **(extra or {})},
        )


def conda_search_dirs() -> list[Path]:
    """Directories that may hold named conda envs, most specific first."""
    dirs: list[Path] = [ENVS_ROOT]
    for var in ("CONDA_ENVS_PATH", "CONDA_ENVS_DIRS"):
        dirs += [Path(p) for p in os.environ.get(var, "").split(os.pathsep) if p]
    for var in ("MAMBA_ROOT_PREFIX", "CONDA_ROOT"):
        if os.environ.get(var):
            dirs.append(Path(os.environ[var]) / "envs")
    if os.environ.get("CONDA_EXE"):  # <root>/bin/conda or <root>/condabin/conda
        dirs.append(Path(os.environ["CONDA_EXE"]).resolve().parent.parent / "envs")
    home = Path.home()
    for root in ("miniforge3", "mambaforge", "miniconda3", "anaconda3", "micromamba", ".conda"):
        dirs.append(home / root / "envs")
    seen: set[Path] = set()
    return [d for d in dirs if not (d in seen or seen.add(d))]


def pipeline_command() -> str:
    """How to call this tool in printed advice: ``.venv/bin/python -m pipeline`` when the driver runs from the
    project's ``.venv`` (absolute when the current directory is elsewhere), else ``python -m pipeline``."""
    venv = PROJECT_ROOT / ".venv"
    try:
        in_venv = Path(sys.prefix).resolve() == venv.resolve()
    except OSError:  # pragma: no cover - an unreadable prefix
        in_venv = False
    if not in_venv:
        return "python -m pipeline"
    python = ".venv/bin/python" if Path.cwd().resolve() == PROJECT_ROOT else str(venv / "bin" / "python")
    return f"{python} -m pipeline"


def _create_hint(name: str) -> str:
    cmd = pipeline_command()
    return (f"create it with `{cmd} envs create {name}` (`{cmd} envs check` lists what each env still lacks), "
            f"or set envs.{name}.prefix to an existing env")


def resolve_env(config: PipelineConfig, name: str, *, must_exist: bool = True) -> Env:
    """Find env ``name`` as the config declares it; a missing env raises EnvNotFound saying where we looked."""
    cfg: EnvConfig = config.env_for(name)
    if cfg.kind == "current":
        return Env(name, "current", Path(sys.prefix), dict(cfg.variables), cfg.spec)
    if cfg.prefix is not None:
        candidates = [Path(cfg.prefix).expanduser()]
    elif cfg.kind == "venv":
        candidates = [ENVS_ROOT / name]
    else:
        env_name = cfg.name or name
        candidates = [d / env_name for d in conda_search_dirs()]
    candidates = [c if c.is_absolute() else (PROJECT_ROOT / c) for c in candidates]
    for prefix in candidates:
        env = Env(name, cfg.kind, prefix, dict(cfg.variables), cfg.spec)
        if env.exists():
            if must_exist and env.is_half_built():
                cmd = pipeline_command()
                raise EnvNotFound(
                    f"{cfg.kind} env '{name}' at {prefix} is half-built (`envs create` stopped before its last step)",
                    hint=f"finish it with `{cmd} envs create {name}` (it resumes at the step that failed); "
                    f"`{cmd} envs check {name}` shows its state",
                )
            return env
    env = Env(name, cfg.kind, candidates[0], dict(cfg.variables), cfg.spec)
    if must_exist:
        looked = ", ".join(str(c) for c in candidates[:4]) + (" …" if len(candidates) > 4 else "")
        raise EnvNotFound(f"{cfg.kind} env '{name}' not found (looked in {looked})", hint=_create_hint(name))
    return env
