"""``python -m pipeline vlm serve|status|stop``: keep one vLLM server up across many runs.

- ``serve`` starts ``vllm serve`` (same argv and readiness rules as a run) and keeps it up in the foreground
  until Ctrl-C or SIGTERM; ``--detach`` returns once it is ready and leaves it running; ``--dry-run`` prints
  the command, its extra environment and the GPU memory budget, and starts nothing.
- ``status`` says what answers at the configured URL and whether ``serve`` started it.
- ``stop`` SIGTERMs the process group recorded by ``serve`` (SIGKILL after a grace period).

``serve`` records ``{pid, pgid, url, …}`` in ``<run.out_root>/.vlm-server.json`` (its log is
``<run.out_root>/.vlm-server.log``). Runs need no flag to use the server: :func:`pipeline.driver.vlm_server.vlm_service`
reuses whatever already serves ``vlm.served_name`` at ``vlm.host:vlm.port``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from pipeline.atomic import write_json_atomic
from pipeline.config import PipelineConfig
from pipeline.driver.envs import resolve_env
from pipeline.errors import ServiceNotReady, UsageError
from pipeline.driver.proc import tail_lines
from pipeline.driver.vlm_server import (
    STOP_GRACE_S,
    format_argv,
    memory_budget,
    probe,
    root_url,
    start_server,
    vllm_argv,
)

__all__ = ["STATE_NAME", "LOG_NAME", "add_vlm_commands", "group_alive", "cmd_serve", "cmd_status", "cmd_stop", "state_path"]

STATE_NAME = ".vlm-server.json"
LOG_NAME = ".vlm-server.log"
_DETACHED: list[Any] = []


def state_path(config: PipelineConfig) -> Path:
    """Where ``serve`` records the server it started."""
    return Path(config.run.out_root) / STATE_NAME


def _read_state(config: PipelineConfig) -> dict[str, Any] | None:
    path = state_path(config)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        print(f"warning: ignoring unreadable state file {path}")
        return None
    return data if isinstance(data, dict) and isinstance(data.get("pgid"), int) else None


def group_alive(pgid: int) -> bool:
    """True while a process of group ``pgid`` runs (zombies, i.e. exited but not yet reaped, do not count)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc_root = Path("/proc")
    if not proc_root.is_dir():  # no procfs: a zombie leader cannot be told apart; count it as alive
        return True
    for stat in proc_root.glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid pgrp …": comm may hold spaces, so split after its closing parenthesis
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _external_error(config: PipelineConfig, action: str) -> UsageError:
    return UsageError(
        f"vlm.url is set ({config.vlm.url}): that endpoint is managed elsewhere, there is nothing to {action}",
        hint="unset vlm.url to let the tool manage a vLLM server",
    )


# ------------------------------------------------------------------------------------------------ serve


def _print_dry_run(config: PipelineConfig) -> None:
    vlm = config.vlm
    env = resolve_env(config, vlm.env, must_exist=False)
    print(f"# env '{vlm.env}': {env.prefix}" + ("" if env.exists() else " (missing: `python -m pipeline envs create vllm`)"))
    extra = dict(vlm.variables)
    if vlm.gpus is not None:
        extra["CUDA_VISIBLE_DEVICES"] = vlm.gpus
    if vlm.api_key_env:
        extra["VLLM_API_KEY"] = f"<value of ${vlm.api_key_env}>"
    for key, value in extra.items():
        print(f"# env var {key}={value}")
    print(format_argv(vllm_argv(config, executable=env.bin_dir / "vllm")))
    budget = memory_budget(config, gpu_total_gib=80.0)
    if budget is None:
        print(f"# GPU memory: no footprint known for {vlm.model}")
    else:
        print(
            f"# GPU memory per GPU: weights {budget.weights} GiB + KV for one {vlm.max_model_len}-token sequence "
            f"{budget.kv_one_sequence} GiB + overhead ~{budget.overhead:g} GiB = at least {budget.minimum} GiB; "
            f"on an 80 GiB GPU gpu_memory_utilization={vlm.gpu_memory_utilization:g} reserves {budget.reserved} GiB "
            f"(~{budget.kv_tokens} KV tokens)"
        )


