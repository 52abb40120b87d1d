"""Query mode through the web app: the engine's managed (fake, scripted) vLLM server, the agent's decisions and
transcript in the job detail, as the page shows them."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.doubles.vllm_server import free_port, write_fake_vllm_env
from tests.web_helpers import photo_bytes, start_server, wait_state


def test_query_job_has_decisions_and_transcript(tmp_path: Path) -> None:
    script = tmp_path / "script.json"
    script.write_text(json.dumps([
        {"content": {"phrases": ["blue"], "reason": "the query asks for the box"}, "reasoning": "look for blue"},
        {"content": {"decision": "keep", "keep": [{"id": 1, "reason": "the blue box on the right"}], "new_phrases": [], "reason": "done"}},
    ]))
    config = {
        "envs": {"vllm": {"kind": "venv", "prefix": str(write_fake_vllm_env(tmp_path / "vllm-env"))}, "here": {"kind": "current"}},
        "segment": {"env": "here", "backend": "tests.doubles.segmenters:ColorBlobSegmenterDouble"},
        "reconstruct": {"env": "here", "backend": "tests.doubles.reconstructors:CubeReconstructorDouble"},
        "vlm": {"port": free_port(), "served_name": "test-model", "ready_timeout_s": 60, "variables": {"VLLM_DOUBLE_SCRIPT": str(script)}},
        "engine": {"state_dir": str(tmp_path / "state")},
    }
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    server = start_server("--config", str(cfg), "--jobs-dir", str(tmp_path / "jobs"), log=tmp_path / "serve.log")
    try:
        with server.client() as c:
            res = c.post("/api/jobs", files={"image": ("p.png", photo_bytes(), "image/png")}, data={"query": "the box on the right"})
            assert res.status_code == 202, res.text
            job = wait_state(c, res.json()["id"], ("succeeded", "failed"), timeout=120)
            assert job["state"] == "succeeded", (job["error"], job["hint"], server.log.read_text()[-3000:])
            assert job["mode"] == "query" and job["demo"] is False
            assert [(o["label"], o["decision"]) for o in job["objects"]] == [("blue", "the blue box on the right")], job["objects"]
            rounds = job["transcript"]["rounds"]
            assert rounds[0]["phrases"] == ["blue"] and rounds[0]["decision"]["decision"] == "keep", rounds
            assert c.get("/api/health").json()["engine"]["vlm"]["state"] != "not started"
    finally:
        assert server.stop() in (0, -15)
