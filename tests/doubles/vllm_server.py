"""A scripted OpenAI-compatible server double that answers like vLLM (real HTTP: FastAPI + uvicorn).

It is NOT a model: every chat completion returns the next entry of a script (a JSON list). Run it as

    python -m tests.doubles.vllm_server --port N --served-model-name X --script FILE \
        [--startup-delay S] [--crash-at-start]

or like ``vllm``: ``python -m tests.doubles.vllm_server serve MODEL --served-model-name X --port N ...``
(unknown vLLM flags are accepted and ignored), which is what the fake env's ``bin/vllm`` from
:func:`write_fake_vllm_env` does. Settings may also come from the environment: ``VLLM_DOUBLE_SCRIPT``,
``VLLM_DOUBLE_STARTUP_DELAY``, ``VLLM_DOUBLE_CRASH=1``; ``VLLM_API_KEY`` makes it demand a bearer key, as
vLLM does.

Behaviour copied from vLLM on purpose: the port is bound at once but listened on only after startup (the
delay), so clients are refused meanwhile while the port is taken; a busy port makes it exit non-zero at once, data URLs are decoded strictly
(``base64.b64decode(validate=True)``; a bad one is HTTP 400 "Non-base64 digit found"), an unknown model name
is HTTP 404, and ``/health`` and ``/v1/models`` exist. Request bodies are validated against vLLM's own
``ChatCompletionRequest`` schema (``fixtures/vllm-<SCHEMA_VERSION>-chat-completion-request.schema.json``, written
by ``make_vllm_schema.py``); a rejected body, a body that is not JSON and a media type other than JSON are HTTP
400 in the shape of vLLM's validation handler. Two differences remain: vLLM's pydantic model coerces some values
a JSON schema cannot ("yes" for true, "5" for 5), which the double refuses, and checks that run after the model
(for example the chat template's) are not made.

Script entries (all keys optional)::

    {"content": "<text>" | {json object, dumped},   # the answer after the reasoning
     "reasoning": "<text>",
     "reasoning_field": "reasoning" | "reasoning_content" | "both" | "inline" | "none",
         # inline: content = reasoning + "</think>" + content (old qwen3 parser behaviour)
     "finish_reason": "stop" | "length",             # length: content is null, all text is reasoning
     "status": 200, "error": "<message>",             # an HTTP error instead of an answer
     "delay_s": 0.0}

Test-only endpoints: ``GET /test/requests`` (what was received, summarised) and ``POST /test/script``
(replace the script and clear the received requests).
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` class in the route signatures.
import argparse
import asyncio
import base64
import binascii
import functools
import io
import json
import os
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

__all__ = ["TestServer", "start_test_server", "write_fake_vllm_env", "free_port", "main"]

CRASH_MESSAGE = "RuntimeError: CUDA error: out of memory (scripted crash of the vLLM test double)"


# ------------------------------------------------------------------------------------------------ the app


def _summarise_request(body: dict[str, Any]) -> dict[str, Any]:
    """What tests assert on: model, limits, response_format, texts and decoded image sizes."""
    from PIL import Image

    texts: list[str] = []
    images: list[list[int]] = []
    for message in body.get("messages", []):
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
            continue
        for part in content or []:
            if part.get("type") == "text":
                texts.append(part.get("text", ""))
            elif part.get("type") == "image_url":
                url = part["image_url"]["url"]
                header, _, data = url.partition(",")
                if not header.startswith("data:image/") or not header.endswith(";base64"):
                    raise ValueError("only base64 data URLs are supported by this double")
                raw = base64.b64decode(data, validate=True)  # strict, like vLLM
                with Image.open(io.BytesIO(raw)) as img:
                    images.append(list(img.size))
    return {
        "model": body.get("model"),
        "max_tokens": body.get("max_tokens"),
        "max_completion_tokens": body.get("max_completion_tokens"),
        "temperature": body.get("temperature"),
        "response_format": body.get("response_format"),
        "roles": [m.get("role") for m in body.get("messages", [])],
        "texts": texts,
        "images": images,
    }


SCHEMA_VERSION = "0.33.0"  # the vLLM that envs/vllm.yml pins
SCHEMA_PATH = Path(__file__).parent / "fixtures" / f"vllm-{SCHEMA_VERSION}-chat-completion-request.schema.json"
_MAX_REPORTED_ERRORS = 10  # vLLM's validation handler reports at most 10 entries, each cut to 1000 characters
_MAX_ERROR_CHARS = 1000


@functools.lru_cache(maxsize=1)
def _request_validator() -> Any:
    """A validator for vLLM's ChatCompletionRequest JSON schema (the committed fixture, see make_vllm_schema.py)."""
    import jsonschema

    schema = json.loads(SCHEMA_PATH.read_text())
    return jsonschema.Draft202012Validator(schema)


