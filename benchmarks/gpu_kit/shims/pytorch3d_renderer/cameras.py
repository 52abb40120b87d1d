"""Shim of ``pytorch3d.renderer.cameras`` (placeholders only; see ../README.md)."""

from . import __getattr__  # noqa: F401  - every name is a placeholder class that raises on use
