"""The vLLM server's lifecycle: reuse what already answers, otherwise start ``vllm serve``, wait, always stop.

:func:`vlm_service` is a context manager yielding the base URL (``…/v1``) the agent talks to:

1. ``vlm.url`` set → an external OpenAI-compatible endpoint: check that ``/models`` lists ``vlm.served_name``
   or ``vlm.model``, yield it, start and stop nothing.
2. A server already answers at ``http://vlm.host:vlm.port`` with the served model (e.g. one kept up by
   ``python -m pipeline vlm serve --detach``) → reuse it; nothing is started or stopped.
3. Otherwise spawn ``<vllm env>/bin/vllm serve …`` (argv from :func:`vllm_argv`) in its own process group,
   output appended to ``log_path``, and wait until it is ready: the process is alive AND ``GET /health`` is 200
   AND ``GET /v1/models`` lists the served name. A child that exits, a busy port or another server on the
   port is reported at once with the log's last lines; the wait is bounded by ``vlm.ready_timeout_s``.
   On leaving the block — success, exception or Ctrl-C — the group gets SIGTERM, then SIGKILL.

While vLLM loads, its port refuses connections: "refused" means "not ready yet", not failure.
The API key (environment variable named by ``vlm.api_key_env``) goes to a managed server as ``VLLM_API_KEY``
in its environment and to probes as a bearer header; it is never in argv, which is what gets logged.
Only the standard library is used here, so the light driver env can run it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import shlex
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from pipeline.config import PipelineConfig
from pipeline.driver.envs import resolve_env
from pipeline.errors import EnvNotFound, ServiceNotReady
from pipeline.driver.proc import spawn, stop_process_group, tail_lines

__all__ = [
    "STOP_GRACE_S",
    "Probe",
    "ManagedServer",
    "MemoryBudget",
    "vllm_argv",
    "format_argv",
    "root_url",
    "probe",
    "memory_budget",
    "start_server",
    "vlm_service",
]

log = logging.getLogger(__name__)

POLL_S = 0.25
PROBE_TIMEOUT_S = 2.0
STOP_GRACE_S = 15.0  # vLLM frees GPU memory on SIGTERM; give it time before SIGKILL


# ------------------------------------------------------------------------------------------------ argv


def vllm_argv(config: PipelineConfig, *, executable: str | Path = "vllm") -> list[str]:
    """The exact ``vllm serve`` argument list the tool runs for ``config`` (``executable`` first)."""
    vlm = config.vlm
    argv = [
        str(executable),
        "serve",
        vlm.model,
        "--served-model-name",
        vlm.served_name,
        "--host",
        vlm.host,
        "--port",
        str(vlm.port),
        "--max-model-len",
        str(vlm.max_model_len),
        "--gpu-memory-utilization",
        f"{vlm.gpu_memory_utilization:g}",
        "--limit-mm-per-prompt",
        json.dumps(vlm.limit_mm_per_prompt, separators=(",", ":")),
        "--tensor-parallel-size",
        str(vlm.tensor_parallel_size),
        "--mm-processor-cache-gb",  # every image is new: the default 4 GiB cache only costs host RAM
        "0",
    ]
    if vlm.reasoning_parser:
        argv += ["--reasoning-parser", vlm.reasoning_parser]
    argv += list(vlm.extra_args)
    if any(a == "--api-key" or a.startswith("--api-key=") for a in argv):
        raise ServiceNotReady(
            "vlm.extra_args contains --api-key: the key would show in process lists and logs",
            hint="export the key and set vlm.api_key_env to the variable's name instead",
        )
    return argv


def format_argv(argv: list[str]) -> str:
    """A shell-ready one-line rendering of ``argv`` (for logs and docs)."""
    return " ".join(shlex.quote(a) for a in argv)


# ------------------------------------------------------------------------------------------------ memory


@dataclass(frozen=True)
class MemoryBudget:
    """GPU memory (GiB, per GPU) a Qwen3-VL-8B server needs at ``max_model_len``, and what it reserves.

    ``weights`` bf16 weights (16.8 GiB total, split over tensor-parallel ranks); ``kv_one_sequence`` KV cache
    for one full-length sequence at 144 KiB/token; ``overhead`` activations, encoder profiling and CUDA graphs;
    ``minimum`` their sum; ``reserved`` = ``gpu_memory_utilization × gpu_total`` (None without a GPU size);
    ``kv_tokens`` tokens of KV cache the reservation leaves room for.
    """

    weights: float
    kv_one_sequence: float
    overhead: float
    minimum: float
    reserved: float | None
    kv_tokens: int | None


# Per-model footprints (vllm.md §3): bf16 weights in GiB and KV bytes per token (36 layers × 8 KV heads × 128
# head dim × 2 (K, V) × 2 bytes). Matched by a substring of the lower-cased model name.
_FOOTPRINTS = {"qwen3-vl-8b": (16.8, 36 * 8 * 128 * 2 * 2)}
_OVERHEAD_GIB = 4.0  # activations + multimodal encoder profile (2–5 GiB) + CUDA graphs (0.5–1 GiB)
_GIB = 1024**3


def memory_budget(config: PipelineConfig, *, gpu_total_gib: float | None = None) -> MemoryBudget | None:
    """Estimate the server's per-GPU memory for ``config``; None for a model without a known footprint."""
    vlm = config.vlm
    name = vlm.model.lower()
    footprint = next((fp for key, fp in _FOOTPRINTS.items() if key in name), None)
    if footprint is None:
        return None
    weights_total, kv_bytes = footprint
    tp = vlm.tensor_parallel_size
    weights = weights_total / tp
    kv_one = vlm.max_model_len * kv_bytes / tp / _GIB
    minimum = weights + kv_one + _OVERHEAD_GIB
    reserved = kv_tokens = None
    if gpu_total_gib is not None:
        reserved = vlm.gpu_memory_utilization * gpu_total_gib
        kv_tokens = max(0, int((reserved - weights - _OVERHEAD_GIB) * _GIB / (kv_bytes / tp)))
    return MemoryBudget(round(weights, 2), round(kv_one, 2), _OVERHEAD_GIB, round(minimum, 2),
                        None if reserved is None else round(reserved, 2), kv_tokens)


