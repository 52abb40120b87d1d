"""Command line: ``python -m pipeline run|segment|reconstruct|batch|envs|vlm``.

This module only parses arguments, builds requests and maps errors to exit codes
(0 ok, 1 stage failure, 2 usage/config/input error, 130 interrupted). Tracebacks only with ``--debug``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from pipeline.config import STAGE_NAMES, PipelineConfig, load_config
from pipeline.errors import EXIT_INTERRUPTED, EXIT_STAGE_FAILED, PipelineError, StageFailed, UsageError, output_error
from pipeline.driver.plan import check_stage_names

__all__ = ["main", "build_parser"]

Handler = Callable[[argparse.Namespace, PipelineConfig], int]


def _common_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--config", type=Path, metavar="FILE", help="YAML config merged over configs/default.yaml")
    parent.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override one config key, e.g. --set segment.threshold=0.3 (repeatable)")
    parent.add_argument("--debug", action="store_true", help="show tracebacks")
    return parent


def _add_rerun_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="append", default=[], metavar="STAGE", help=f"rerun STAGE even if up to date ({', '.join(STAGE_NAMES)}; repeatable)")
    parser.add_argument("--from", dest="from_stage", metavar="STAGE", help="rerun STAGE and every stage after it")
    parser.add_argument("--dry-run", action="store_true", help="print for each stage 'run' or 'skip' and why; change nothing")


def _add_export_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--export", metavar="LIST", help="more file formats per object and for the scene: obj, stl, usdz, "
                                                        "glb-textured (comma-separated; = --set reconstruct.exports=LIST)")


def _overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` values, then the shortcuts that stand for config keys (``--export``)."""
    extra = [f"reconstruct.exports={args.export}"] if getattr(args, "export", None) is not None else []
    return [*getattr(args, "overrides", []), *extra]


