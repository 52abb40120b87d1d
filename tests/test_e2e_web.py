"""The web app on real stage workers in two venvs (the doubles as backends), like ``serve`` with a real config:
submit → SSE → result files, a running job cancelled (its worker restarted, the next job fine), generate_3d."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.conftest import processes_matching
from tests.web_helpers import photo_bytes, read_events, start_server, wait_state

pytestmark = pytest.mark.slow


def test_serve_on_venv_workers(venv_config: Path, tmp_path: Path) -> None:
    server = start_server("--config", str(venv_config), "--jobs-dir", str(tmp_path / "jobs"),
                          "--set", "reconstruct.options.delay_s=0.5", log=tmp_path / "serve.log")
    try:
        with server.client() as c:
            health = c.get("/api/health").json()
            assert health["demo"] is False and health["envs"]["segment"]["kind"] == "venv"
            ids = [c.post("/api/jobs", files={"image": (f"p{i}.png", photo_bytes(), "image/png")},
                          data={"prompt": "red, blue"}).json()["id"] for i in range(2)]
            events = read_events(c, ids[0])
            assert [e["kind"] for e in events][-1] == "succeeded", events
            assert any(e["kind"] == "progress" and e["stage"] == "reconstruct" and e["done"] == 2 for e in events)
            job = c.get(f"/api/jobs/{ids[0]}").json()
            assert job["demo"] is False and [o["label"] for o in job["objects"]] == ["red", "blue"]
            assert c.get(job["scene"]["scene_glb_url"]).content[:4] == b"glTF"
            wait_state(c, ids[1], ("running",))
            for _ in range(500):  # until it reconstructs (0.5 s per object)
                if c.get(f"/api/jobs/{ids[1]}").json().get("stage") == "reconstruct":
                    break
                time.sleep(0.01)
            before = set(processes_matching("pipeline.stages.reconstruct", str(venv_config.parent / "state")))
            assert c.delete(f"/api/jobs/{ids[1]}").status_code == 202
            cancelled = wait_state(c, ids[1], ("cancelled",), timeout=60)
            run = json.loads((tmp_path / "jobs" / ids[1] / "run.json").read_text())
            assert all(s["status"] != "running" for s in run["stages"].values()), run
            assert cancelled["state"] == "cancelled"
            compat = c.post("/api/generate_3d", files={"image": ("x.png", photo_bytes(), "image/png")},
                            data={"text_prompt": "blue"}, timeout=120)
            assert compat.status_code == 200 and compat.json()["num_objects"] == 1, compat.text
            after = set(processes_matching("pipeline.stages.reconstruct", str(venv_config.parent / "state")))
            assert before and after and not (before & after), (before, after)  # the cancelled run's worker was replaced
    finally:
        assert server.stop() in (0, -15), server.log.read_text()