def _schema_errors(body: Any) -> list[dict[str, Any]]:
    """What vLLM's request model rejects in ``body``, as pydantic-like entries (type, loc, msg), path order."""
    errors = sorted(_request_validator().iter_errors(body), key=lambda e: [str(p) for p in e.absolute_path])
    return [{"type": e.validator, "loc": ("body", *e.absolute_path), "msg": e.message[:200]} for e in errors]


def _validation_error(entries: list[Any]) -> Any:
    """HTTP 400 shaped like vLLM's RequestValidationError handler: "N validation errors:" then one entry a line,
    ``param`` the first entry's dotted location, ``type`` "Bad Request"."""
    label = "error" if len(entries) == 1 else "errors"
    lines = [f"  {str(e)[:_MAX_ERROR_CHARS]}" for e in entries[:_MAX_REPORTED_ERRORS]]
    if len(entries) > _MAX_REPORTED_ERRORS:
        lines.append(f"  ...and {len(entries) - _MAX_REPORTED_ERRORS} more {label}")
    first = entries[0]
    param = ".".join(str(p) for p in first["loc"]) if isinstance(first, dict) else None
    return _error(400, "\n".join([f"{len(entries)} validation {label}:", *lines]), "Bad Request", param)


def _body_problem(content_type: str, raw: bytes) -> tuple[Any, Any]:
    """(body, None) for a body vLLM would hand to its handler, else (None, the 400 response vLLM gives)."""
    if content_type.split(";", 1)[0].strip().lower() != "application/json":
        return None, _validation_error(["Unsupported Media Type: Only 'application/json' is allowed"])
    try:
        body = json.loads(raw)
    except ValueError as exc:
        pos = getattr(exc, "pos", 0)
        entry = {"type": "json_invalid", "loc": ("body", pos), "msg": "JSON decode error", "ctx": {"error": str(exc)}}
        return None, _validation_error([entry])
    errors = _schema_errors(body)
    return (None, _validation_error(errors)) if errors else (body, None)


