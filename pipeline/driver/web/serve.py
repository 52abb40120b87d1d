"""``python -m pipeline serve``: the web app and REST API on one warm engine (uvicorn).

``--demo`` swaps both stages to the built-in demo backends (salient regions → coloured reliefs, see
pipeline/backends/demo.py) in the driver's own interpreter, so the page can be tried on a laptop without a
GPU, envs or weights; the page then says "demo backends, not the real models" wherever results show.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any, Callable

from pipeline.config import PipelineConfig

__all__ = ["DEMO_OVERRIDES", "add_serve_command", "cmd_serve", "engine_factory", "build_settings"]

#: Config overrides of ``serve --demo``: one env of kind ``current``, the demo backends in both stages.
DEMO_OVERRIDES: tuple[str, ...] = (
    "envs.demo.kind=current",
    "segment.env=demo",
    "segment.backend=demo",
    "reconstruct.env=demo",
    "reconstruct.backend=demo",
)
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


def add_serve_command(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``serve`` subcommand to the CLI's subparsers."""
    serve = sub.add_parser("serve", parents=[common], help="web page + REST API on warm workers (FastAPI, uvicorn)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; any other needs a token)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--demo", action="store_true", help="demo backends (salient regions → coloured reliefs) on CPU: no GPU, envs or weights")
    serve.add_argument("--token", help="API bearer token (prefer $PIPELINE_WEB_TOKEN: a flag is visible in `ps`)")
    serve.add_argument("--jobs-dir", type=Path, help="where job run directories live (default <run.out_root>/web)")
    serve.add_argument("--max-upload-mb", type=float, default=50.0, help="largest accepted upload in MB (default 50)")
    serve.add_argument("--max-pixels", type=int, default=None,
                       help="largest accepted image in pixels (default: run.max_pixels, 40M; sets it for the jobs too)")
    serve.add_argument("--max-queue", type=int, default=16, help="jobs queued or running before 429 (default 16)")
    serve.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                       help="allow cross-origin calls from ORIGIN (repeatable; default: none)")
    serve.set_defaults(handler=cmd_serve)


def engine_factory(config: PipelineConfig, on_event: Callable[[Any], None]) -> Any:
    """The real engine (imported lazily: its module is on the driver side but not needed for --help)."""
    from pipeline.driver.engine import Engine

    return Engine(config, on_event=on_event)


def build_settings(args: argparse.Namespace, config: PipelineConfig) -> Any:
    """WebSettings from the parsed flags; a UsageError for a non-loopback bind without a token."""
    from pipeline.errors import UsageError

    from .app import WebSettings
    from .security import TOKEN_ENV, is_loopback, resolve_token

    if args.max_upload_mb <= 0 or (args.max_pixels is not None and args.max_pixels <= 0) or args.max_queue <= 0:
        raise UsageError("--max-upload-mb, --max-pixels and --max-queue must be positive")
    token = resolve_token(args.host, args.token)
    os.environ.pop(TOKEN_ENV, None)  # stage workers inherit the environment: keep the token out of it
    loopback = is_loopback(args.host)
    return WebSettings(
        jobs_root=Path(args.jobs_dir) if args.jobs_dir else Path(config.run.out_root) / "web",
        token=token,
        demo=args.demo,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_pixels=config.run.max_pixels,
        max_queue=args.max_queue,
        cors_origins=tuple(args.cors_origin),
        trusted_hosts=(*_LOOPBACK_HOSTS, args.host) if loopback else (),
    )


def cmd_serve(args: argparse.Namespace, config: PipelineConfig) -> int:
    """Run the server until Ctrl-C or SIGTERM; the engine (workers, vLLM) stops with it."""
    import uvicorn

    from pipeline.config import apply_overrides, load_config

    from .app import create_app

    if args.demo:
        config = load_config(getattr(args, "config", None), [*getattr(args, "overrides", []), *DEMO_OVERRIDES])
    if args.max_pixels is not None:  # one limit for the upload check and the jobs' own check
        config = apply_overrides(config, [f"run.max_pixels={args.max_pixels}"], origin="--max-pixels")
    settings = build_settings(args, config)
    app = create_app(config, settings, engine_factory)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    log = logging.getLogger("pipeline.web")
    log.info("jobs in %s%s; %s", settings.jobs_root, " (demo backends, not the real models)" if args.demo else "",
             "API token required" if settings.token else "no API token (loopback only)")
    from .app import STATIC_DIR

    if not (STATIC_DIR / "vendor" / "versions.json").exists():
        log.warning("the page's 3D libraries are not built: run `npm ci --prefix web && npm run --prefix web build` "
                    "(the REST API works without them)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)
    return 0
