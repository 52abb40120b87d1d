"""The web app and REST API (``python -m pipeline serve``): FastAPI over one warm engine, plus the web page.

Modules: ``app`` (routes, job submission), ``jobs`` (the job store over run directories), ``views`` (JSON of
a job), ``uploads`` (image checks), ``security`` (token, body limit), ``compat`` (``/api/generate_3d``),
``health`` (GPU memory), ``serve`` (the CLI command). Static files of the page are in ``static/``; the 3D
libraries are copied into ``static/vendor/`` by ``npm ci --prefix web && npm run --prefix web build``.
FastAPI, uvicorn and python-multipart are in requirements.txt and are imported only by this package.
"""

from __future__ import annotations

__all__ = ["add_serve_command"]


def add_serve_command(sub, common) -> None:  # noqa: ANN001 - argparse internals
    """Add ``serve`` to the CLI without importing FastAPI (``--help`` works with the light driver deps)."""
    from .serve import add_serve_command as _add

    _add(sub, common)