def cmd_serve(args: argparse.Namespace, config: PipelineConfig) -> int:
    """Start a server and keep it up (foreground), or leave it running (``--detach``)."""
    if args.dry_run:
        _print_dry_run(config)
        return 0
    if config.vlm.url:
        raise _external_error(config, "serve")
    found = probe(root_url(config), key=config.vlm.api_key())
    if found.healthy and found.serves(config.vlm.served_name):
        print(f"a server already serves {config.vlm.served_name} at {root_url(config)}/v1; nothing started")
        return 0
    out_root = Path(config.run.out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    log_path = out_root / LOG_NAME
    print(f"starting vllm serve (log: {log_path}); a cold start can take minutes …", flush=True)
    server = start_server(config, log_path=log_path)  # raises after stopping it if it never became ready
    state = {
        "pid": server.pid,
        "pgid": server.pid,
        "url": server.url,
        "served_name": config.vlm.served_name,
        "model": config.vlm.model,
        "argv": server.argv,
        "log": str(log_path),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "detached": bool(args.detach),
    }
    write_json_atomic(state_path(config), state)
    if args.detach:
        _DETACHED.append(server.proc)  # outlives this command on purpose: keep Popen from warning about it
        print(f"ready: {server.url} (pid {server.pid}); stop it with `python -m pipeline vlm stop`")
        return 0
    print(f"ready: {server.url} (pid {server.pid}); Ctrl-C stops it", flush=True)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        while server.proc.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the normal way to end a foreground server
        print("stopping the VLM server …", flush=True)
        return 0
    else:
        raise ServiceNotReady(
            f"vllm serve exited on its own with code {server.proc.returncode}\n  last lines:\n    "
            + tail_lines(log_path, 15).replace("\n", "\n    "),
            hint=f"full log: {log_path}",
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.stop()
        _remove_state(config, server.pid)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _remove_state(config: PipelineConfig, pgid: int) -> None:
    state = _read_state(config)
    if state is not None and state.get("pgid") == pgid:
        state_path(config).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------ status


def cmd_status(args: argparse.Namespace, config: PipelineConfig) -> int:
    """Print what serves the configured model; exit 0 when it answers, 1 when not."""
    vlm = config.vlm
    key = config.vlm.api_key()
    if vlm.url:
        found = probe(vlm.url, key=key, health=False)
        name = found.serves(vlm.served_name, vlm.model)
        if name:
            print(f"external endpoint {vlm.url}: serves {name}")
            return 0
        what = f"lists {found.models}" if found.models is not None else f"does not answer ({found.error})"
        print(f"external endpoint {vlm.url} {what}; expected {vlm.served_name!r}")
        return 1
    url = f"{root_url(config)}/v1"
    state = _read_state(config)
    found = probe(root_url(config), key=key)
    ready = found.healthy and found.serves(vlm.served_name) is not None
    if state is not None and not group_alive(state["pgid"]):
        print(f"stale state file {state_path(config)} (pid {state['pid']} is gone); removed it")
        state_path(config).unlink(missing_ok=True)
        state = None
    if state is not None:
        print(
            f"managed server pid {state['pid']} started {state.get('started')} (log: {state.get('log')}): "
            + (f"ready, serving {vlm.served_name} at {url}" if ready else f"not ready yet ({found.error})")
        )
        return 0 if ready else 1
    if ready:
        print(f"a server serves {vlm.served_name} at {url} (not started by `vlm serve`)")
        return 0
    if found.answered:
        print(f"something answers at {root_url(config)} but does not serve {vlm.served_name!r}: {found.error or found.models}")
        return 1
    print(f"no VLM server at {url}")
    return 1


# ------------------------------------------------------------------------------------------------ stop


def _wait_gone(pgid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not group_alive(pgid):
            return True
        time.sleep(0.1)
    return not group_alive(pgid)


def cmd_stop(args: argparse.Namespace, config: PipelineConfig) -> int:
    """Stop the server ``serve`` started: SIGTERM its process group, SIGKILL after a grace period."""
    if config.vlm.url:
        raise _external_error(config, "stop")
    state = _read_state(config)
    if state is None:
        found = probe(root_url(config), key=config.vlm.api_key())
        if found.answered:
            print(
                f"a server answers at {root_url(config)} but `vlm serve` did not start it "
                f"(no {state_path(config)}); stop it where it was started"
            )
            return 1
        print("no VLM server is running")
        return 0
    pgid = int(state["pgid"])
    if group_alive(pgid):
        os.killpg(pgid, signal.SIGTERM)
        if not _wait_gone(pgid, args.grace):
            print(f"still running after {args.grace:g} s: SIGKILL")
            os.killpg(pgid, signal.SIGKILL)
            _wait_gone(pgid, 5.0)
        print(f"stopped the VLM server (pid {state['pid']}, {state.get('url')})")
    else:
        print(f"the recorded server (pid {state['pid']}) had already exited")
    state_path(config).unlink(missing_ok=True)
    return 0


# ------------------------------------------------------------------------------------------------ parser


def add_vlm_commands(subparsers: Any, common_parent: argparse.ArgumentParser) -> None:
    """Register ``vlm serve|status|stop`` on the CLI's subparsers; handlers are ``handler(args, config) -> int``."""
    vlm = subparsers.add_parser("vlm", help="keep a vLLM server up across runs (serve, status, stop)")
    sub = vlm.add_subparsers(dest="vlm_command", required=True, metavar="ACTION")
    serve = sub.add_parser("serve", parents=[common_parent], help="start vllm serve and keep it up")
    serve.add_argument("--detach", action="store_true", help="return once ready and leave the server running")
    serve.add_argument("--dry-run", action="store_true", help="print the command and memory budget; start nothing")
    serve.set_defaults(handler=cmd_serve)
    status = sub.add_parser("status", parents=[common_parent], help="what serves the configured model")
    status.set_defaults(handler=cmd_status)
    stop = sub.add_parser("stop", parents=[common_parent], help="stop the server `vlm serve` started")
    stop.add_argument("--grace", type=float, default=STOP_GRACE_S, metavar="S", help="seconds before SIGKILL")
    stop.set_defaults(handler=cmd_stop)
