"""``python -m pipeline demo``: the first result on any machine — sample photos through the whole pipeline.

It starts ``python -m pipeline serve --demo`` as a child (demo backends in the driver's own interpreter: no GPU,
envs or weights), uploads the photos shipped in ``pipeline/samples/`` (or the user's own) through the REST API
exactly as a browser would, waits for each job, prints one line per photo (objects, seconds, where the files
are), checks that the page answers, and then either keeps serving (on a terminal, after offering to open the
page) or stops the server. Everything it starts is stopped when it ends, also on Ctrl-C.

The page's 3D view needs its JavaScript libraries, which come from npm (``web/package-lock.json``); the demo
builds them once when they are missing and ``npm`` is on PATH, and otherwise says how (the files, the job list
and the mask overlay work without them).
"""

from __future__ import annotations

import argparse
import json
import mimetypes
import shutil
import socket
import sys
import time
import urllib.error
import urllib.request
import uuid
import webbrowser
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from pipeline.config import PROJECT_ROOT, PipelineConfig
from pipeline.errors import PipelineError, UsageError

__all__ = ["SAMPLES_DIR", "Sample", "add_demo_command", "cmd_demo", "read_samples"]

SAMPLES_DIR = Path(__file__).resolve().parents[1] / "samples"
WEB_DIR = PROJECT_ROOT / "web"
_DEFAULT_PORT = 8000
_START_TIMEOUT_S = 90.0
_JOB_TIMEOUT_S = 300.0
_TERMINAL = ("succeeded", "failed", "cancelled", "interrupted")


@dataclass(frozen=True)
class Sample:
    """One photo to run and the prompt it is run with."""

    path: Path
    prompt: str


def read_samples() -> list[Sample]:
    """The shipped sample photos, from ``pipeline/samples/samples.json`` (credits and licences: its README)."""
    entries = json.loads((SAMPLES_DIR / "samples.json").read_text(encoding="utf-8"))
    return [Sample(SAMPLES_DIR / e["file"], e["prompt"]) for e in entries]


