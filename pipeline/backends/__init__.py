"""Backend registry: a built-in name or ``package.module:Class`` → the backend class.

Resolving a name imports the backend's module, which may import heavy libraries: call it only inside the
stage worker. :func:`backend_source` finds the source file without importing it (for fingerprints).
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from pipeline.errors import ConfigError

__all__ = ["BUILTIN_BACKENDS", "resolve_backend", "backend_source", "load_backend_class"]

BUILTIN_BACKENDS: dict[str, dict[str, str]] = {
    "segment": {"sam3": "pipeline.backends.sam3:Sam3Segmenter", "demo": "pipeline.backends.demo:DemoSalientSegmenter"},
    "reconstruct": {"sam3d": "pipeline.backends.sam3d:Sam3dReconstructor", "demo": "pipeline.backends.demo:DemoReliefReconstructor"},
}


def resolve_backend(stage: str, name: str) -> str:
    """The ``module:Class`` import path for a backend name of ``stage``."""
    if ":" in name:
        return name
    try:
        return BUILTIN_BACKENDS[stage][name]
    except KeyError:
        known = ", ".join(sorted(BUILTIN_BACKENDS.get(stage, {})))
        raise ConfigError(
            f"unknown {stage} backend {name!r} (built-in: {known})",
            hint="use a built-in name or an import path such as 'mypkg.module:MyBackend'",
        ) from None


def backend_source(stage: str, name: str) -> Path | None:
    """The source file of a backend's module, found without importing the module itself."""
    module = resolve_backend(stage, name).partition(":")[0]
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec is not None and spec.origin else None


def load_backend_class(stage: str, name: str) -> type:
    """Import and return the backend class; a bad path is a ConfigError naming it."""
    target = resolve_backend(stage, name)
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"{stage} backend {target!r}: module {exc.name!r} cannot be imported in this env",
            hint=f"install it into the {stage} env, or fix {stage}.backend",
        ) from None
    try:
        return getattr(module, class_name)
    except AttributeError:
        raise ConfigError(f"{stage} backend {target!r}: {module_name} has no {class_name!r}") from None
