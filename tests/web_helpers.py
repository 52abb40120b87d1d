"""Helpers of the web tests: a real ``serve`` subprocess on a free port, waiting for jobs, test images."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from PIL import Image, ImageDraw

from tests.conftest import PROJECT_ROOT

__all__ = ["Server", "free_port", "photo_bytes", "start_server", "wait_state", "read_events"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def photo_bytes(size: tuple[int, int] = (160, 120), fmt: str = "PNG") -> bytes:
    """A photo the demo segmenter understands: a red disc on the left, a blue box on the right, white ground."""
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    w, h = size
    d.ellipse((w * 0.06, h * 0.1, w * 0.4, h * 0.55), fill=(255, 0, 0))
    d.rectangle((w * 0.55, h * 0.35, w * 0.9, h * 0.85), fill=(0, 0, 255))
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


@dataclass
class Server:
    """A running ``python -m pipeline serve``; ``url`` is its base URL."""

    proc: subprocess.Popen
    url: str
    log: Path

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, **{"timeout": 30.0, **kw})

    def stop(self) -> int:
        """SIGTERM (uvicorn shuts down, the engine closes its workers); the exit status."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)


def start_server(*args: str, log: Path, env: dict[str, str] | None = None, host: str = "127.0.0.1") -> Server:
    """Start ``serve`` with ``args`` on a free port and wait until /api/health answers."""
    port = free_port()
    full_env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), **(env or {})}
    out = log.open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", "--host", host, "--port", str(port), *args],
                            cwd=PROJECT_ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {full_env['PIPELINE_WEB_TOKEN']}"} if "PIPELINE_WEB_TOKEN" in full_env else {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url + "/api/health", headers=headers, timeout=2).status_code == 200:
                return Server(proc, url, log)
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"serve did not answer in 60 s:\n{log.read_text()}")


def wait_state(client: httpx.Client, job_id: str, states: tuple[str, ...], timeout: float = 120.0) -> dict[str, Any]:
    """Poll GET /api/jobs/{id} until its state is one of ``states``; the job detail."""
    deadline = time.monotonic() + timeout
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {job.get('state')} after {timeout} s (wanted {states}): {job}")


def read_events(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    """Every SSE event of a job, read until the server ends the stream (it does once the job is done)."""
    events: list[dict[str, Any]] = []
    with client.stream("GET", f"/api/jobs/{job_id}/events", timeout=120.0) as res:
        assert res.status_code == 200, res.read()
        assert res.headers["content-type"].startswith("text/event-stream")
        for line in res.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
    return events
