"""The web app (``python -m pipeline serve --demo``) as a real server: REST calls, SSE, files, zip, generate_3d,
every security rule, the bounded queue, cancel, and a restart that finds the old jobs (interrupted ones marked).

The demo backends run in real stage workers (env kind ``current``), so these are fast enough for every run.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Iterator

import pytest
from PIL import Image

from tests.web_helpers import Server, photo_bytes, read_events, start_server, wait_state

LIMITS = ("--max-upload-mb", "0.5", "--max-pixels", "200000")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    root = tmp_path_factory.mktemp("web")
    server = start_server("--demo", "--jobs-dir", str(root / "jobs"), "--set", f"engine.state_dir={root / 'state'}",
                          *LIMITS, log=root / "serve.log")
    yield server, root / "jobs"
    assert server.stop() in (0, -15), server.log.read_text()


def _submit(server: Server, data: bytes, name: str = "photo.png", ctype: str = "image/png", **form: str):  # noqa: ANN202
    with server.client() as c:
        return c.post("/api/jobs", files={"image": (name, data, ctype)}, data=form or {"prompt": "red, blue"})


def test_submit_events_files_and_zip(demo: tuple[Server, Path]) -> None:
    server, jobs_dir = demo
    res = _submit(server, photo_bytes(), prompt="red, blue", seed="7")
    assert res.status_code == 202, res.text
    job_id = res.json()["id"]
    assert res.headers["location"] == f"/api/jobs/{job_id}"
    with server.client() as c:
        events = read_events(c, job_id)
        kinds = [e["kind"] for e in events]
        assert kinds[0] == "queued" and kinds[-1] == "succeeded", kinds
        assert {"started", "stage_started", "stage_finished", "progress"} <= set(kinds), kinds
        per_object = [e for e in events if e["kind"] == "progress" and e["stage"] == "reconstruct" and e["total"] == 2]
        assert [e["done"] for e in per_object][-1:] == [2], events
        assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)
        job = c.get(f"/api/jobs/{job_id}").json()
        assert job["state"] == "succeeded" and job["demo"] is True
        assert sorted(o["label"] for o in job["objects"]) == ["blue", "red"]
        assert all(0 < o["score"] <= 1 for o in job["objects"])
        assert job["stages"]["segment"]["status"] == "succeeded" and job["stages"]["reconstruct"]["duration_s"] > 0
        assert job["options"] == {"seed": 7}
        ply = c.get(job["objects"][0]["files"]["gaussians.ply"])
        assert ply.status_code == 200 and ply.content.startswith(b"ply\n")
        glb = c.get(job["scene"]["scene_glb_url"])
        assert glb.status_code == 200 and glb.content[:4] == b"glTF"
        mask = c.get(job["objects"][1]["mask_url"])
        assert Image.open(io.BytesIO(mask.content)).size == (160, 120)
        listed = {j["id"] for j in c.get("/api/jobs").json()}
        assert job_id in listed
        z = c.get(f"/api/jobs/{job_id}/zip")
        assert z.status_code == 200
        names = zipfile.ZipFile(io.BytesIO(z.content)).namelist()
        assert f"{job_id}/scene/scene.glb" in names and f"{job_id}/objects/001/gaussians.ply" in names
    assert (jobs_dir / job_id / "run.json").exists()


def test_generate_3d_compat(demo: tuple[Server, Path]) -> None:
    server, _ = demo
    with server.client() as c:
        res = c.post("/api/generate_3d", files={"image": ("x.png", photo_bytes(), "image/png")},
                     data={"text_prompt": "red", "seed": "3", "max_objects": "5"})
        assert res.status_code == 200, res.text
        body = res.json()
        assert body["success"] is True and body["num_objects"] == 1
        assert c.get(body["glb_url"]).content[:4] == b"glTF"
        assert c.get(body["objects"][0]["ply_url"]).status_code == 200
        job = c.get(f"/api/jobs/{body['job_id']}").json()
        assert job["prompts"] == ["red"] and job["options"]["seed"] == 3
        none = c.post("/api/generate_3d", files={"image": ("x.png", photo_bytes(), "image/png")}, data={"text_prompt": "purple"})
        assert none.status_code == 400, none.text


def test_openapi_and_docs(demo: tuple[Server, Path]) -> None:
    server, _ = demo
    with server.client() as c:
        schema = c.get("/openapi.json").json()
        for path in ("/api/jobs", "/api/jobs/{job_id}", "/api/jobs/{job_id}/events", "/api/jobs/{job_id}/files/{path}",
                     "/api/jobs/{job_id}/zip", "/api/health", "/api/generate_3d"):
            assert path in schema["paths"], path
        assert "swagger" in c.get("/docs").text.lower()
        page = c.get("/")
        assert page.status_code == 200 and "demo backends, not the real models" in page.text


# ------------------------------------------------------------------ uploads


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG declaring width×height with a few bytes of pixel data (a decompression-bomb header)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_upload_too_many_bytes_is_413(demo: tuple[Server, Path]) -> None:
    res = _submit(demo[0], photo_bytes() + os.urandom(700_000))
    assert res.status_code == 413, res.text


def test_upload_too_many_pixels_is_413(demo: tuple[Server, Path]) -> None:
    res = _submit(demo[0], photo_bytes((600, 400)))
    assert res.status_code == 413 and "pixels" in res.text, res.text


@pytest.mark.parametrize("size", [(100_000, 100_000), (20_000, 20_000), (1000, 1000)])
def test_bomb_header_is_refused_before_decoding(demo: tuple[Server, Path], size: tuple[int, int]) -> None:
    # Almost no pixel data follows the header: decoding it would fail with 422, so a 413 shows the check came first.
    # (100k² and 20k² trip Pillow's own bomb guard while opening; 1000² passes it and hits --max-pixels.)
    res = _submit(demo[0], _png_header_only(*size))
    assert res.status_code == 413, res.text


def test_type_comes_from_content_not_name(demo: tuple[Server, Path]) -> None:
    server, jobs_dir = demo
    bad = _submit(server, b"%PDF-1.4 not an image at all", name="photo.png", ctype="image/png")
    assert bad.status_code == 415, bad.text
    assert "hint" in bad.json()["detail"]
    gif = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(gif, "GIF")
    assert _submit(server, gif.getvalue(), name="a.png").status_code == 415
    ok = _submit(server, photo_bytes(fmt="PNG"), name="photo.jpg", ctype="image/jpeg")
    assert ok.status_code == 202, ok.text
    assert ok.json()["upload"]["format"] == "PNG"
    assert (jobs_dir / ok.json()["id"] / "upload" / "image.png").exists()


def test_client_file_name_never_becomes_a_path(demo: tuple[Server, Path]) -> None:
    server, jobs_dir = demo
    res = _submit(server, photo_bytes(), name="../../../escape.png")
    assert res.status_code == 202, res.text
    job_id = res.json()["id"]
    assert res.json()["upload"]["name"] == "escape.png"
    assert not list(jobs_dir.parent.rglob("escape.png"))
    assert [p.name for p in (jobs_dir / job_id / "upload").iterdir()] == ["image.png"]


def test_exif_orientation_is_applied(demo: tuple[Server, Path]) -> None:
    server, _ = demo
    im = Image.open(io.BytesIO(photo_bytes((160, 120))))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif, quality=95)
    res = _submit(server, buf.getvalue(), name="p.jpg", ctype="image/jpeg")
    assert res.status_code == 202, res.text
    assert (res.json()["upload"]["width"], res.json()["upload"]["height"]) == (120, 160)
    with server.client() as c:
        job = wait_state(c, res.json()["id"], ("succeeded", "failed"))
    assert job["image_size"] == [120, 160], job


def test_query_or_prompt_required(demo: tuple[Server, Path]) -> None:
    server, _ = demo
    with server.client() as c:
        both = c.post("/api/jobs", files={"image": ("a.png", photo_bytes(), "image/png")}, data={"prompt": "red", "query": "x"})
        none = c.post("/api/jobs", files={"image": ("a.png", photo_bytes(), "image/png")})
        bad = c.post("/api/jobs", files={"image": ("a.png", photo_bytes(), "image/png")}, data={"prompt": "red", "threshold": "2"})
    assert both.status_code == none.status_code == bad.status_code == 422


# ------------------------------------------------------------------ files/, CORS, hosts


def test_files_cannot_leave_the_run_directory(demo: tuple[Server, Path], tmp_path: Path) -> None:
    server, jobs_dir = demo
    res = _submit(server, photo_bytes())
    job_id = res.json()["id"]
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    with server.client() as c:
        wait_state(c, job_id, ("succeeded",))
        (jobs_dir / job_id / "masks" / "link.txt").symlink_to(secret)
        (jobs_dir / job_id / "objects" / "linkdir").symlink_to(tmp_path, target_is_directory=True)
        for path in ("..%2F..%2Fetc%2Fpasswd", "../../etc/passwd", "%2Fetc%2Fpasswd", "masks/..%2F..%2F" + job_id,
                     "masks/link.txt", "objects/linkdir/secret.txt", ".%2Fjob.json", "masks%5C..%5Crun.json",
                     "masks/000.png%00.txt"):
            r = c.get(f"/api/jobs/{job_id}/files/{path}")
            assert r.status_code in (400, 404), (path, r.status_code)
            assert "top secret" not in r.text and "root:" not in r.text, path
        assert c.get(f"/api/jobs/{job_id}/files/masks/000.png").status_code == 200
        assert c.get("/api/jobs/..%2F..%2Fetc/zip").status_code in (400, 404)


def test_cors_is_closed_and_foreign_hosts_refused(demo: tuple[Server, Path]) -> None:
    server, _ = demo
    with server.client() as c:
        pre = c.options("/api/jobs", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in pre.headers
        get = c.get("/api/health", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in get.headers
        rebound = c.get("/api/health", headers={"Host": "evil.example"})
        assert rebound.status_code == 400


# ------------------------------------------------------------------ token, queue, cancel, restart


def test_non_loopback_bind_needs_a_token(tmp_path: Path) -> None:
    from tests.conftest import run_cli

    env = {k: v for k, v in os.environ.items() if k != "PIPELINE_WEB_TOKEN"}
    result = run_cli("serve", "--demo", "--host", "0.0.0.0", "--port", "1", "--jobs-dir", str(tmp_path), env=env, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "needs an API token" in result.stderr and "Traceback" not in result.stderr


def test_token_is_checked_on_every_api_call_and_never_logged(tmp_path: Path) -> None:
    token = "t0ken-" + os.urandom(12).hex()
    server = start_server("--demo", "--jobs-dir", str(tmp_path / "jobs"), "--set", f"engine.state_dir={tmp_path / 'st'}",
                          host="0.0.0.0", log=tmp_path / "serve.log", env={"PIPELINE_WEB_TOKEN": token})
    try:
        with server.client() as c:
            for method, path in (("GET", "/api/health"), ("GET", "/api/jobs"), ("GET", "/api/jobs/abc"),
                                 ("DELETE", "/api/jobs/abc"), ("GET", "/api/jobs/abc/files/run.json"),
                                 ("POST", "/api/generate_3d"), ("POST", "/api/jobs")):
                assert c.request(method, path).status_code == 401, (method, path)
                assert c.request(method, path, headers={"Authorization": "Bearer wrong"}).status_code == 401
            auth = {"Authorization": f"Bearer {token}"}
            assert c.get("/api/health", headers=auth).status_code == 200
            res = c.post("/api/jobs", headers=auth, files={"image": ("a.png", photo_bytes(), "image/png")}, data={"prompt": "red"})
            assert res.status_code == 202, res.text
            c.headers.update(auth)
            wait_state(c, res.json()["id"], ("succeeded",))
    finally:
        assert server.stop() in (0, -15)  # uvicorn re-raises the SIGTERM it handled
    assert token not in server.log.read_text()
    assert not any(token in p.read_text(errors="replace") for p in (tmp_path / "jobs").rglob("*") if p.is_file() and p.suffix in (".json", ".log"))


def test_full_queue_429_cancel_queued_and_running(tmp_path: Path) -> None:
    server = start_server("--demo", "--jobs-dir", str(tmp_path / "jobs"), "--set", f"engine.state_dir={tmp_path / 'st'}",
                          "--set", "reconstruct.options.delay_s=1.5", "--max-queue", "3", log=tmp_path / "serve.log")
    try:
        ids = [_submit(server, photo_bytes(), prompt="red, blue").json()["id"] for _ in range(3)]
        full = _submit(server, photo_bytes())
        assert full.status_code == 429, full.text
        assert full.headers.get("retry-after")
        with server.client() as c:
            running = wait_state(c, ids[0], ("running",), timeout=30)
            queued = c.get(f"/api/jobs/{ids[2]}").json()
            assert queued["state"] == "queued" and queued["waiting"].startswith("waiting for the GPU worker"), queued
            assert queued["queue_position"] >= 1
            health = c.get("/api/health").json()
            assert health["jobs"]["queued"] + health["jobs"]["running"] == 3
            dropped = c.delete(f"/api/jobs/{ids[2]}")
            assert dropped.status_code == 202 and dropped.json()["state"] == "cancelled", dropped.text
            assert running["state"] == "running"
            stopped = c.delete(f"/api/jobs/{ids[0]}")
            assert stopped.status_code == 202, stopped.text
            job = wait_state(c, ids[0], ("cancelled",), timeout=60)
            assert job["state"] == "cancelled", job
            again = c.delete(f"/api/jobs/{ids[0]}")
            assert again.status_code == 409
            # the worker came back: the next job finishes
            later = wait_state(c, ids[1], ("succeeded",), timeout=60)
            assert len(later["objects"]) == 2
            events = read_events(c, ids[2])
            assert events[-1]["kind"] == "cancelled" and "started" not in [e["kind"] for e in events]
            run = json.loads((tmp_path / "jobs" / ids[0] / "run.json").read_text())
            assert all(s["status"] != "running" for s in run["stages"].values()), run
    finally:
        assert server.stop() in (0, -15)  # uvicorn re-raises the SIGTERM it handled


def test_restart_lists_old_jobs_and_marks_interrupted_ones(tmp_path: Path) -> None:
    args = ("--demo", "--jobs-dir", str(tmp_path / "jobs"), "--set", f"engine.state_dir={tmp_path / 'st'}",
            "--set", "reconstruct.options.delay_s=5")
    server = start_server(*args, log=tmp_path / "serve.log")
    try:
        with server.client() as c:
            res = c.post("/api/jobs", files={"image": ("a.png", photo_bytes(), "image/png")}, data={"prompt": "red"})
            first = res.json()["id"]
            wait_state(c, first, ("running",))
    finally:
        server.proc.kill()  # a crash: no clean shutdown
        server.proc.wait()
    server = start_server(*args[:-2], log=tmp_path / "serve2.log")
    try:
        with server.client() as c:
            job = c.get(f"/api/jobs/{first}").json()
            assert job["state"] == "interrupted" and "interrupted" in job["error"], job
            res = c.post("/api/jobs", files={"image": ("b.png", photo_bytes(), "image/png")}, data={"prompt": "blue"})
            second = res.json()["id"]
            wait_state(c, second, ("succeeded",))
    finally:
        assert server.stop() in (0, -15)  # uvicorn re-raises the SIGTERM it handled
    server = start_server(*args, log=tmp_path / "serve3.log")
    try:
        with server.client() as c:  # a clean stop (SIGTERM) with a job running: marked interrupted, not cancelled
            res = c.post("/api/jobs", files={"image": ("c.png", photo_bytes(), "image/png")}, data={"prompt": "red"})
            third = res.json()["id"]
            wait_state(c, third, ("running",))
    finally:
        assert server.stop() in (0, -15)
    record = json.loads((tmp_path / "jobs" / third / "job.json").read_text())
    assert record["state"] == "interrupted", record
    server = start_server(*args[:-2], log=tmp_path / "serve4.log")
    try:
        with server.client() as c:
            jobs = {j["id"]: j for j in c.get("/api/jobs").json()}
            assert jobs[first]["state"] == jobs[third]["state"] == "interrupted" and jobs[second]["state"] == "succeeded"
            assert c.get(f"/api/jobs/{second}").json()["objects"][0]["label"] == "blue"
            events = read_events(c, second)
            assert events[-1]["kind"] == "succeeded"
    finally:
        assert server.stop() in (0, -15)  # uvicorn re-raises the SIGTERM it handled


def test_a_stalled_upload_does_not_stall_other_requests(demo: tuple[Server, Path]) -> None:
    import socket
    import time
    from urllib.parse import urlparse

    server, _ = demo
    where = urlparse(server.url)
    head = (f"POST /api/jobs HTTP/1.1\r\nHost: 127.0.0.1:{where.port}\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            "Content-Length: 400000\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\n")
    stalled = [socket.create_connection(("127.0.0.1", where.port)) for _ in range(4)]
    try:
        for s in stalled:
            s.sendall(head.encode() + photo_bytes()[:100])  # then nothing more
        time.sleep(0.3)
        with server.client(timeout=5.0) as c:
            t0 = time.monotonic()
            assert c.get("/api/health").status_code == 200
            res = c.post("/api/jobs", files={"image": ("a.png", photo_bytes(), "image/png")}, data={"prompt": "red"})
            assert res.status_code == 202, res.text
            assert wait_state(c, res.json()["id"], ("succeeded",), timeout=5)["state"] == "succeeded"
            assert time.monotonic() - t0 < 5
    finally:
        for s in stalled:
            s.close()


def test_health_reports_gpu_memory_per_device(tmp_path: Path) -> None:
    fake = tmp_path / "bin" / "nvidia-smi"  # a test double of the driver tool: two GPUs
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nprintf '0, NVIDIA H100, 1234, 81559, 7\\n1, NVIDIA H100, 0, 81559, 0\\n'\n")
    fake.chmod(0o755)
    server = start_server("--demo", "--jobs-dir", str(tmp_path / "jobs"), "--set", f"engine.state_dir={tmp_path / 'st'}",
                          log=tmp_path / "serve.log", env={"PATH": f"{fake.parent}:{os.environ['PATH']}"})
    try:
        with server.client() as c:
            health = c.get("/api/health").json()
    finally:
        assert server.stop() in (0, -15)
    assert health["gpus"] == [
        {"index": 0, "name": "NVIDIA H100", "memory_used_mib": 1234, "memory_total_mib": 81559, "utilization_pct": 7},
        {"index": 1, "name": "NVIDIA H100", "memory_used_mib": 0, "memory_total_mib": 81559, "utilization_pct": 0},
    ]
    assert set(health["engine"]["stages"]) == {"segment", "reconstruct"} and health["jobs"]["queued"] == 0
    assert health["envs"]["segment"] == {"env": "demo", "kind": "current", "backend": "demo"}
