"""The web app's own cost on CPU: time from upload to the first progress event, and overhead per job.

Starts ``python -m pipeline serve --demo`` (demo backends in real stage workers, env kind ``current``), or
``serve --config FILE`` with ``--config``, on a free port, then measures over HTTP like a client:

1. **one job at a time** (``--jobs`` N): for each job, ``t0`` = just before the multipart POST; from the job's
   server-sent events (their ``time`` stamps, same machine clock) it takes the first ``started`` event, the first
   ``progress`` event and the final ``succeeded`` event. Overhead per job = (upload → succeeded) − the workers' own
   job time for both stages (``timings.job_s`` in run.json): everything that is not model work (upload checks,
   run dir, engine hand-offs between lanes, worker I/O, events).
2. **a burst** (``--burst`` M jobs POSTed back to back, then all awaited): wall, jobs/s, and
   (wall − Σ job_s of the slower stage) / M: the stages overlap in lanes, so the slower one bounds the wall.

Prints a table (medians, min/max); ``--markdown FILE`` also writes it::

    python benchmarks/bench_web.py --work /tmp/bench-web --jobs 20 --burst 20 \\
        --markdown benchmarks/results/web-cpu-2026-11-25.md
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from PIL import Image, ImageDraw

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[1]


def _photo() -> bytes:
    """320×240 PNG: a red disc and a blue box on white (two objects for the demo segmenter)."""
    im = Image.new("RGB", (320, 240), "white")
    d = ImageDraw.Draw(im)
    d.ellipse((20, 24, 128, 132), fill=(255, 0, 0))
    d.rectangle((176, 84, 288, 204), fill=(0, 0, 255))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(work: Path, config: Path | None) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    backend = ["--config", str(config)] if config else ["--demo"]
    argv = [sys.executable, "-m", "pipeline", "serve", *backend, "--port", str(port), "--jobs-dir", str(work / "jobs"),
            "--set", f"engine.state_dir={work / 'state'}", "--max-queue", "1000"]
    log = (work / "serve.log").open("wb")
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)})
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/api/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"serve did not start; see {work / 'serve.log'}")


def _events(c: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    out = []
    with c.stream("GET", f"/api/jobs/{job_id}/events", timeout=300) as res:
        for line in res.iter_lines():
            if line.startswith("data:"):
                out.append(json.loads(line[5:]))
    return out


def _job_s(jobs_dir: Path, job_id: str, stage: str) -> float:
    run = json.loads((jobs_dir / job_id / "run.json").read_text())
    return float(run["stages"][stage]["timings"]["job_s"])


def _submit(c: httpx.Client, photo: bytes, prompt: str) -> str:
    res = c.post("/api/jobs", files={"image": ("photo", photo, "application/octet-stream")}, data={"prompt": prompt})
    if res.status_code != 202:
        raise SystemExit(f"submit failed: {res.status_code} {res.text}")
    return str(res.json()["id"])


def _describe(photo: bytes) -> str:
    with Image.open(io.BytesIO(photo)) as im:
        return f"{im.width}×{im.height} {im.format}, {len(photo) / 1e6:.2f} MB"


def _stat(values: list[float], scale: float = 1000.0, unit: str = "ms") -> str:
    return f"{statistics.median(values) * scale:.1f} {unit} (min {min(values) * scale:.1f}, max {max(values) * scale:.1f})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="scratch folder (emptied)")
    ap.add_argument("--config", type=Path, help="serve with this config instead of --demo")
    ap.add_argument("--jobs", type=int, default=20, help="jobs one at a time (default 20)")
    ap.add_argument("--burst", type=int, default=20, help="jobs submitted at once (default 20)")
    ap.add_argument("--prompt", default="red, blue")
    ap.add_argument("--photo", type=Path, help="upload this photo (default: a drawn 320×240 PNG)")
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args(argv)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    jobs_dir = args.work / "jobs"
    photo = args.photo.read_bytes() if args.photo else _photo()
    proc, url = _start(args.work, args.config)
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            _events(c, _submit(c, photo, args.prompt))  # warm-up: workers started, first-job costs paid
            accepted, to_started, to_progress, total, overhead, work, ratio = [], [], [], [], [], [], []
            for _ in range(args.jobs):
                t0 = time.time()
                job_id = _submit(c, photo, args.prompt)
                accepted.append(time.time() - t0)
                ev = _events(c, job_id)
                if ev[-1]["kind"] != "succeeded":
                    raise SystemExit(f"job {job_id} ended {ev[-1]}")
                first = lambda kind: next(e["time"] for e in ev if e["kind"] == kind)  # noqa: E731
                to_started.append(first("started") - t0)
                to_progress.append(first("progress") - t0)
                total.append(ev[-1]["time"] - t0)
                w = _job_s(jobs_dir, job_id, "segment") + _job_s(jobs_dir, job_id, "reconstruct")
                work.append(w)
                overhead.append(total[-1] - w)
                ratio.append(total[-1] / w)
            t0 = time.time()
            ids = [_submit(c, photo, args.prompt) for _ in range(args.burst)]
            ends = [_events(c, i)[-1] for i in ids]
            wall = max(e["time"] for e in ends) - t0
            if any(e["kind"] != "succeeded" for e in ends):
                raise SystemExit("a burst job failed")
            rec = sum(_job_s(jobs_dir, i, "reconstruct") for i in ids)
            seg = sum(_job_s(jobs_dir, i, "segment") for i in ids)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    backend = f"config {args.config}" if args.config else "serve --demo (demo backends in workers of env kind current)"
    head = (f"Machine: {platform.node()} ({os.cpu_count()} CPUs, {platform.machine()}), Python {platform.python_version()}, "
            f"{time.strftime('%Y-%m-%d')}; {backend}; prompt '{args.prompt}'; upload "
            f"{_describe(photo) if args.photo else '320×240 PNG (2 objects)'}; "
            f"one warm-up job first.")
    rows = [
        (f"one at a time ({args.jobs} jobs): POST → 202 accepted", _stat(accepted)),
        ("upload → first `started` event (engine picked the job up)", _stat(to_started)),
        ("**upload → first `progress` event**", _stat(to_progress)),
        ("upload → `succeeded` event", _stat(total)),
        ("workers' own job time (segment + reconstruct job_s)", _stat(work)),
        ("**overhead per job** (upload → succeeded − workers' job time)", _stat(overhead)),
        ("upload → succeeded, in % of the workers' own job time", _stat(ratio, 100.0, "%")),
        (f"burst of {args.burst}: wall s (s/job, jobs/s)", f"{wall:.2f} ({wall / args.burst:.3f}, {args.burst / wall:.2f})"),
        (f"burst of {args.burst}: Σ segment / Σ reconstruct job s", f"{seg:.2f} / {rec:.2f}"),
        (f"burst of {args.burst}: (wall − Σ slower stage's job_s) / job", f"{(wall - max(seg, rec)) / args.burst * 1000:.1f} ms"),
    ]
    table = "| measure | median (min, max) |\n| --- | --- |\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)
    print(head + "\n\n" + table)
    if args.markdown:
        args.markdown.write_text("# Web app overhead, CPU (benchmarks/bench_web.py)\n\n"
                                 f"Command: `python benchmarks/bench_web.py {' '.join(argv or sys.argv[1:])}`\n\n"
                                 + head + "\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
