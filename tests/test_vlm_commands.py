"""``vlm serve|status|stop`` through their argparse handlers, with the fake vllm env (real processes)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import PROJECT_ROOT, PipelineConfig
from pipeline.errors import UsageError
from pipeline.driver.proc import child_environment, spawn, stop_process_group
from pipeline.driver.vlm_commands import add_vlm_commands, group_alive, state_path
from pipeline.driver.vlm_server import vlm_service
from tests.doubles.vllm_server import free_port, write_fake_vllm_env


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path)
    common.add_argument("--set", action="append", default=[], dest="overrides")
    common.add_argument("--debug", action="store_true")
    parser = argparse.ArgumentParser(prog="pipeline")
    add_vlm_commands(parser.add_subparsers(dest="command", required=True), common)
    return parser


def _call(config: PipelineConfig, *argv: str) -> int:
    args = _parser().parse_args(["vlm", *argv])
    return args.handler(args, config)


@pytest.fixture
def config(tmp_path: Path) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "run": {"out_root": str(tmp_path / "outputs")},
            "envs": {"vllm": {"kind": "venv", "prefix": str(write_fake_vllm_env(tmp_path / "vllm-env"))}},
            "vlm": {"served_name": "test-model", "port": free_port(), "ready_timeout_s": 15},
        }
    )


def test_detach_status_reuse_stop(config, tmp_path, capsys):
    assert _call(config, "status") == 1
    assert "no VLM server" in capsys.readouterr().out

    assert _call(config, "serve", "--detach") == 0
    state = json.loads(state_path(config).read_text())
    assert state["url"] == f"http://127.0.0.1:{config.vlm.port}/v1" and group_alive(state["pgid"])
    try:
        assert _call(config, "serve", "--detach") == 0  # a second serve finds it and starts nothing
        assert "already serves" in capsys.readouterr().out
        assert _call(config, "status") == 0
        assert f"managed server pid {state['pid']}" in capsys.readouterr().out

        run_log = tmp_path / "run-vlm.log"
        with vlm_service(config, log_path=run_log) as url:  # a run reuses it and leaves it up
            assert url == state["url"]
        assert not run_log.exists() and group_alive(state["pgid"])
    finally:
        assert _call(config, "stop", "--grace", "5") == 0
    assert not group_alive(state["pgid"])
    assert not state_path(config).exists()
    assert "stopped the VLM server" in capsys.readouterr().out
    assert _call(config, "stop") == 0 and "no VLM server is running" in capsys.readouterr().out


def test_dry_run_prints_the_command_and_budget_and_starts_nothing(config, capsys):
    assert _call(config, "serve", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "bin/vllm serve Qwen/Qwen3-VL-8B-Thinking --served-model-name test-model" in out
    assert "at least 25.3 GiB" in out
    assert not state_path(config).exists()


def test_stale_state_file_is_cleaned_up_by_status(config, capsys):
    state_path(config).parent.mkdir(parents=True)
    dead = spawn([sys.executable, "-c", "pass"], env=child_environment())
    dead.wait()
    state_path(config).write_text(json.dumps({"pid": dead.pid, "pgid": dead.pid, "url": "x"}))
    assert _call(config, "status") == 1
    assert "stale state file" in capsys.readouterr().out and not state_path(config).exists()


def test_serve_and_stop_refuse_an_external_endpoint(config):
    external = config.model_copy(update={"vlm": config.vlm.model_copy(update={"url": "http://example.invalid/v1"})})
    with pytest.raises(UsageError, match="nothing to serve"):
        _call(external, "serve")
    with pytest.raises(UsageError, match="nothing to stop"):
        _call(external, "stop")


def test_foreground_serve_stops_its_server_on_sigterm(config, tmp_path):
    config_path = tmp_path / "config.json"
    config_path.write_text(config.model_dump_json())
    code = (
        "import sys; from pathlib import Path\n"
        "from pipeline.config import PipelineConfig\n"
        "from tests.test_vlm_commands import _call\n"
        "config = PipelineConfig.model_validate_json(Path(sys.argv[1]).read_text())\n"
        "raise SystemExit(_call(config, 'serve'))\n"
    )
    env = child_environment(pythonpath=[PROJECT_ROOT])
    serve = spawn([sys.executable, "-c", code, str(config_path)], env=env, cwd=PROJECT_ROOT)
    try:
        deadline = time.monotonic() + 20
        while not state_path(config).exists() and time.monotonic() < deadline:
            assert serve.poll() is None, "serve exited early"
            time.sleep(0.1)
        state = json.loads(state_path(config).read_text())
        assert state["detached"] is False and group_alive(state["pgid"])
        os.kill(serve.pid, signal.SIGTERM)
        assert serve.wait(timeout=30) == 0
    finally:
        stop_process_group(serve, grace_s=2)
    assert not group_alive(state["pgid"])
    assert not state_path(config).exists()
