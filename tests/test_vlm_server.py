"""vLLM server lifecycle against the test double started through a fake ``vllm`` env (real processes, real HTTP).

The fake env's ``bin/vllm`` execs ``python -m tests.doubles.vllm_server`` with the argv the tool builds, so
these tests exercise the real spawn, readiness loop and teardown; only the model is missing.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import PROJECT_ROOT, PipelineConfig
from pipeline.errors import EnvNotFound, ServiceNotReady
from pipeline.driver.proc import child_environment, spawn, stop_process_group
from pipeline.driver.vlm_server import memory_budget, probe, vllm_argv, vlm_service
from tests.doubles.vllm_server import CRASH_MESSAGE, free_port, start_test_server, write_fake_vllm_env


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _child_pid(log_path: Path, timeout_s: float = 10.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if log_path.exists():
            for line in log_path.read_text().splitlines():
                if line.startswith("# started pid="):
                    return int(line.split("pid=")[1].split()[0])
        time.sleep(0.05)
    raise AssertionError(f"no child pid in {log_path}")


@pytest.fixture
def fake_env(tmp_path: Path) -> Path:
    return write_fake_vllm_env(tmp_path / "vllm-env")


def _config(fake_env: Path, tmp_path: Path, *, port: int | None = None, **vlm) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "run": {"out_root": str(tmp_path / "outputs")},
            "envs": {"vllm": {"kind": "venv", "prefix": str(fake_env)}},
            "vlm": {
                "served_name": "test-model",
                "port": port or free_port(),
                "ready_timeout_s": 15,
                **vlm,
            },
        }
    )


def test_argv_is_the_documented_vllm_serve_command():
    config = PipelineConfig.model_validate({"vlm": {"extra_args": ["--enforce-eager"], "gpus": "1"}})
    assert vllm_argv(config) == [
        "vllm", "serve", "Qwen/Qwen3-VL-8B-Thinking",
        "--served-model-name", "qwen3-vl-8b-thinking",
        "--host", "127.0.0.1", "--port", "8001",
        "--max-model-len", "32768",
        "--gpu-memory-utilization", "0.45",
        "--limit-mm-per-prompt", '{"image":4,"video":0}',
        "--tensor-parallel-size", "1",
        "--mm-processor-cache-gb", "0",
        "--reasoning-parser", config.vlm.reasoning_parser,
        "--enforce-eager",
    ]


def test_api_key_in_extra_args_is_refused():
    config = PipelineConfig.model_validate({"vlm": {"extra_args": ["--api-key=abc"]}})
    with pytest.raises(ServiceNotReady, match="api-key"):
        vllm_argv(config)


def test_memory_budget_for_qwen3_vl_8b():
    budget = memory_budget(PipelineConfig(), gpu_total_gib=80.0)
    assert budget.weights == 16.8
    assert budget.kv_one_sequence == 4.5  # 32768 tokens × 144 KiB
    assert budget.minimum == pytest.approx(25.3)
    assert budget.reserved == 36.0  # 0.45 × 80
    assert 100_000 < budget.kv_tokens < 120_000
    assert memory_budget(PipelineConfig.model_validate({"vlm": {"model": "some/other-model"}})) is None


def test_managed_server_starts_after_a_slow_startup_and_is_stopped(fake_env, tmp_path):
    config = _config(fake_env, tmp_path, variables={"VLLM_DOUBLE_STARTUP_DELAY": "1.0"}, gpus="3")
    log_path = tmp_path / "vllm.log"
    t0 = time.monotonic()
    with vlm_service(config, log_path=log_path) as url:
        assert time.monotonic() - t0 >= 1.0  # refused connections were waited out, not fatal
        assert url == f"http://127.0.0.1:{config.vlm.port}/v1"
        assert probe(url, health=False).models == ["test-model"]
        pid = _child_pid(log_path)
        assert _alive(pid)
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert b"CUDA_VISIBLE_DEVICES=3" in environ
    assert not _alive(pid)
    assert "--served-model-name test-model" in log_path.read_text()


def test_readiness_timeout_is_bounded_and_stops_the_child(fake_env, tmp_path):
    config = _config(fake_env, tmp_path, ready_timeout_s=1.0, variables={"VLLM_DOUBLE_STARTUP_DELAY": "60"})
    log_path = tmp_path / "vllm.log"
    t0 = time.monotonic()
    with pytest.raises(ServiceNotReady, match=r"not ready after 1 s") as info:
        with vlm_service(config, log_path=log_path):
            pytest.fail("must not become ready")
    assert time.monotonic() - t0 < 8
    assert "scripted delay" in info.value.message  # the log's tail is in the error
    assert not _alive(_child_pid(log_path))


def test_a_child_that_crashes_is_reported_at_once_with_the_log_tail(fake_env, tmp_path):
    config = _config(fake_env, tmp_path, ready_timeout_s=120, variables={"VLLM_DOUBLE_CRASH": "1"})
    t0 = time.monotonic()
    with pytest.raises(ServiceNotReady, match="exited with code 1") as info:
        with vlm_service(config, log_path=tmp_path / "vllm.log"):
            pass
    assert time.monotonic() - t0 < 10  # not after the 120 s timeout
    assert CRASH_MESSAGE in info.value.message
    assert "gpu_memory_utilization" in info.value.hint


def test_a_busy_port_is_reported_before_anything_starts(fake_env, tmp_path):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        config = _config(fake_env, tmp_path, port=port, ready_timeout_s=120)
        t0 = time.monotonic()
        with pytest.raises(ServiceNotReady, match=f"port {port} on 127.0.0.1 is"):
            with vlm_service(config, log_path=tmp_path / "vllm.log"):
                pass
        assert time.monotonic() - t0 < 10
    assert not (tmp_path / "vllm.log").exists()  # nothing was spawned


def test_a_child_that_cannot_bind_exits_and_is_reported(fake_env, tmp_path, monkeypatch):
    # The pre-check can race with another process taking the port; then vLLM itself fails to bind.
    import pipeline.driver.vlm_server as server

    monkeypatch.setattr(server, "_check_port", lambda config, found: None)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        port = squatter.getsockname()[1]  # bound, not listening: probes are refused, bind fails
        config = _config(fake_env, tmp_path, port=port, ready_timeout_s=120)
        with pytest.raises(ServiceNotReady, match="exited with code") as info:
            with vlm_service(config, log_path=tmp_path / "vllm.log"):
                pass
    assert "address already in use" in info.value.message.lower()


def test_a_server_already_answering_is_reused_and_left_running(fake_env, tmp_path):
    with start_test_server(log_dir=tmp_path) as running:
        config = _config(fake_env, tmp_path, port=running.port)
        with vlm_service(config, log_path=tmp_path / "vllm.log") as url:
            assert url == running.url
        assert running.proc.poll() is None
        assert probe(running.url, health=False).models == ["test-model"]
    assert not (tmp_path / "vllm.log").exists()


def test_another_model_on_the_port_is_not_mistaken_for_ours(fake_env, tmp_path):
    with start_test_server(served_name="other-model", log_dir=tmp_path) as running:
        config = _config(fake_env, tmp_path, port=running.port)
        with pytest.raises(ServiceNotReady, match=r"taken by another server serving \['other-model'\]"):
            with vlm_service(config, log_path=tmp_path / "vllm.log"):
                pass


def test_external_endpoint_is_checked_and_used_without_starting_anything(tmp_path):
    with start_test_server(log_dir=tmp_path) as running:
        config = PipelineConfig.model_validate(
            {"envs": {}, "vlm": {"url": running.url + "/", "served_name": "test-model"}}
        )
        with vlm_service(config, log_path=tmp_path / "vllm.log") as url:
            assert url == running.url
        wrong = PipelineConfig.model_validate({"vlm": {"url": running.url, "served_name": "x", "model": "y"}})
        with pytest.raises(ServiceNotReady, match=r"lists \['test-model'\]; expected 'x' or 'y'"):
            with vlm_service(wrong, log_path=tmp_path / "vllm.log"):
                pass
    dead = PipelineConfig.model_validate({"vlm": {"url": f"http://127.0.0.1:{free_port()}/v1"}})
    with pytest.raises(ServiceNotReady, match="does not answer"):
        with vlm_service(dead, log_path=tmp_path / "vllm.log"):
            pass


def test_missing_env_is_env_not_found(tmp_path):
    config = PipelineConfig.model_validate(
        {"envs": {"vllm": {"kind": "venv", "prefix": str(tmp_path / "nope")}}, "vlm": {"port": free_port()}}
    )
    with pytest.raises(EnvNotFound, match="envs create vllm"):
        with vlm_service(config, log_path=tmp_path / "vllm.log"):
            pass


def test_api_key_reaches_the_server_by_environment_only(fake_env, tmp_path, monkeypatch):
    secret = "sk-test-9f8e7d6c5b4a"
    monkeypatch.setenv("MY_VLM_KEY", secret)
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    config = _config(fake_env, tmp_path, api_key_env="MY_VLM_KEY")
    log_path = tmp_path / "vllm.log"
    assert secret not in " ".join(vllm_argv(config))
    with vlm_service(config, log_path=log_path) as url:  # ready only if the probes' key matched the server's
        pid = _child_pid(log_path)
        assert secret.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        assert probe(url, health=False).status == 401  # the double really demands the key
    assert secret not in log_path.read_text()


def test_ctrl_c_during_startup_leaves_no_child(fake_env, tmp_path):
    config = _config(fake_env, tmp_path, ready_timeout_s=120, variables={"VLLM_DOUBLE_STARTUP_DELAY": "60"})
    config_path = tmp_path / "config.json"
    config_path.write_text(config.model_dump_json())
    log_path = tmp_path / "vllm.log"
    driver_code = (
        "import sys; from pathlib import Path\n"
        "from pipeline.config import PipelineConfig\n"
        "from pipeline.driver.vlm_server import vlm_service\n"
        "config = PipelineConfig.model_validate_json(Path(sys.argv[1]).read_text())\n"
        "with vlm_service(config, log_path=Path(sys.argv[2])):\n"
        "    raise SystemExit('became ready: unexpected')\n"
    )
    env = child_environment(pythonpath=[PROJECT_ROOT])
    driver = spawn([sys.executable, "-c", driver_code, str(config_path), str(log_path)], env=env, cwd=PROJECT_ROOT)
    try:
        child = _child_pid(log_path)
        deadline = time.monotonic() + 10
        while "scripted delay" not in log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)  # the child is up and loading
        assert _alive(child)
        os.kill(driver.pid, signal.SIGINT)
        code = driver.wait(timeout=30)
    finally:
        stop_process_group(driver, grace_s=2)
    assert code != 0
    assert not _alive(child)
    with pytest.raises(ProcessLookupError):
        os.killpg(child, 0)  # nothing left in the server's process group either


def test_the_server_receives_the_whole_argv(fake_env, tmp_path):
    # The fake bin/vllm passes through every flag vllm_argv builds (unknown ones are ignored by the double).
    config = _config(fake_env, tmp_path, extra_args=["--enforce-eager"])
    log_path = tmp_path / "vllm.log"
    with vlm_service(config, log_path=log_path):
        pass
    text = log_path.read_text()
    assert f"served=test-model port={config.vlm.port}" in text  # the double parsed the flags it needs
    assert "'--enforce-eager'" in text.split("ignored=")[1]  # extra_args reached the server
    assert json.dumps({"image": 4, "video": 0}, separators=(",", ":")) in text


def test_docs_show_the_command_the_tool_runs():
    from pipeline.config import load_config
    from pipeline.driver.vlm_server import format_argv

    command = format_argv(vllm_argv(load_config(), executable=".envs/vllm/bin/vllm"))
    assert command in (PROJECT_ROOT / "docs" / "vlm.md").read_text()


def test_a_port_that_is_only_bound_is_busy():
    # vLLM binds its port (SO_REUSEADDR) before loading the model and listens only when ready: minutes in which
    # the port looks free to a bind test that sets SO_REUSEADDR itself.
    from pipeline.driver.vlm_server import _port_is_free

    with socket.socket() as loading:
        loading.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        loading.bind(("127.0.0.1", 0))
        port = loading.getsockname()[1]
        assert not _port_is_free("127.0.0.1", port)
    assert _port_is_free("127.0.0.1", port)


def test_connections_left_in_time_wait_do_not_make_a_port_busy():
    from pipeline.driver.vlm_server import _port_is_free, _tcp_states

    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = listener.accept()
        conn.close()  # the server side closes first: its end of the connection stays in TIME_WAIT
        time.sleep(0.1)
        client.close()
    time.sleep(0.1)
    if _tcp_states(port) != {"06"}:
        pytest.skip(f"no TIME_WAIT entry for the port here (states {_tcp_states(port)})")
    assert _port_is_free("127.0.0.1", port)


def test_a_loading_test_server_holds_its_port_like_vllm(tmp_path):
    # The double binds at start and listens after its startup delay, as vLLM does.
    from pipeline.driver.vlm_server import _port_is_free

    port = free_port()
    log = tmp_path / "double.log"
    with log.open("ab") as out:
        proc = spawn([sys.executable, "-m", "tests.doubles.vllm_server", "--port", str(port), "--startup-delay", "30"],
                     env=child_environment(pythonpath=[PROJECT_ROOT]), cwd=PROJECT_ROOT, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 20
        while "loading weights" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "loading weights" in log.read_text(), log.read_text()
        assert not _port_is_free("127.0.0.1", port), "a loading server's port must count as busy"
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        stop_process_group(proc, grace_s=5)
