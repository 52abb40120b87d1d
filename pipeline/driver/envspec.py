"""Env specs: an env's conda environment file and the extra build steps declared beside it.

``envs/<name>.yml`` is a plain conda environment file (``conda env create -f`` accepts it as is) whose Python
dependencies sit under ``pip:``, so the same file also serves a venv. What such a file cannot say — pip
installs that must run *after* its packages, with ``--no-build-isolation`` or ``--no-deps`` — is declared in
a sidecar, ``envs/steps/<name>.yml`` (a folder of its own, so every ``envs/*.yml`` stays an environment
file)::

    steps:
      - name: compiled
        about: pytorch3d, gsplat and flash-attn, built against the installed torch
        pip: [--no-build-isolation, "pytorch3d @ git+https://…", flash-attn==2.8.3]
        conda_variables: {CUDA_HOME: "{prefix}"}   # set only when the env is a conda env

Each step is ``<prefix>/bin/python -m pip install <pip…>``; ``{prefix}`` in a value is the env's prefix. The
spec's hash (:attr:`EnvSpec.sha256`) covers both files, so editing either makes a built env *stale*.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from pipeline.atomic import sha256_bytes, sha256_file
from pipeline.errors import ConfigError

__all__ = ["STEPS_DIR_NAME", "BUILTIN_STEPS", "ExtraStep", "EnvSpec", "read_spec", "requirement_name", "steps_path_for"]

STEPS_DIR_NAME = "steps"
BUILTIN_STEPS = ("create", "pip")
_STEP_KEYS = {"name", "about", "pip", "conda_variables"}
_PYTHON_PIN = re.compile(r"^python\s*==?\s*(\d+)\.(\d+)")
_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


@dataclass(frozen=True)
class ExtraStep:
    """A declared build step: ``pip install`` arguments, and variables set for it in a conda env."""

    name: str
    pip: tuple[str, ...]
    conda_variables: Mapping[str, str] = field(default_factory=dict)
    about: str = ""


@dataclass(frozen=True)
class EnvSpec:
    """A parsed env file: conda-only entries, pip arguments, the pinned Python, extra steps and the hash.

    ``python`` is ``"X.Y"`` when the file pins ``python=X.Y`` (or ``X.Y.Z``, ``X.Y.*``), else None.
    ``conda_file`` holds the file's own dependencies minus the ``pip:`` list (what the conda tool installs).
    """

    path: Path
    conda: tuple[str, ...]
    pip: tuple[str, ...]
    python: str | None
    sha256: str
    steps: tuple[ExtraStep, ...] = ()
    steps_path: Path | None = None
    conda_file: Mapping[str, Any] = field(default_factory=dict)

    @property
    def python_version(self) -> tuple[int, int] | None:
        """The pinned Python as ``(major, minor)``."""
        if self.python is None:
            return None
        major, minor = self.python.split(".")[:2]
        return int(major), int(minor)

    def requirement_for(self, package: str) -> str | None:
        """The pip requirement (spec or extra step) that installs ``package``, e.g. ``torch==2.13.0``."""
        wanted = _normalise(package)
        for item in (*self.pip, *(a for s in self.steps for a in s.pip)):
            if not item.startswith("-") and requirement_name(item) == wanted:
                return item
        return None


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(item: str) -> str | None:
    """The normalised project name of a pip requirement (``MoGe @ git+…`` → ``moge``); None for options."""
    if item.startswith("-"):
        return None
    match = _REQUIREMENT.match(item)
    return _normalise(match.group(1)) if match else None


def steps_path_for(spec_path: Path) -> Path:
    """Where the extra steps of ``spec_path`` are declared: ``<its folder>/steps/<its name>``."""
    return spec_path.parent / STEPS_DIR_NAME / spec_path.name


def _read_steps(path: Path) -> tuple[ExtraStep, ...]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"env steps file {path} is not valid YAML: {exc}".splitlines()[0]) from None
    raw = data.get("steps") if isinstance(data, dict) else None
    if not isinstance(raw, list) or set(data) != {"steps"}:
        raise ConfigError(f"env steps file {path} must hold exactly one key, 'steps': a list of steps")
    steps: list[ExtraStep] = []
    for i, item in enumerate(raw, 1):
        where = f"{path}, step {i}"
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ConfigError(f"{where}: each step is a mapping with a 'name'")
        unknown = set(item) - _STEP_KEYS
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(_STEP_KEYS))})")
        name = item["name"]
        if name in BUILTIN_STEPS or name in {s.name for s in steps} or not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise ConfigError(f"{where}: step name {name!r} is reserved, repeated or not a plain word")
        pip = item.get("pip")
        if not isinstance(pip, list) or not pip or not all(isinstance(a, str) for a in pip):
            raise ConfigError(f"{where} ({name}): 'pip' must be a non-empty list of pip install arguments")
        variables = item.get("conda_variables") or {}
        if not isinstance(variables, dict) or not all(isinstance(v, str) for v in variables.values()):
            raise ConfigError(f"{where} ({name}): 'conda_variables' must map names to strings")
        steps.append(ExtraStep(name, tuple(pip), {str(k): v for k, v in variables.items()}, str(item.get("about", ""))))
    return tuple(steps)


def read_spec(path: Path) -> EnvSpec:
    """Parse a conda environment file and its steps sidecar; a missing or malformed one is a ConfigError."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"env spec not found: {path}", hint="set envs.<name>.spec to a file under envs/")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    deps = data.get("dependencies") if isinstance(data, dict) else None
    if not isinstance(deps, list):
        raise ConfigError(f"env spec {path} has no 'dependencies' list")
    conda: list[str] = []
    pip: list[str] = []
    python = None
    for dep in deps:
        if isinstance(dep, dict) and "pip" in dep:
            for item in dep["pip"]:
                text = str(item)
                pip.extend(text.split()) if text.startswith("-") else pip.append(text)
        elif isinstance(dep, str):
            pin = _PYTHON_PIN.match(dep.strip())
            if pin:
                python = f"{pin.group(1)}.{pin.group(2)}"
            elif re.split(r"[\s<>=!~]", dep.strip(), maxsplit=1)[0] not in ("python", "pip"):
                conda.append(dep)
    conda_file = {k: v for k, v in data.items() if k != "dependencies"}
    conda_file["dependencies"] = [d for d in deps if not (isinstance(d, dict) and "pip" in d)]
    sidecar = steps_path_for(path)
    steps = _read_steps(sidecar) if sidecar.is_file() else ()
    digest = sha256_file(path)
    if steps:  # a spec without a sidecar keeps the plain file hash, so its existing stamps stay valid
        digest = sha256_bytes(f"{digest}\n{sha256_file(sidecar)}\n".encode())
    return EnvSpec(path, tuple(conda), tuple(pip), python, digest, steps, sidecar if steps else None, conda_file)