# ------------------------------------------------------------------------------------------------ probing


def root_url(config: PipelineConfig) -> str:
    """``http://host:port`` of the managed server (a wildcard host is probed on loopback)."""
    host = config.vlm.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{config.vlm.port}"


@dataclass(frozen=True)
class Probe:
    """What answered at a URL: ``answered`` (any HTTP reply), ``healthy`` (/health 200, root URLs only),
    ``models`` listed by /models (None when not listed), ``status`` of /models, ``error`` in words."""

    answered: bool
    healthy: bool
    models: list[str] | None
    status: int | None
    error: str | None

    def serves(self, *names: str) -> str | None:
        """The first of ``names`` that the server lists, or None."""
        return next((n for n in names if self.models and n in self.models), None)


def _get(url: str, key: str | None, timeout: float) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read() if exc.fp else b""


def probe(base: str, *, key: str | None = None, health: bool = True, timeout: float = PROBE_TIMEOUT_S) -> Probe:
    """Ask ``base`` (a root URL, or an OpenAI base URL ending in /v1 with ``health=False``) what it serves."""
    base = base.rstrip("/")
    models_url = f"{base}/models" if base.endswith("/v1") else f"{base}/v1/models"
    healthy = False
    try:
        if health:
            status, _ = _get(f"{base}/health", key, timeout)
            healthy = status == 200
            if not healthy:
                return Probe(True, False, None, None, f"/health answered {status}")
        status, body = _get(models_url, key, timeout)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return Probe(False, False, None, None, str(reason))
    if status != 200:
        return Probe(True, healthy, None, status, f"/v1/models answered {status}")
    try:
        data = json.loads(body)
        models = [str(m["id"]) for m in data["data"]]
    except (ValueError, KeyError, TypeError):
        return Probe(True, healthy, None, status, "/v1/models did not return an OpenAI model list")
    return Probe(True, healthy, models, status, None)


