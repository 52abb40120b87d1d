"""``run_agent_with_vllm.sh --image IMG --query ...`` end to end: the script starts the (fake) vLLM server in
its env, the segment worker runs the agent against it, and the server is stopped afterwards — also when the
driver is killed."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from tests.conftest import PROJECT_ROOT, draw_scene, processes_matching
from tests.doubles.vllm_server import free_port, write_fake_vllm_env


def test_agent_script_with_a_managed_server(tmp_path: Path) -> None:
    image = draw_scene(tmp_path / "scene.png")
    port = free_port()
    script = tmp_path / "script.json"
    script.write_text(json.dumps([
        {"content": {"phrases": ["red box"], "reason": "the query asks for red boxes"}, "reasoning": "look for red"},
        {"content": {"decision": "keep", "keep": [{"id": 2, "reason": "the smaller red box"}], "new_phrases": [], "reason": "done"}},
    ]))
    config = {
        "envs": {"vllm": {"kind": "venv", "prefix": str(write_fake_vllm_env(tmp_path / "vllm-env"))}, "sam3": {"kind": "current"}},
        "segment": {"backend": "tests.doubles.segmenters:ColorBlobSegmenterDouble"},
        "vlm": {"port": port, "served_name": "test-model", "ready_timeout_s": 60, "variables": {"VLLM_DOUBLE_SCRIPT": str(script)}},
    }
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    proc = subprocess.run(
        [str(PROJECT_ROOT / "run_agent_with_vllm.sh"), "--image", str(image), "--query", "the smaller red box",
         "--config", str(cfg), "--out", str(out)],
        capture_output=True, text=True, timeout=180, env={**os.environ, "PIPELINE_PYTHON": sys.executable},
    )
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "masks/manifest.json").read_text())
    assert manifest["mode"] == "query" and manifest["query"] == "the smaller red box"
    assert len(manifest["objects"]) == 1 and manifest["objects"][0]["decision"] == "the smaller red box"
    assert manifest["objects"][0]["area"] < 600  # the 21×26 box, not the 31×31 one
    transcript = json.loads((out / "agent/transcript.json").read_text())
    assert len(transcript["requests"]) == 2
    assert (out / "logs/vlm.log").exists()
    assert not (out / "objects").exists(), "the agent script runs the 2D stage only"
    assert processes_matching("tests.doubles.vllm_server", str(port)) == [], "the managed server must be stopped after the stage"


def test_a_killed_driver_takes_its_managed_vllm_server_with_it(tmp_path: Path) -> None:
    """SIGKILL of the driver while the agent waits on the (fake) vLLM server: the child guard stops the server
    within a second and a half, and its port is free again."""
    image = draw_scene(tmp_path / "scene.png")
    port = free_port()
    script = tmp_path / "script.json"
    script.write_text(json.dumps([{"content": {"phrases": ["red box"], "reason": "slow"}, "delay_s": 60}]))
    config = {
        "envs": {"vllm": {"kind": "venv", "prefix": str(write_fake_vllm_env(tmp_path / "vllm-env"))}, "sam3": {"kind": "current"}},
        "segment": {"backend": "tests.doubles.segmenters:ColorBlobSegmenterDouble"},
        "vlm": {"port": port, "served_name": "test-model", "ready_timeout_s": 60, "variables": {"VLLM_DOUBLE_SCRIPT": str(script)}},
        "engine": {"state_dir": str(tmp_path / "state")},
    }  # fmt: skip
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    driver = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "segment", "--image", str(image), "--query", "the red box", "--config", str(cfg),
         "--out", str(tmp_path / "run")],
        cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while not _received_a_chat_request(port):  # the server is up and the agent is waiting on it
            assert driver.poll() is None, driver.stderr.read() if driver.stderr else ""
            assert time.monotonic() < deadline, "the agent's first request never reached the server"
            time.sleep(0.1)
        servers = processes_matching("tests.doubles.vllm_server", f"--port {port}")
        assert servers, "no vLLM server double found by its port"
        driver.kill()
        driver.wait()
        t0 = time.monotonic()
        while processes_matching("tests.doubles.vllm_server", f"--port {port}") and time.monotonic() - t0 < 5:
            time.sleep(0.05)
        assert not processes_matching("tests.doubles.vllm_server", f"--port {port}"), "the server outlived its driver"
        assert time.monotonic() - t0 < 1.5
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, "the port still answers"
    finally:
        if driver.poll() is None:
            driver.kill()
        for pid in processes_matching("tests.doubles.vllm_server", f"--port {port}"):
            os.kill(pid, signal.SIGKILL)


def _received_a_chat_request(port: int) -> bool:
    """Whether the server double on ``port`` answers and has received a chat completion request."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/test/requests", timeout=2) as res:
            return bool(json.loads(res.read()))
    except OSError:
        return False