def _completion(entry: dict[str, Any], model: str, prompt_tokens: int) -> dict[str, Any]:
    content = entry.get("content")
    if isinstance(content, (dict, list)):
        content = json.dumps(content)
    reasoning = entry.get("reasoning")
    field = entry.get("reasoning_field", "reasoning")
    finish = entry.get("finish_reason", "stop")
    message: dict[str, Any] = {"role": "assistant", "content": content, "tool_calls": []}
    if finish == "length":
        message["content"] = None
        reasoning = (reasoning or "") + (content or "")
    if field == "inline" and finish != "length":
        message["content"] = f"{reasoning or ''}</think>\n\n{content or ''}"
    elif field in ("reasoning", "both") or (field == "inline" and finish == "length"):
        message["reasoning"] = reasoning
    if field in ("reasoning_content", "both"):
        message["reasoning_content"] = reasoning
    completion_tokens = max(1, (len(reasoning or "") + len(content or "")) // 4)
    return {
        "id": f"chatcmpl-double-{time.monotonic_ns()}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def _error(status: int, message: str, kind: str, param: str | None = None) -> Any:
    """vLLM's ErrorResponse: ``{"error": {"message", "type", "param", "code"}}``."""
    from fastapi.responses import JSONResponse

    return JSONResponse(
        status_code=status,
        content={"error": {"message": message, "type": kind, "param": param, "code": status}},
    )


def build_app(served_name: str, model: str, script: list[dict[str, Any]], api_key: str | None) -> Any:
    """The FastAPI app: /health, /v1/models, /v1/chat/completions and the /test endpoints."""
    from fastapi import FastAPI, Request

    app = FastAPI()
    state: dict[str, Any] = {"script": list(script), "requests": []}
    lock = threading.Lock()

    def authorised(request: Request) -> bool:
        return api_key is None or request.headers.get("authorization") == f"Bearer {api_key}"

    @app.get("/health")
    def health() -> Any:
        from fastapi.responses import Response

        return Response(status_code=200)

    @app.get("/v1/models")
    def models(request: Request) -> Any:
        if not authorised(request):
            return _error(401, "Unauthorized", "Unauthorized")
        return {
            "object": "list",
            "data": [{"id": served_name, "object": "model", "owned_by": "vllm", "root": model, "max_model_len": 32768}],
        }

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        if not authorised(request):
            return _error(401, "Unauthorized", "Unauthorized")
        body, problem = _body_problem(request.headers.get("content-type", ""), await request.body())
        if problem is not None:  # vLLM: media type, JSON and request-model errors are 400, never 404 or 422
            return problem
        if body.get("model") != served_name:
            return _error(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError")
        try:
            summary = _summarise_request(body)
        except (binascii.Error, ValueError) as exc:
            return _error(400, f"Failed to decode image: {exc} (Non-base64 digit found)", "BadRequestError")
        with lock:
            state["requests"].append(summary)
            entry = state["script"].pop(0) if state["script"] else None
        if entry is None:
            return _error(500, "the test double's script is exhausted", "InternalServerError")
        if entry.get("delay_s"):
            await asyncio.sleep(float(entry["delay_s"]))
        if entry.get("status", 200) != 200:
            return _error(int(entry["status"]), entry.get("error", "scripted error"), "BadRequestError")
        prompt_tokens = sum(len(t) for t in summary["texts"]) // 4 + 256 * len(summary["images"])
        return _completion(entry, served_name, prompt_tokens)

    @app.get("/test/requests")
    def received() -> Any:
        with lock:
            return list(state["requests"])

    @app.post("/test/script")
    async def load_script(request: Request) -> Any:
        entries = await request.json()
        with lock:
            state["script"] = list(entries)
            state["requests"] = []
        return {"loaded": len(entries)}

    return app


# ------------------------------------------------------------------------------------------------ CLI


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vllm-test-double", description=__doc__.splitlines()[0])
    parser.add_argument("words", nargs="*", help="optional: serve MODEL (as vllm takes it)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--script", default=os.environ.get("VLLM_DOUBLE_SCRIPT"))
    parser.add_argument("--startup-delay", type=float, default=float(os.environ.get("VLLM_DOUBLE_STARTUP_DELAY", 0)))
    parser.add_argument("--crash-at-start", action="store_true", default=os.environ.get("VLLM_DOUBLE_CRASH") == "1")
    args, unknown = parser.parse_known_args(list(argv))
    args.ignored = unknown
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (1 on a scripted crash or a busy port)."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    words = [w for w in args.words if w != "serve"]
    model = words[0] if words else "test-model"
    served = args.served_model_name or model
    # Like vLLM, print the arguments it got (the API key never travels in argv, so it cannot appear here).
    print(f"vllm test double: model={model} served={served} port={args.port} ignored={args.ignored}", flush=True)
    if args.crash_at_start:
        time.sleep(0.2)
        print(CRASH_MESSAGE, file=sys.stderr, flush=True)
        return 1
    # Like vLLM (create_server_socket before the engine starts): bind the port now, listen only after loading.
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as exc:
        print(f"ERROR: [Errno {exc.errno}] error while attempting to bind on address ({args.host!r}, {args.port}): "
              f"{exc.strerror}", file=sys.stderr, flush=True)
        return 1
    if args.startup_delay:
        print(f"loading weights (scripted delay {args.startup_delay} s)", flush=True)
        time.sleep(args.startup_delay)  # bound but not listening: clients get "connection refused"
    script = json.loads(Path(args.script).read_text()) if args.script else []
    import uvicorn

    app = build_app(served, model, script, os.environ.get("VLLM_API_KEY") or None)
    config = uvicorn.Config(app, log_level="info", access_log=False)
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
    return 0 if server.started else 1


# ------------------------------------------------------------------------------------------------ helpers


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class TestServer:
    """A running double: ``url`` ends in /v1; ``stop()`` ends its process group."""

    __test__ = False  # not a pytest test class

    proc: Any
    port: int
    served_name: str
    log_path: Path

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.root}/v1"

    def requests(self) -> list[dict[str, Any]]:
        """Summaries of the chat requests received since the last script load."""
        with urllib.request.urlopen(f"{self.root}/test/requests", timeout=5) as resp:
            return json.loads(resp.read())

    def load_script(self, entries: list[dict[str, Any]]) -> None:
        """Replace the scripted answers and forget the received requests."""
        req = urllib.request.Request(
            f"{self.root}/test/script",
            data=json.dumps(entries).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=5) as resp:
            resp.read()

    def stop(self) -> None:
        from pipeline.driver.proc import stop_process_group

        stop_process_group(self.proc, grace_s=5.0)

    def __enter__(self) -> "TestServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_test_server(
    script: list[dict[str, Any]] | None = None,
    *,
    served_name: str = "test-model",
    port: int | None = None,
    api_key: str | None = None,
    log_dir: Path | None = None,
    ready_timeout_s: float = 20.0,
) -> TestServer:
    """Start the double in its own process group and wait until /health answers."""
    from pipeline.config import PROJECT_ROOT
    from pipeline.driver.proc import child_environment, spawn, stop_process_group, tail_lines

    port = port or free_port()
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="vllm-double-"))
    script_path = log_dir / f"script-{port}.json"
    script_path.write_text(json.dumps(script or []))
    log_path = log_dir / f"server-{port}.log"
    env = child_environment(pythonpath=[PROJECT_ROOT], set_vars={"VLLM_API_KEY": api_key})
    argv = [sys.executable, "-m", "tests.doubles.vllm_server", "--port", str(port)]
    argv += ["--served-model-name", served_name, "--script", str(script_path)]
    with open(log_path, "ab") as log:
        proc = spawn(argv, env=env, cwd=PROJECT_ROOT, stdout=log, stderr=log)
    server = TestServer(proc, port, served_name, log_path)
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(f"{server.root}/health", timeout=1) as resp:
                if resp.status == 200:
                    return server
        except OSError:
            time.sleep(0.05)
    stop_process_group(proc, grace_s=2.0)
    raise RuntimeError(f"the vLLM test double did not start on port {port}:\n{tail_lines(log_path)}")


def write_fake_vllm_env(prefix: Path) -> Path:
    """Make ``prefix`` look like a venv holding vLLM: ``bin/python`` → this interpreter, ``bin/vllm`` → the
    double. Point ``envs.vllm`` at it with ``kind: venv, prefix: <prefix>``. Returns ``prefix``."""
    bin_dir = Path(prefix) / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    python = bin_dir / "python"
    if not python.exists():
        python.symlink_to(sys.executable)
    vllm = bin_dir / "vllm"
    vllm.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m tests.doubles.vllm_server "$@"\n')
    vllm.chmod(0o755)
    return Path(prefix)


if __name__ == "__main__":
    raise SystemExit(main())
