"""``python -m pipeline envs create|check``: build stage envs from their specs and report their health.

Specs are conda environment files under ``envs/`` (``vllm.yml``, ``sam3.yml``, ``sam3d-objects.yml``) whose
Python dependencies sit under ``pip:``, so the same file also serves a plain venv. ``create`` uses
micromamba, mamba or conda when one is on PATH (for ``kind: conda``), else ``python -m venv`` + pip (the
conda-only entries, such as a CUDA toolkit, are then listed as skipped). A finished env carries a stamp
(``<prefix>/.pipeline-env.json``) with the sha256 of its spec; a changed spec makes it *stale*.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

from pipeline.atomic import sha256_file, write_json_atomic
from pipeline.config import PROJECT_ROOT, PipelineConfig
from pipeline.driver.envs import ENVS_ROOT, Env, resolve_env
from pipeline.errors import ConfigError, EnvCreateFailed
from pipeline.handoff import now_iso
from pipeline.driver.proc import capture_output, child_environment, run_command, tail_lines

__all__ = ["EnvSpec", "read_spec", "create_envs", "check_envs", "stamp_state"]

SPECS_DIR = PROJECT_ROOT / "envs"
CONDA_TOOLS = ("micromamba", "mamba", "conda")
# Packages whose versions `envs check` reports, per env name.
KEY_PACKAGES: dict[str, tuple[str, ...]] = {
    "vllm": ("vllm", "torch", "transformers", "openai"),
    "sam3": ("sam3", "torch", "torchvision", "open_clip_torch", "openai", "pydantic"),
    "sam3d-objects": ("sam3d_objects", "torch", "pytorch3d", "gsplat", "spconv-cu121", "plyfile", "trimesh", "pydantic"),
}
PROBE = r"""
import json, sys, importlib.metadata as md
out = {"python": sys.version.split()[0], "packages": {}, "gpu": None}
for name in sys.argv[1:]:
    try: out["packages"][name] = md.version(name)
    except md.PackageNotFoundError: out["packages"][name] = None
try:
    import torch
    out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible"
except Exception as exc:
    out["gpu"] = f"torch unavailable ({type(exc).__name__})"
