"""Checks made before a run writes anything: is a stage's backend module there, can query mode reach a VLM.

Nothing is imported or started: a plug-in backend is looked for on the file system of its stage's env, and the
VLM check only probes a server that may already answer.
"""

from __future__ import annotations

import importlib.machinery
import sys
from pathlib import Path
from typing import Sequence

from pipeline.backends import BUILTIN_BACKENDS
from pipeline.config import PROJECT_ROOT, PipelineConfig, preview
from pipeline.driver.envs import Env, resolve_env
from pipeline.errors import ConfigError, EnvNotFound

__all__ = ["check_backend", "check_vlm"]


def _module_file(module: str, roots: Sequence[Path]) -> Path | None:
    """The file that would define ``module`` under one of ``roots`` (source, package or extension), found by
    looking at the file system only: nothing is imported, not even the module's parent packages."""
    parts = module.split(".")
    for root in roots:
        base = root.joinpath(*parts)
        for candidate in (base.parent / f"{parts[-1]}.py", base / "__init__.py",
                          *(base.parent / f"{parts[-1]}{ext}" for ext in importlib.machinery.EXTENSION_SUFFIXES)):
            try:
                if candidate.is_file():
                    return candidate
            except OSError:  # a name too long for the file system cannot be a module either
                continue
    return None


def _import_roots(env: Env) -> list[Path] | None:
    """Where the stage worker of ``env`` imports from (the project root first), or None when that cannot be
    told without running the env's interpreter (no site-packages where expected, or the import hooks of editable
    installs, ``__editable__*.pth``; other ``import`` lines of .pth files add no folder and are skipped)."""
    roots = [PROJECT_ROOT]
    if env.kind == "current":
        return roots + [Path(p or ".") for p in sys.path]
    site = sorted(env.prefix.glob("lib/python*/site-packages"))
    if not site:
        return None
    for folder in site:
        roots.append(folder)
        for pth in sorted(folder.glob("*.pth")):
            try:
                lines = pth.read_text(encoding="utf-8", errors="replace").splitlines()
            except OSError:
                continue
            for line in lines:
                if line.startswith(("import ", "import\t")):
                    if pth.name.startswith("__editable__") or "__editable__" in line:
                        return None
                    continue
                if line.strip() and not line.startswith("#"):
                    path = Path(line.strip())
                    roots.append(path if path.is_absolute() else folder / path)
    return roots


def check_backend(config: PipelineConfig, stage: str, env: Env) -> None:
    """ConfigError when a ``package.module:Class`` backend's module cannot be found in the project or on the import
    path of the stage's env (built-in names always pass). Nothing is imported: the module may need the env."""
    backend = config.stage(stage).backend
    if backend in BUILTIN_BACKENDS[stage]:
        return
    module = backend.partition(":")[0]
    roots = _import_roots(env)
    if roots is None or _module_file(module, roots) is not None:
        return
    raise ConfigError(
        f"{stage} backend {preview(backend)!r}: no module {preview(module)!r} in {PROJECT_ROOT} or on the import path "
        f"of env '{env.name}'",
        hint=f"install it into the {env.name} env, or fix {stage}.backend (a built-in name or package.module:Class)",
    )


def check_vlm(config: PipelineConfig) -> None:
    """EnvNotFound when query mode would have to start ``vllm serve`` and cannot: no vllm env (or no ``vllm`` in it)
    and no server already answering at ``vlm.host:vlm.port``."""
    try:
        env = resolve_env(config, config.vlm.env)
    except EnvNotFound as exc:
        missing = exc
    else:
        if (env.bin_dir / "vllm").exists():
            return
        missing = EnvNotFound(
            f"env '{config.vlm.env}' at {env.prefix} has no vllm executable",
            hint=f"create it with `python -m pipeline envs create {config.vlm.env}`, or set vlm.url to an external server")
    from pipeline.driver.vlm_server import probe, root_url

    found = probe(root_url(config), key=config.vlm.api_key())
    if found.healthy and found.serves(config.vlm.served_name):
        return  # a server started earlier (`vlm serve --detach`) is reused; the env is not needed
    raise EnvNotFound(f"query mode needs the VLM: {missing.message}",
                      hint=missing.hint or "set vlm.url to an external server, or use --prompt")