def _port_is_free(host: str, port: int) -> bool:
    """True when nothing holds ``host:port``: not a listening server, and not a socket that is only *bound* —
    ``vllm serve`` binds its port first and listens only once the model is loaded, minutes later.

    A plain bind (no SO_REUSEADDR) fails for both, but also for connections of a stopped server lingering in
    TIME_WAIT, which do not stop a new server (vLLM sets SO_REUSEADDR). So when the plain bind fails, the port
    counts as free only if the kernel lists TIME_WAIT entries for it and nothing else: a bound-only socket is
    not listed in /proc/net/tcp at all, a listening one is listed as LISTEN.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno not in (errno.EADDRINUSE, errno.EACCES):
                raise
        else:
            return True
    states = _tcp_states(port)
    return bool(states) and states <= {_TIME_WAIT}


_TIME_WAIT = "06"


def _tcp_states(port: int) -> set[str]:
    """The states (hex, as in /proc/net/tcp) of the kernel's TCP entries whose local port is ``port``; empty
    where /proc is not there."""
    states: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[1].rsplit(":", 1)[-1] == f"{port:04X}":
                states.add(fields[3])
    return states


# ------------------------------------------------------------------------------------------------ lifecycle


@dataclass
class ManagedServer:
    """A ``vllm serve`` we started: its process (leader of its own group), URL, argv and log."""

    proc: Any
    url: str
    argv: list[str]
    log_path: Path

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    def stop(self, *, grace_s: float = STOP_GRACE_S) -> int | None:
        """SIGTERM the process group, SIGKILL after ``grace_s``; returns the exit code."""
        return stop_process_group(self.proc, grace_s=grace_s)


def _not_ready(message: str, log_path: Path, hint: str) -> ServiceNotReady:
    tail = tail_lines(log_path, 15)
    detail = f"{message}\n  log: {log_path}"
    if tail:
        detail += "\n  last lines:\n    " + tail.replace("\n", "\n    ")
    return ServiceNotReady(detail, hint=hint)


def _check_port(config: PipelineConfig, found: Probe) -> None:
    """Raise when the configured port is taken by something that is not our model."""
    vlm = config.vlm
    where = f"{vlm.host}:{vlm.port}"
    if found.status == 401:
        raise ServiceNotReady(
            f"a server at {where} wants an API key",
            hint="export the key and set vlm.api_key_env to the variable's name",
        )
    if found.answered:
        what = f"serving {found.models}" if found.models else f"({found.error})"
        raise ServiceNotReady(
            f"port {vlm.port} on {vlm.host} is taken by another server {what}, not {vlm.served_name!r}",
            hint="stop that server, or set vlm.port to a free port (or vlm.url to use that server)",
        )
    if not _port_is_free(vlm.host, vlm.port):
        raise ServiceNotReady(
            f"port {vlm.port} on {vlm.host} is already in use by another process",
            hint=f"free it (e.g. `ss -ltnp 'sport = :{vlm.port}'` shows who holds it) or set vlm.port",
        )


def _wait_ready(server: ManagedServer, config: PipelineConfig, key: str | None) -> float:
    """Poll until the server is ready; returns the seconds waited. Raises ServiceNotReady (server left running)."""
    vlm = config.vlm
    t0 = time.monotonic()
    deadline = t0 + vlm.ready_timeout_s
    last = "no answer yet"
    while True:
        code = server.proc.poll()
        if code is not None:
            raise _not_ready(
                f"vllm serve exited with code {code} after {time.monotonic() - t0:.1f} s, before it was ready",
                server.log_path,
                "read the log: common causes are too little free GPU memory (lower vlm.gpu_memory_utilization or"
                " vlm.max_model_len), a busy port (vlm.port) or missing model weights (vlm.model)",
            )
        found = probe(server.url.removesuffix("/v1"), key=key)
        if found.healthy and found.serves(vlm.served_name):
            return time.monotonic() - t0
        if found.status == 401:
            raise _not_ready(
                "the server answers but refuses our API key", server.log_path,
                "VLLM_API_KEY in your shell may differ from the variable named by vlm.api_key_env",
            )
        if found.models is not None:
            raise _not_ready(
                f"the server lists {found.models}, not {vlm.served_name!r}", server.log_path,
                "another server may have taken the port; check vlm.port and vlm.served_name",
            )
        last = found.error or last
        if time.monotonic() >= deadline:
            raise _not_ready(
                f"vllm serve was not ready after {vlm.ready_timeout_s:g} s (last probe: {last})",
                server.log_path,
                "a cold start (weights, compile, CUDA graphs) can take 10+ minutes: raise vlm.ready_timeout_s,"
                " or keep one server up with `python -m pipeline vlm serve --detach`",
            )
        time.sleep(POLL_S)


def start_server(config: PipelineConfig, *, log_path: Path) -> ManagedServer:
    """Spawn ``vllm serve`` in the vllm env and wait until it is ready; on any failure it is stopped first.

    The caller owns the returned server and must :meth:`ManagedServer.stop` it.
    """
    vlm = config.vlm
    key = config.vlm.api_key()
    env = resolve_env(config, vlm.env)
    executable = env.bin_dir / "vllm"
    if not executable.exists():
        raise EnvNotFound(
            f"env '{vlm.env}' at {env.prefix} has no vllm executable ({executable})",
            hint=f"create it with `python -m pipeline envs create {vlm.env}`, or set vlm.url to an external server",
        )
    argv = vllm_argv(config, executable=executable)
    extra: dict[str, str | None] = dict(vlm.variables)
    if vlm.gpus is not None:
        extra["CUDA_VISIBLE_DEVICES"] = vlm.gpus
    if key is not None:
        extra["VLLM_API_KEY"] = key  # vLLM reads it like --api-key, without putting the key in argv
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as fh:
        fh.write(f"$ {format_argv(argv)}\n".encode())
        fh.flush()
        proc = spawn(argv, env=env.child_env(extra), stdout=fh, stderr=fh)
        fh.write(f"# started pid={proc.pid} pgid={proc.pid}\n".encode())
    server = ManagedServer(proc, f"{root_url(config)}/v1", argv, log_path)
    log.info("started vllm serve (pid %d), log %s", proc.pid, log_path)
    try:
        waited = _wait_ready(server, config, key)
    except BaseException:  # includes Ctrl-C while waiting
        server.stop(grace_s=5.0)
        raise
    log.info("vLLM ready at %s after %.1f s", server.url, waited)
    return server


@contextlib.contextmanager
def vlm_service(config: PipelineConfig, *, log_path: Path) -> Iterator[str]:
    """Yield a ready VLM base URL (``…/v1``): external, reused, or started here and stopped on exit."""
    vlm = config.vlm
    key = config.vlm.api_key()
    if vlm.url:
        found = probe(vlm.url, key=key, health=False)
        if not found.serves(vlm.served_name, vlm.model):
            what = f"lists {found.models}" if found.models is not None else f"does not answer ({found.error})"
            raise ServiceNotReady(
                f"the VLM endpoint {vlm.url} {what}; expected {vlm.served_name!r} or {vlm.model!r}",
                hint="check vlm.url (it ends in /v1), vlm.served_name and vlm.api_key_env",
            )
        log.info("using the external VLM endpoint %s", vlm.url)
        yield vlm.url.rstrip("/")
        return
    found = probe(root_url(config), key=key)
    if found.healthy and found.serves(vlm.served_name):
        log.info("reusing the vLLM server already serving %s at %s", vlm.served_name, root_url(config))
        yield f"{root_url(config)}/v1"
        return
    _check_port(config, found)
    server = start_server(config, log_path=log_path)
    try:
        yield server.url
    finally:
        code = server.stop()
        log.info("stopped vllm serve (pid %d, exit %s)", server.pid, code)