print(json.dumps(out))
"""


@dataclass(frozen=True)
class EnvSpec:
    """A parsed env file: conda-only entries, pip arguments, the Python it asks for, and its hash."""

    path: Path
    conda: tuple[str, ...]
    pip: tuple[str, ...]
    python: str | None
    sha256: str


def read_spec(path: Path) -> EnvSpec:
    """Parse a conda environment file; a missing or malformed one is a ConfigError."""
    if not path.exists():
        raise ConfigError(f"env spec not found: {path}", hint="set envs.<name>.spec to a file under envs/")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    deps = data.get("dependencies")
    if not isinstance(deps, list):
        raise ConfigError(f"env spec {path} has no 'dependencies' list")
    conda: list[str] = []
    pip: list[str] = []
    python = None
    for dep in deps:
        if isinstance(dep, dict) and "pip" in dep:
            for item in dep["pip"]:
                pip.extend(str(item).split()) if str(item).startswith("-") else pip.append(str(item))
        elif isinstance(dep, str):
            if dep.split("=")[0].strip() == "python":
                python = dep.partition("=")[2].lstrip("=") or None
            elif dep.strip() != "pip":
                conda.append(dep)
    return EnvSpec(path, tuple(conda), tuple(pip), python, sha256_file(path))


def stamp_state(env: Env, spec: EnvSpec | None) -> str:
    """``up to date``, ``stale (spec changed)``, ``no stamp`` (not built by us) or ``missing``."""
    if not env.exists():
        return "missing"
    if not env.stamp.exists():
        return "no stamp"
    try:
        recorded = json.loads(env.stamp.read_text()).get("spec_sha256")
    except (OSError, json.JSONDecodeError):
        return "no stamp"
    if spec is not None and recorded != spec.sha256:
        return "stale (spec changed)"
    return "up to date"


def _spec_for(config: PipelineConfig, name: str) -> EnvSpec:
    cfg = config.env_for(name)
    return read_spec(SPECS_DIR / (cfg.spec or f"{name}.yml"))


def _conda_tool() -> str | None:
    return next((shutil.which(t) for t in CONDA_TOOLS if shutil.which(t)), None)


def _creation_argvs(env: Env, spec: EnvSpec, tool: str | None) -> list[list[str]]:
    if env.kind == "conda" and tool is not None:
        if Path(tool).name == "micromamba":
            return [[tool, "create", "--yes", "--quiet", "--prefix", str(env.prefix), "--file", str(spec.path)]]
        return [[tool, "env", "create", "--quiet", "--prefix", str(env.prefix), "--file", str(spec.path)]]
    argvs = [[sys.executable, "-m", "venv", str(env.prefix)]]
    if spec.pip:
        argvs.append([str(env.prefix / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", *spec.pip])
    return argvs


def _create_one(config: PipelineConfig, name: str, *, recreate: bool, say: Any) -> None:
    cfg = config.env_for(name)
    if cfg.kind == "current":
        say(f"{name}: uses the current interpreter ({sys.executable}); nothing to create")
        return
    spec = _spec_for(config, name)
    env = resolve_env(config, name, must_exist=False)
    if cfg.prefix is None and not env.exists():
        env = Env(name, cfg.kind, ENVS_ROOT / (cfg.name or name), dict(cfg.variables), cfg.spec)
    state = stamp_state(env, spec)
    if state == "up to date" and not recreate:
        say(f"{name}: up to date at {env.prefix}")
        return
    if state == "no stamp" and not recreate:
        say(f"{name}: exists at {env.prefix} (not built by this tool); left as is — pass --recreate to rebuild")
        return
    if env.prefix.exists():
        shutil.rmtree(env.prefix)
    tool = _conda_tool() if cfg.kind == "conda" else None
    if cfg.kind == "conda" and tool is None:
        say(f"{name}: no conda/mamba/micromamba on PATH; building a venv with pip instead")
        if spec.conda:
            say(f"{name}: skipped conda-only entries (install them on the system): {', '.join(spec.conda)}")
        if spec.python and not sys.version.startswith(spec.python.rstrip(".*")):
            say(f"{name}: the spec asks for Python {spec.python}; this venv uses {sys.version.split()[0]}")
    log = ENVS_ROOT / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    say(f"{name}: creating at {env.prefix} (log: {log})")
    for argv in _creation_argvs(env, spec, tool):
        result = run_command(argv, env=child_environment(), log_path=log)
        if result.returncode != 0:
            shutil.rmtree(env.prefix, ignore_errors=True)
            raise EnvCreateFailed(
                f"creating env '{name}' failed (exit {result.returncode}) at: {' '.join(argv[:4])} …\n"
                f"{tail_lines(log, 15)}",
                hint=f"read {log}; fix the spec {spec.path} or your network/proxy settings, then rerun",
            )
    write_json_atomic(env.stamp, {"spec": str(spec.path), "spec_sha256": spec.sha256, "tool": tool or "venv", "created": now_iso()})
    say(f"{name}: created")


def create_envs(config: PipelineConfig, names: Sequence[str], *, recreate: bool = False) -> int:
    """Create the named envs (default: all declared). Returns 0, or raises EnvCreateFailed."""
    for name in names or sorted(config.envs):
        _create_one(config, name, recreate=recreate, say=print)
    return 0


def _weights_row(config: PipelineConfig, name: str) -> tuple[bool, str]:
    import os

    token = bool(os.environ.get("HF_TOKEN") or (Path.home() / ".cache" / "huggingface" / "token").exists())
    if name == "sam3d-objects":
        ckpt = Path(config.reconstruct.sam3d.checkpoint_dir)
        ok = (ckpt / "pipeline.yaml").exists()
        return ok, f"{ckpt}/pipeline.yaml " + ("found" if ok else "missing — download facebook/sam-3d-objects (gated) there")
    if name == "sam3":
        ckpt = config.segment.sam3.checkpoint
        if Path(ckpt).suffix == ".pt":
            ok = Path(ckpt).exists()
            return ok, f"{ckpt} " + ("found" if ok else "missing")
        return token, f"{ckpt} from the hub: " + ("HF token present" if token else "no HF token — accept the licence on the hub, then `hf auth login` or set HF_TOKEN")
    if name == "vllm":
        model = config.vlm.model
        if Path(model).exists():
            return True, f"{model} found locally"
        return True, f"{model} from the hub (public); pre-download it for offline nodes"
    return True, "-"


def check_envs(config: PipelineConfig, names: Sequence[str]) -> int:
    """Print one table row per env; returns 1 if any env is missing or broken, else 0."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="stage envs")
    for col in ("env", "found", "python", "packages", "gpu", "weights/auth", "fix"):
        table.add_column(col, overflow="fold")
    bad = False
    for name in names or sorted(config.envs):
        env = resolve_env(config, name, must_exist=False)
        try:
            spec = _spec_for(config, name)
        except ConfigError:
            spec = None
        state = stamp_state(env, spec)
        weights_ok, weights = _weights_row(config, name)
        if not env.exists():
            bad = True
            table.add_row(name, f"no ({env.prefix})", "-", "-", "-", weights, f"python -m pipeline envs create {name}")
            continue
        rc, out = capture_output([str(env.python), "-c", PROBE, *KEY_PACKAGES.get(name, ())], env=env.child_env())
        info = json.loads(out) if rc == 0 and out.strip() else {"python": "?", "packages": {}, "gpu": "probe failed"}
        pkgs = ", ".join(f"{k} {v or 'MISSING'}" for k, v in info["packages"].items())
        missing = [k for k, v in info["packages"].items() if v is None]
        fixes = []
        if state.startswith("stale"):
            fixes.append(f"python -m pipeline envs create --recreate {name}")
        if missing:
            fixes.append(f"install {', '.join(missing)} into {env.prefix}")
        if not weights_ok:
            fixes.append("see weights/auth")
        bad = bad or rc != 0 or bool(missing) or state.startswith("stale")
        table.add_row(name, f"yes ({env.prefix}; {state})", info["python"], pkgs or "-", str(info["gpu"]), weights, "; ".join(fixes) or "ok")
    Console().print(table)
    return 1 if bad else 0