def _add_input_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", type=Path, required=True, help="input image (JPEG, PNG, …)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--query", help="natural-language query for the VLM agent, e.g. 'the two horses on the left'")
    group.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                       help="noun phrase(s) straight to the segmenter, no VLM (repeatable; commas split)")
    parser.add_argument("--out", type=Path, help="run directory (default: <run.out_root>/<image stem>-<hash>)")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (``--help`` works without any model env)."""
    common = _common_parent()
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="Image + text → SAM3 masks → SAM 3D Objects Gaussians, meshes and a composed scene.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from pipeline.driver.demo import add_demo_command

    add_demo_command(sub, common)

    run = sub.add_parser("run", parents=[common], help="segment then reconstruct (both stages)")
    _add_input_flags(run)
    _add_rerun_flags(run)
    _add_export_flag(run)
    run.set_defaults(handler=_cmd_run, stages=STAGE_NAMES)

    seg = sub.add_parser("segment", parents=[common], help="only the 2D stage (VLM agent or phrases → masks)")
    _add_input_flags(seg)
    _add_rerun_flags(seg)
    seg.set_defaults(handler=_cmd_run, stages=("segment",))

    rec = sub.add_parser("reconstruct", parents=[common], help="only the 3D stage, from a run dir or a masks folder")
    src = rec.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", type=Path, help="a run directory holding masks/manifest.json")
    src.add_argument("--masks", type=Path, help="a folder of mask PNGs (needs --image)")
    rec.add_argument("--image", type=Path, help="the image the masks were made from (with --masks)")
    rec.add_argument("--out", type=Path, help="run directory to create (with --masks)")
    _add_rerun_flags(rec)
    _add_export_flag(rec)
    rec.set_defaults(handler=_cmd_reconstruct, stages=("reconstruct",))

    _add_batch_command(sub, common)
    from pipeline.driver.exporting import add_export_command

    add_export_command(sub, common)

    envs = sub.add_parser("envs", help="create or check the stage envs")
    envs_sub = envs.add_subparsers(dest="envs_command", required=True, metavar="ACTION")
    create = envs_sub.add_parser(
        "create", parents=[common],
        help="build envs from envs/*.yml in resumable steps (conda/mamba/micromamba, else venv + pip)",
        description="Build each env in named steps (create, pip, then those of envs/steps/<name>.yml); a rerun "
        "resumes at the step that failed. --weights then fetches the gated SAM3 / SAM 3D Objects checkpoints.")
    create.add_argument("names", nargs="*", help="env names (default: all declared)")
    create.add_argument("--recreate", action="store_true", help="delete and rebuild existing envs (start over)")
    create.add_argument("--any-python", action="store_true",
                        help="build a venv with this Python when the spec's pinned pythonX.Y is not found (warns)")
    create.add_argument("--weights", action="store_true",
                        help="then fetch the gated checkpoints (facebook/sam3, facebook/sam-3d-objects) in the stage "
                        "envs; needs HF_TOKEN or `<env>/bin/hf auth login`")
    create.set_defaults(handler=_cmd_envs_create)
    check = envs_sub.add_parser("check", parents=[common],
                                help="doctor: per env its state, Python, packages, GPU, weights, and the fix commands")
    check.add_argument("names", nargs="*", help="env names (default: all declared)")
    check.set_defaults(handler=_cmd_envs_check)

    try:
        from pipeline.driver.vlm_commands import add_vlm_commands
    except ImportError:  # pragma: no cover - only while the vlm package is absent
        pass
    else:
        add_vlm_commands(sub, common)
    from pipeline.driver.web import add_serve_command

    add_serve_command(sub, common)
    return parser


# ---------------------------------------------------------------------------------------------- commands


def default_run_dir(config: PipelineConfig, image: Path, key: str) -> Path:
    """See :func:`pipeline.api.default_run_dir`."""
    from pipeline.api import default_run_dir as _default

    return _default(config, image, key)


def run_key(query: str | None, prompts: Sequence[str]) -> str:
    """See :func:`pipeline.api.run_key`."""
    from pipeline.api import run_key as _key

    return _key(query, prompts)


def _rerun_args(args: argparse.Namespace) -> tuple[frozenset[str], str | None]:
    check_stage_names(args.force, "--force")
    if args.from_stage:
        check_stage_names([args.from_stage], "--from")
    return frozenset(args.force), args.from_stage


def _cmd_run(args: argparse.Namespace, config: PipelineConfig) -> int:
    from pipeline.driver.runner import RunRequest, check_request_text, validate_request

    if args.query is None and not args.prompt:
        raise UsageError("give one of --query TEXT or --prompt TEXT", hint="e.g. --prompt horse, or --query 'the two horses on the left'")
    text = check_request_text(args.query, args.prompt, config.run.limits)
    force, from_stage = _rerun_args(args)
    run_dir = args.out or default_run_dir(config, args.image, run_key(text.query, text.prompts))
    req = RunRequest(run_dir=Path(run_dir), stages=args.stages, image=args.image, query=text.query,
                     prompts=text.prompts, force=force, from_stage=from_stage, dry_run=args.dry_run, notes=text.notes)
    validate_request(req, config.run.limits)
    if args.dry_run:  # a real run says its notes when it opens
        for note in text.notes:
            print(f"note: {note}", file=sys.stderr)
    return _execute(req, config)


def _cmd_reconstruct(args: argparse.Namespace, config: PipelineConfig) -> int:
    from pipeline.driver.runner import RunRequest

    force, from_stage = _rerun_args(args)
    if args.masks is not None:
        if args.image is None:
            raise UsageError("--masks needs --image (the image the masks were made from)")
        run_dir = args.out or default_run_dir(config, args.image, f"masks:{Path(args.masks).resolve()}")
        req = RunRequest(run_dir=Path(run_dir), stages=("reconstruct",), image=args.image, masks_dir=args.masks,
                         force=force | {"reconstruct"} if args.out is None else force, from_stage=from_stage, dry_run=args.dry_run)
    else:
        if args.image is not None or args.out is not None:
            raise UsageError("--image and --out go with --masks, not with --run")
        if not args.run.is_dir():
            raise UsageError(f"run directory not found: {args.run}", hint="pass a directory made by `python -m pipeline segment` or `run`")
        req = RunRequest(run_dir=args.run, stages=("reconstruct",), force=force, from_stage=from_stage, dry_run=args.dry_run)
    return _execute(req, config)


def _execute(req, config: PipelineConfig) -> int:  # noqa: ANN001 - RunRequest, imported lazily
    from pipeline.driver.console import run_with_progress

    return run_with_progress(req, config)


def _add_batch_command(sub: Any, common: argparse.ArgumentParser) -> None:
    batch = sub.add_parser("batch", parents=[common], help="many images through warm workers, one run directory each")
    src = batch.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", nargs="+", metavar="DIR|GLOB|FILE",
                     help="image folders, globs ('photos/*.jpg') or files; a file named twice runs once")
    src.add_argument("--list", type=Path, metavar="FILE", dest="list_file",
                     help="JSONL or CSV: per line image, query or prompt, optional out and options (see README)")
    batch.add_argument("--recursive", action="store_true",
                       help="with --images: also the images in subfolders (and '**' in globs); symlinked folders are not followed")
    group = batch.add_mutually_exclusive_group()
    group.add_argument("--query", help="the query for every image (lines of --list may carry their own)")
    group.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="phrase(s) for every image (repeatable; commas split)")
    batch.add_argument("--out", type=Path, required=True, metavar="ROOT", help="batch root: one run directory per image under it")
    batch.add_argument("--stages", default=",".join(STAGE_NAMES), help=f"comma-separated stages to run (default: {','.join(STAGE_NAMES)})")
    batch.add_argument("--summary", type=Path, metavar="FILE", help="where to write the summary (default: ROOT/batch.json)")
    batch.add_argument("--executor", choices=("local", "slurm"), default="local",
                       help="local: this machine (default); slurm: shards as array jobs (options: --set slurm.*)")
    batch.add_argument("--slurm-task", action="store_true", help=argparse.SUPPRESS)  # a shard inside a SLURM task
    _add_rerun_flags(batch)
    _add_export_flag(batch)
    batch.set_defaults(handler=_cmd_batch)
    status = sub.add_parser("batch-status", parents=[common], help="state of a SLURM batch per shard and image; --resume")
    status.add_argument("root", type=Path, metavar="ROOT", help="the batch root given to `batch --out`")
    status.add_argument("--resume", action="store_true", help="resubmit the images that failed or never finished (with --set KEY=VALUE to change settings)")
    status.add_argument("--dry-run", action="store_true", help="with --resume: print what would be submitted")
    status.set_defaults(handler=_cmd_batch_status)


def _cmd_batch(args: argparse.Namespace, config: PipelineConfig) -> int:
    from pipeline.driver.batch import SUMMARY_NAME, read_items, run_batch

    force, from_stage = _rerun_args(args)
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    check_stage_names(stages, "--stages")
    if args.recursive and not args.images:
        raise UsageError("--recursive goes with --images DIR", hint="list the images of subfolders in the --list file")
    items = read_items(images=args.images or (), list_file=args.list_file, query=args.query, prompts=args.prompt,
                       out_root=args.out, recursive=args.recursive, limits=config.run.limits)
    summary = args.summary or args.out / SUMMARY_NAME
    ordered = tuple(s for s in STAGE_NAMES if s in stages)
    if args.executor == "slurm":
        from pipeline.driver.slurm import submit_batch

        return submit_batch(config, items, root=args.out, stages=ordered, force=force, from_stage=from_stage,
                            dry_run=args.dry_run)
    code = run_batch(config, items, stages=ordered, force=force, from_stage=from_stage, summary_path=summary,
                     dry_run=args.dry_run)
    if args.slurm_task and not args.dry_run:
        from pipeline.driver.slurm import task_exit_code

        statuses = [i["status"] for i in json.loads(summary.read_text())["items"]] if summary.exists() else []
        return task_exit_code(statuses, code)
    return code


def _cmd_batch_status(args: argparse.Namespace, config: PipelineConfig) -> int:
    from pipeline.driver.slurm import batch_status

    if args.config is not None:
        raise UsageError("batch-status reads each submission's own config; --config does not apply",
                         hint="to change settings for --resume, use --set KEY=VALUE (e.g. --set slurm.reconstruct.mem=96G)")
    if args.overrides and not args.resume:
        raise UsageError("--set only applies with --resume", hint="add --resume to resubmit with changed settings")
    return batch_status(args.root, resume=args.resume, overrides=args.overrides, dry_run=args.dry_run)


def _cmd_envs_create(args: argparse.Namespace, config: PipelineConfig) -> int:
    from pipeline.driver.envbuild import create_envs

    return create_envs(config, args.names, recreate=args.recreate, any_python=args.any_python, weights=args.weights)


def _cmd_envs_check(args: argparse.Namespace, config: PipelineConfig) -> int:
    from pipeline.driver.envdoctor import check_envs

    return check_envs(config, args.names)


# ---------------------------------------------------------------------------------------------- main


def _report(exc: PipelineError, *, debug: bool = False) -> None:
    """The error as one line (plus its hint and, for a stage, its log's path). A stage's traceback stays in its
    log; ``--debug`` prints the log's last lines too. A worker that died without a message gets its log's last
    line, which usually names the cause (``Killed``, a segfault, an import error)."""
    err = sys.stderr
    print(f"error: {exc.message}", file=err)
    if isinstance(exc, StageFailed):
        lines = [line for line in exc.tail.splitlines() if line.strip()]
        if debug and lines:
            print("  last lines of the log:", file=err)
            for line in lines:
                print(f"    {line}", file=err)
        elif exc.returncode is not None and lines:
            print(f"  last log line: {lines[-1].strip()}", file=err)
        if exc.log_path:
            print(f"  full log: {exc.log_path}" + ("" if debug else " (--debug prints its last lines)"), file=err)
    if exc.hint:
        print(f"hint: {exc.hint}", file=err)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, run the command, map errors to exit codes."""
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    try:
        config = load_config(getattr(args, "config", None), _overrides(args))
        return int(args.handler(args, config))
    except PipelineError as exc:
        _report(exc, debug=debug)
        if debug:
            raise
        return exc.exit_code
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted: every process this run started was stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # stdout closed early (`... | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        if debug:
            raise
        return _report_unexpected(exc)


def _report_unexpected(exc: Exception) -> int:
    """An error no code path turned into a :class:`PipelineError`: a write failure the user can fix is reported
    as one; anything else as one line naming it as a bug of the tool."""
    known = output_error(exc) if isinstance(exc, OSError) else None
    if known is not None:
        _report(known, debug=False)
        return known.exit_code
    print(f"error: internal error: {type(exc).__name__}: {str(exc)[:300]}", file=sys.stderr)
    print("hint: rerun with --debug for the traceback, and report it with that output", file=sys.stderr)
    return EXIT_STAGE_FAILED