def add_demo_command(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``demo`` subcommand to the CLI's subparsers."""
    demo = sub.add_parser("demo", parents=[common],
                          help="try it now on CPU: sample photos → masks, 3D objects and a scene, shown on the web page")
    demo.add_argument("images", nargs="*", type=Path, metavar="IMAGE", help="your own photos (default: the shipped samples)")
    demo.add_argument("--prompt", help="phrase(s) for your photos (default 'object'; the demo segmenter finds salient "
                                       "objects and understands only colour words)")
    demo.add_argument("--jobs-dir", type=Path, help="where the runs go (default <run.out_root>/demo)")
    demo.add_argument("--port", type=int, default=_DEFAULT_PORT, help="port of the page (default 8000; a free one if taken or 0)")
    keep = demo.add_mutually_exclusive_group()
    keep.add_argument("--serve", action="store_true", help="keep serving the page after the photos are done (default on a terminal)")
    keep.add_argument("--no-serve", action="store_true", help="stop the server once the photos are done (default otherwise)")
    demo.set_defaults(handler=cmd_demo)


def cmd_demo(args: argparse.Namespace, config: PipelineConfig) -> int:
    """Run the demo; 0 when every photo succeeded, 1 when one failed."""
    samples = _samples_from(args.images, args.prompt)
    jobs_dir = (args.jobs_dir or Path(config.run.out_root) / "demo").resolve()
    _build_page_assets()
    port = args.port if args.port and _port_free(args.port) else _free_port()
    if args.port and port != args.port:
        print(f"port {args.port} is in use; the page goes on port {port}")
    server = _DemoServer(port, jobs_dir, list(getattr(args, "overrides", [])), getattr(args, "config", None))
    try:
        server.start()
        print(f"demo backends (not the real models): salient regions → coloured reliefs, on CPU; runs in {jobs_dir}")
        failed = sum(not _run_one(server, sample) for sample in samples)
        _check_page(server)
        interactive = sys.stdin.isatty() and sys.stdout.isatty()
        if args.serve or (interactive and not args.no_serve):
            _offer_page(server.url, ask=interactive)
            server.wait()
        else:
            print(f"to see them in 3D: {_python()} -m pipeline serve --demo --jobs-dir {jobs_dir}  (then open {server.url})")
        return 1 if failed else 0
    finally:
        server.stop()


def _samples_from(images: Sequence[Path], prompt: str | None) -> list[Sample]:
    if not images:
        if prompt is not None:
            raise UsageError("--prompt goes with your own photos", hint="python -m pipeline demo photo.jpg --prompt 'red mug'")
        return read_samples()
    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        raise UsageError(f"image not found: {', '.join(missing)}", hint="pass paths of photo files (JPEG, PNG, WebP, ...)")
    return [Sample(p, prompt or "object") for p in images]


def _python() -> str:
    """How to call this interpreter in a printed command: ``.venv/bin/python`` from the project's venv."""
    exe = Path(sys.executable)
    try:
        return str(exe.relative_to(Path.cwd())) if exe.is_relative_to(Path.cwd()) else "python"
    except ValueError:
        return "python"


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _build_page_assets() -> None:
    """Build the page's three.js + Spark bundle from npm when it is missing (once); say so when npm is absent."""
    from pipeline.driver.web.app import STATIC_DIR

    if (STATIC_DIR / "vendor" / "versions.json").exists():
        return
    npm = shutil.which("npm")
    if npm is None:
        print("note: npm is missing, so the page shows no 3D view (files, masks and downloads work); install nodejs "
              "and npm, then rerun, or run: npm ci --prefix web && npm run --prefix web build")
        return
    from pipeline.driver.proc import child_environment, run_command

    log = PROJECT_ROOT / "web" / "npm-build.log"
    print(f"building the page's 3D libraries from npm (once; log: {log}) ...")
    for argv in ([npm, "ci", "--prefix", str(WEB_DIR), "--no-audit", "--no-fund", "--loglevel=error"],
                 [npm, "run", "--prefix", str(WEB_DIR), "--silent", "build"]):
        result = run_command(argv, env=child_environment(), log_path=log, timeout_s=600)
        if result.returncode != 0:
            print(f"note: `{' '.join(argv[1:3])}` failed (exit {result.returncode}, see {log}); the page shows no 3D view")
            return


class _DemoServer:
    """A ``serve --demo`` child on 127.0.0.1:``port`` (own process group) and a tiny client for its REST API."""

    def __init__(self, port: int, jobs_dir: Path, overrides: list[str], config_file: Path | None) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.jobs_dir = jobs_dir
        self.log = jobs_dir / "server.log"
        self.argv = [sys.executable, "-m", "pipeline", "serve", "--demo", "--port", str(port), "--jobs-dir", str(jobs_dir)]
        if config_file is not None:
            self.argv += ["--config", str(config_file)]
        for override in overrides:
            self.argv += ["--set", override]
        self.proc: Any = None

    def start(self) -> None:
        """Start the child and wait until ``/api/health`` answers; a ``PipelineError`` naming the log if not."""
        from pipeline.driver.proc import child_environment, spawn

        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        out = self.log.open("ab")
        try:
            self.proc = spawn(self.argv, env=child_environment(pythonpath=[PROJECT_ROOT]), cwd=Path.cwd(), stdout=out, stderr=out)
        finally:
            out.close()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PipelineError(f"the demo server exited with {self.proc.returncode} before answering",
                                    hint=f"read {self.log}")
            try:
                self.get("/api/health")
                return
            except (OSError, ValueError):
                time.sleep(0.1)
        raise PipelineError(f"the demo server did not answer within {_START_TIMEOUT_S:.0f} s", hint=f"read {self.log}")

    def wait(self) -> None:
        """Serve until Ctrl-C (or until the server exits)."""
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None:
            from pipeline.driver.proc import stop_process_group

            stop_process_group(self.proc, grace_s=15.0)

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=10) as res:
            return json.loads(res.read()) if res.headers.get_content_type() == "application/json" else res.read()

    def submit(self, image: Path, prompt: str) -> dict[str, Any]:
        """POST /api/jobs with the photo and prompt (multipart, as the page does); the 202 body or a 4xx's detail."""
        boundary = uuid.uuid4().hex
        kind = mimetypes.guess_type(image.name)[0] or "application/octet-stream"
        body = b"".join([
            f'--{boundary}\r\nContent-Disposition: form-data; name="prompt"\r\n\r\n{prompt}\r\n'.encode(),
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{image.name}"\r\n'
            f"Content-Type: {kind}\r\n\r\n".encode(),
            image.read_bytes(), f"\r\n--{boundary}--\r\n".encode(),
        ])
        req = urllib.request.Request(self.url + "/api/jobs", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        try:
            with urllib.request.urlopen(req, timeout=60) as res:
                return json.loads(res.read())
        except urllib.error.HTTPError as exc:
            detail = json.loads(exc.read() or b"{}").get("detail") or {}
            return {"rejected": detail.get("error") or f"HTTP {exc.code}", "hint": detail.get("hint")}


def _run_one(server: _DemoServer, sample: Sample) -> bool:
    """Upload one photo, wait for its job, print its line; True when it succeeded."""
    t0 = time.monotonic()
    answer = server.submit(sample.path, sample.prompt)
    if "rejected" in answer:
        print(f"  {sample.path.name}: refused: {answer['rejected']}" + (f" ({answer['hint']})" if answer.get("hint") else ""))
        return False
    deadline = t0 + _JOB_TIMEOUT_S
    job = server.get(f"/api/jobs/{answer['id']}")
    while job["state"] not in _TERMINAL and time.monotonic() < deadline:
        time.sleep(0.1)
        job = server.get(f"/api/jobs/{answer['id']}")
    run_dir = server.jobs_dir / job["id"]
    seconds = time.monotonic() - t0
    if job["state"] != "succeeded":
        print(f"  {sample.path.name}: {job['state']}: {job.get('error') or 'no answer in time'} (log: {run_dir / 'logs'})")
        return False
    objects = job.get("objects") or []
    scene = run_dir / "scene" / "scene.glb"
    what = f"{len(objects)} object{'s' * (len(objects) != 1)}" if objects else "no object found"
    print(f"  {sample.path.name}: '{sample.prompt}' → {what} in {seconds:.1f} s; "
          f"{scene if scene.is_file() else run_dir}")
    return True


def _check_page(server: _DemoServer) -> None:
    """The page and the job list answer (what a browser would load first)."""
    page = server.get("/")
    jobs = server.get("/api/jobs")
    if b"demo backends" not in page or not isinstance(jobs, list):
        raise PipelineError("the demo page did not answer as expected", hint=f"read {server.log}")
    print(f"the page answers at {server.url} ({len(jobs)} job{'s' * (len(jobs) != 1)} listed)")


def _offer_page(url: str, *, ask: bool) -> None:
    """On a terminal, offer to open ``url`` in a browser; then say how to stop."""
    if ask:
        try:
            reply = input(f"open {url} in your browser? [Y/n] ").strip().lower()
        except EOFError:
            reply = "n"
        if reply in ("", "y", "yes"):
            webbrowser.open(url)
    print(f"serving the page at {url}; Ctrl-C stops it")
