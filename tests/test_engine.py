"""The engine's parts without building venvs: workers in the driver's own interpreter (env kind ``current``).

Covers the GPU memory budget arithmetic, what makes a worker reusable (load keys), batch list parsing and its
per-line errors, stale-child records, the per-stage timeout (a hung worker is killed and replaced), cancelling a
queued run, grouped segment jobs reaching the backend's ``prefetch``, the single-run hint of one-shot commands,
and ``current`` keeping ``PYTHONPATH``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.config import PipelineConfig, apply_overrides, load_config
from pipeline.driver.batch import read_items
from pipeline.driver.budget import check_gpu_budget
from pipeline.driver.engine import Engine
from pipeline.driver.envs import resolve_env
from pipeline.driver.lock import run_lock
from pipeline.driver.reaper import process_start_time, stop_stale_children
from pipeline.driver.runner import RunOutcome, RunRequest
from pipeline.driver.workers import load_key
from pipeline.errors import ConfigError, PipelineError, RunCancelled, RunLocked, StageFailed, UsageError
from tests.conftest import draw_scene, run_cli

# ---------------------------------------------------------------------------- GPU memory budget


def _gpu_config(*overrides: str) -> PipelineConfig:
    return apply_overrides(load_config(), ["segment.device=cuda:0", "reconstruct.device=cuda:0", *overrides])


def test_default_pipeline_fits_one_80gb_gpu() -> None:
    check_gpu_budget(load_config(), with_vlm=True, gpu_totals={0: 79.6})  # H100 80GB as nvidia-smi reports it


def test_budget_names_the_gpu_the_parts_and_the_knob() -> None:
    with pytest.raises(ConfigError) as info:
        check_gpu_budget(_gpu_config(), with_vlm=True, gpu_totals={0: 48.0})
    message = info.value.message
    assert "GPU 0 has 48 GiB" in message and "SAM3 8.0" in message and "SAM 3D Objects 32.0" in message
    assert "vlm.gpu_memory_utilization=" in info.value.hint
    # the hinted utilisation makes it fit
    util = info.value.hint.split("vlm.gpu_memory_utilization=")[1].split(";")[0]
    check_gpu_budget(_gpu_config(f"vlm.gpu_memory_utilization={util}"), with_vlm=True, gpu_totals={0: 48.0})


def test_budget_offers_a_spare_gpu_and_counts_prompt_mode_without_vllm() -> None:
    with pytest.raises(ConfigError) as info:
        check_gpu_budget(_gpu_config(), with_vlm=True, gpu_totals={0: 48.0, 1: 48.0})
    assert "=cuda:1" in info.value.hint
    check_gpu_budget(_gpu_config(), with_vlm=False, gpu_totals={0: 48.0})  # 8 + 32 + 1 fits without vLLM


def test_budget_rejects_an_invisible_gpu_and_ignores_cpu_stages() -> None:
    with pytest.raises(ConfigError, match="GPU 3 is named by reconstruct.device"):
        check_gpu_budget(_gpu_config("reconstruct.device=cuda:3"), with_vlm=False, gpu_totals={0: 80.0})
    cpu = apply_overrides(load_config(), ["segment.device=cpu", "reconstruct.device=cpu"])
    check_gpu_budget(cpu, with_vlm=False, gpu_totals={0: 1.0})


def test_a_one_shot_engine_asks_for_gpu_sizes_only_when_a_worker_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.driver.budget as budget

    calls: list[int] = []
    monkeypatch.setattr(budget, "gpu_totals_gib", lambda: calls.append(1) or {0: 16.0})  # too small for SAM 3D
    config = _gpu_config(f"engine.state_dir={tmp_path / 'state'}", "envs.sam3.kind=current",
                         "envs.sam3d-objects.kind=current")
    with Engine(config, single_run=True):  # a rerun whose stages are all up to date starts no worker
        pass
    assert calls == []
    with Engine(config, single_run=True) as engine:
        handle = engine.submit(RunRequest(run_dir=tmp_path / "run", image=draw_scene(tmp_path / "a.png"), prompts=("red",)))
        with pytest.raises(ConfigError, match="GPU 0 has 16 GiB"):
            handle.wait(60)
    assert calls == [1]
    with pytest.raises(ConfigError, match="GPU 0 has 16 GiB"):  # a warm engine refuses at its start
        Engine(config).start()


# ---------------------------------------------------------------------------- worker reuse


def test_request_keys_reuse_the_worker_and_model_keys_do_not() -> None:
    base = load_config()
    assert load_key(apply_overrides(base, ["segment.threshold=0.2", "segment.max_objects=3"]), "segment") == load_key(base, "segment")
    assert load_key(apply_overrides(base, ["reconstruct.seed=7", "reconstruct.frame=opengl"]), "reconstruct") == load_key(base, "reconstruct")
    assert load_key(apply_overrides(base, ["segment.device=cuda:1"]), "segment") != load_key(base, "segment")
    assert load_key(apply_overrides(base, ["reconstruct.backend=pkg.mod:Cls"]), "reconstruct") != load_key(base, "reconstruct")


# ---------------------------------------------------------------------------- batch lists


def test_jsonl_lines_carry_their_options_and_bad_lines_their_number(tmp_path: Path) -> None:
    draw_scene(tmp_path / "a.png")
    lines = [
        json.dumps({"image": "a.png", "prompt": "red, blue", "threshold": 0.3, "out": "mine"}),
        "{not json",
        json.dumps({"prompt": "red"}),
        json.dumps({"image": "a.png"}),
        json.dumps({"image": "a.png", "query": "the red box", "segment.max_objects": 2, "colour": "x"}),
    ]
    (tmp_path / "list.jsonl").write_text("\n".join(lines) + "\n")
    items = read_items(list_file=tmp_path / "list.jsonl", out_root=tmp_path / "out")
    first = items[0]
    assert first.error is None and first.prompts == ("red", "blue") and first.image == tmp_path / "a.png"
    assert first.overrides == ("segment.threshold=0.3",) and first.run_dir == tmp_path / "out" / "mine"
    assert [i.source for i in items] == [f"list.jsonl:{n}" for n in range(1, 6)]
    assert "JSON" in items[1].error and "image" in items[2].error and "query" in items[3].error
    assert "colour" in items[4].error


def test_csv_list_and_default_run_dirs_are_distinct(tmp_path: Path) -> None:
    draw_scene(tmp_path / "a.png")
    draw_scene(tmp_path / "b.png")
    (tmp_path / "list.csv").write_text("image,prompt,seed\na.png,red,1\nb.png,red,\na.png,blue,\n")
    items = read_items(list_file=tmp_path / "list.csv", out_root=tmp_path / "out")
    assert [i.error for i in items] == [None, None, None]
    assert items[0].overrides == ("reconstruct.seed=1",) and items[1].overrides == ()
    assert len({i.run_dir for i in items}) == 3  # same image, other prompt: its own run dir


def test_empty_folder_and_missing_prompt_are_usage_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no images"):
        read_items(images=[str(tmp_path / "empty")], prompts=["red"], out_root=tmp_path / "out")
    draw_scene(tmp_path / "a.png")
    with pytest.raises(UsageError, match="--query"):
        read_items(images=[str(tmp_path / "a.png")], out_root=tmp_path / "out")


# ---------------------------------------------------------------------------- stale children


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen(["sleep", "60"], start_new_session=True)


def test_stale_record_children_are_stopped_only_when_their_start_time_matches(tmp_path: Path) -> None:
    live, reused = _sleeper(), _sleeper()
    try:
        record = {
            "driver_pid": 2**22 + 12345,  # no such process: the driver is gone
            "driver_start": 1,
            "children": [
                {"pid": live.pid, "start": process_start_time(live.pid), "what": "segment worker"},
                {"pid": reused.pid, "start": 1, "what": "a pid since reused"},
            ],
        }
        path = tmp_path / f"children-{socket.gethostname()}-{record['driver_pid']}.json"
        path.write_text(json.dumps(record))
        stopped = stop_stale_children(tmp_path)
        assert live.wait(timeout=5) == -signal.SIGKILL
        assert reused.poll() is None
        assert len(stopped) == 1 and "segment worker" in stopped[0] and not path.exists()
    finally:
        for p in (live, reused):
            p.kill()
            p.wait()


def test_records_of_a_live_driver_are_left_alone(tmp_path: Path) -> None:
    child = _sleeper()
    try:
        record = {"driver_pid": os.getpid(), "driver_start": process_start_time(os.getpid()),
                  "children": [{"pid": child.pid, "start": process_start_time(child.pid)}]}
        path = tmp_path / f"children-{socket.gethostname()}-{os.getpid()}.json"
        path.write_text(json.dumps(record))
        assert stop_stale_children(tmp_path) == [] and child.poll() is None and path.exists()
    finally:
        child.kill()
        child.wait()


# ---------------------------------------------------------------------------- the engine, env kind current


@pytest.fixture
def current_config(tmp_path: Path) -> PipelineConfig:
    """Both stages as workers in this interpreter, with the doubles; state and outputs under tmp_path."""
    return apply_overrides(load_config(), [
        "envs.here.kind=current",
        "segment.env=here", "segment.backend=tests.doubles.faulty:HangingSegmenterDouble",
        "reconstruct.env=here", "reconstruct.backend=tests.doubles.reconstructors:CubeReconstructorDouble",
        f"engine.state_dir={tmp_path / 'state'}", f"run.out_root={tmp_path / 'out'}",
    ])


def _objects(outcome: RunOutcome, stage: str) -> int:
    (result,) = [o.result for o in outcome.stages if o.decision.stage == stage]
    return result["objects"]


def _request(tmp_path: Path, name: str, *prompts: str, stages: tuple[str, ...] = ("segment",)) -> RunRequest:
    return RunRequest(run_dir=tmp_path / "runs" / name, image=draw_scene(tmp_path / f"{name}.png"),
                      prompts=prompts, stages=stages)


def test_a_hung_worker_times_out_and_the_next_run_gets_a_fresh_one(tmp_path: Path, current_config: PipelineConfig) -> None:
    config = apply_overrides(current_config, ["engine.stage_timeout_s=2"])
    with Engine(config) as engine:
        hung = engine.submit(_request(tmp_path, "hung", "hang"))
        mate = engine.submit(_request(tmp_path, "mate", "red"))  # usually in hung's group: requeued, not failed
        deadline = time.monotonic() + 30
        while (hung_pid := engine.health()["stages"]["segment"]["pid"]) is None:
            assert time.monotonic() < deadline, "the segment worker never started"
            time.sleep(0.05)
        with pytest.raises(StageFailed, match="timed out after 2 s"):
            hung.wait(timeout=60)
        assert not Path(f"/proc/{hung_pid}").exists()
        assert _objects(mate.wait(timeout=60), "segment") == 2
        assert _objects(engine.run(_request(tmp_path, "fine", "red")), "segment") == 2
        assert engine.health()["stages"]["segment"]["pid"] not in (None, hung_pid)
    run = json.loads((tmp_path / "runs/hung/run.json").read_text())
    assert run["stages"]["segment"]["status"] == "failed"
    assert not (tmp_path / "runs/hung/masks").exists()


def test_cancel_drops_a_queued_run_and_stops_a_running_one(tmp_path: Path, current_config: PipelineConfig) -> None:
    with Engine(current_config) as engine:
        running = engine.submit(_request(tmp_path, "running", "hang"))
        queued = engine.submit(_request(tmp_path, "queued", "red"))
        deadline = time.monotonic() + 30
        while running.stage != "segment":
            assert time.monotonic() < deadline, "the first run never started"
            time.sleep(0.05)
        assert queued.cancel() and running.cancel()
        for handle in (running, queued):  # queued may wait in the running one's group: it is requeued, then dropped
            with pytest.raises(RunCancelled):
                handle.wait(timeout=30)
            assert handle.state == "cancelled"
        after = engine.run(_request(tmp_path, "after", "blue"))
        assert _objects(after, "segment") == 1
    assert not (tmp_path / "runs/queued/run.json").exists() or json.loads(
        (tmp_path / "runs/queued/run.json").read_text())["stages"]["segment"]["status"] != "succeeded"
    stopped = json.loads((tmp_path / "runs/running/run.json").read_text())["stages"]["segment"]
    assert stopped["status"] == "failed" and stopped["reason"] == "interrupted"


def test_the_next_group_is_opened_while_the_worker_computes_and_stays_queued(tmp_path: Path, current_config: PipelineConfig) -> None:
    config = apply_overrides(current_config, ["engine.segment_group=1"])
    with Engine(config) as engine:
        busy = engine.submit(_request(tmp_path, "busy", "hang"))
        nxt = engine.submit(_request(tmp_path, "next", "red"))
        deadline = time.monotonic() + 30
        while not (busy.stage == "segment" and (tmp_path / "runs/next/input/manifest.json").exists()):
            assert time.monotonic() < deadline, "the next run was not opened while the first one computed"
            time.sleep(0.05)
        assert busy.state == "running" and nxt.state == "queued"  # opened ahead, not yet on the worker
        assert nxt.cancel() and nxt.state == "cancelled"  # dropped at once: no worker had it
        busy.cancel()
        with pytest.raises(RunCancelled):
            busy.wait(timeout=30)
    stage = json.loads((tmp_path / "runs/next/run.json").read_text())["stages"]["segment"]
    assert stage["status"] == "failed" and stage["reason"] == "cancelled before it started"


def test_the_next_stage_worker_loads_while_the_first_stage_computes(tmp_path: Path, current_config: PipelineConfig) -> None:
    with Engine(current_config, single_run=True) as engine:
        run = engine.submit(_request(tmp_path, "both", "hang", stages=("segment", "reconstruct")))
        deadline = time.monotonic() + 30
        while engine.health()["stages"]["reconstruct"]["pid"] is None or run.stage != "segment":
            assert time.monotonic() < deadline, "the reconstruct worker did not start while segment computed"
            time.sleep(0.05)
        assert engine.health()["stages"]["reconstruct"]["state"] == "idle"  # loaded, waiting for the run
        run.cancel()
        with pytest.raises(RunCancelled):
            run.wait(timeout=30)


def test_a_vlm_that_cannot_start_fails_only_the_query_runs(tmp_path: Path, current_config: PipelineConfig) -> None:
    config = apply_overrides(current_config, ["envs.vllm.kind=venv", f"envs.vllm.prefix={tmp_path / 'no-such-env'}"])
    with Engine(config) as engine:
        query = engine.submit(RunRequest(run_dir=tmp_path / "runs/q", image=draw_scene(tmp_path / "q.png"),
                                         query="the red box", stages=("segment",)))
        prompt = engine.submit(_request(tmp_path, "p", "red"))
        again = engine.submit(RunRequest(run_dir=tmp_path / "runs/q2", image=draw_scene(tmp_path / "q2.png"),
                                         query="the blue disc", stages=("segment",)))
        assert _objects(prompt.wait(timeout=60), "segment") == 2
        for handle in (query, again):
            with pytest.raises(PipelineError) as err:
                handle.wait(timeout=60)
            assert "no-such-env" in err.value.message or "no-such-env" in (err.value.hint or "")


def test_waiting_segment_runs_reach_the_backend_as_one_group(tmp_path: Path, current_config: PipelineConfig) -> None:
    log = tmp_path / "prefetch.log"
    config = apply_overrides(current_config, [
        "segment.backend=tests.doubles.faulty:PrefetchLogSegmenterDouble", f"segment.options.prefetch_log={log}",
        "engine.segment_group=4",
    ])
    with Engine(config) as engine:
        handles = [engine.submit(_request(tmp_path, f"r{i}", "red", stages=("segment", "reconstruct"))) for i in range(6)]
        outcomes = [h.wait(timeout=120) for h in handles]
    groups = [int(n) for n in log.read_text().split()]
    assert 1 < max(groups) <= 4 and sum(groups) <= 6  # a lone job is sent alone, without prefetch
    for outcome in outcomes:
        assert _objects(outcome, "reconstruct") == 2
    # the worker's start-up steps (ready event) land in the timings of the first run it served, and only there
    timings = [json.loads((tmp_path / f"runs/r{i}/run.json").read_text())["stages"]["segment"]["timings"] for i in range(6)]
    with_load = [t for t in timings if "load_s" in t]
    assert len(with_load) == 1 and with_load[0]["load_capture_s"] == 0.125
    assert not any("load_capture_s" in t for t in timings if "load_s" not in t)


def test_a_single_run_engine_tells_its_workers_and_a_warm_one_does_not(tmp_path: Path, current_config: PipelineConfig) -> None:
    config = apply_overrides(current_config, ["segment.backend=tests.doubles.faulty:SingleRunHintSegmenterDouble"])
    for name, single_run in (("one", True), ("warm", False)):
        with Engine(config, single_run=single_run) as engine:
            engine.run(_request(tmp_path, name, "red"))
        timings = json.loads((tmp_path / f"runs/{name}/run.json").read_text())["stages"]["segment"]["timings"]
        assert timings["load_single_run"] == (1.0 if single_run else 0.0), (name, timings)


def test_the_one_shot_command_starts_single_run_workers_and_batch_warm_ones(tmp_path: Path, current_config: PipelineConfig) -> None:
    config = apply_overrides(current_config, ["segment.backend=tests.doubles.faulty:SingleRunHintSegmenterDouble"])
    cfg = tmp_path / "config.json"
    cfg.write_text(config.model_dump_json())
    (tmp_path / "photos").mkdir()
    image = draw_scene(tmp_path / "photos/a.png")
    one = run_cli("segment", "--image", str(image), "--prompt", "red", "--out", str(tmp_path / "one"), "--config", str(cfg))
    assert one.returncode == 0, one.stderr
    batch = run_cli("batch", "--images", str(image.parent), "--prompt", "red", "--out", str(tmp_path / "batch"),
                    "--config", str(cfg), "--stages", "segment")  # fmt: skip
    assert batch.returncode == 0, batch.stderr
    (run_json,) = (tmp_path / "batch").glob("*/run.json")
    for path, expected in ((tmp_path / "one/run.json", 1.0), (run_json, 0.0)):
        timings = json.loads(path.read_text())["stages"]["segment"]["timings"]
        assert timings["load_single_run"] == expected, (path, timings)


def test_current_env_keeps_the_drivers_import_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path / 'a'}{os.pathsep}{tmp_path / 'b'}")
    config = apply_overrides(load_config(), ["envs.here.kind=current"])
    path = resolve_env(config, "here").child_env()["PYTHONPATH"].split(os.pathsep)
    assert str(tmp_path / "a") in path and str(tmp_path / "b") in path
    venv = apply_overrides(load_config(), ["envs.v.kind=venv", f"envs.v.prefix={tmp_path / 'v'}"])
    assert str(tmp_path / "a") not in resolve_env(venv, "v", must_exist=False).child_env()["PYTHONPATH"]


def test_a_run_dir_in_use_fails_that_run_only(tmp_path: Path, current_config: PipelineConfig) -> None:
    busy, free = _request(tmp_path, "busy", "red"), _request(tmp_path, "free", "red")
    with run_lock(busy.run_dir), Engine(current_config) as engine:  # as if another batch were writing it
        handles = [engine.submit(busy), engine.submit(free)]
        with pytest.raises(RunLocked, match="is in use by another run"):
            handles[0].wait(timeout=60)
        assert _objects(handles[1].wait(timeout=60), "segment") == 2
    assert not (busy.run_dir / "masks").exists()


def _start_fail_config(current_config: PipelineConfig, tmp_path: Path, failures: str) -> PipelineConfig:
    (tmp_path / "failures").write_text(failures)
    return apply_overrides(current_config, [
        "segment.backend=tests.doubles.faulty:StartFailSegmenterDouble", "engine.max_restarts=2",
        f"segment.options.start_failures={tmp_path / 'failures'}", f"segment.options.start_log={tmp_path / 'starts'}"])


def test_a_worker_that_fails_to_start_is_started_again(tmp_path: Path, current_config: PipelineConfig) -> None:
    config = _start_fail_config(current_config, tmp_path, "once\ntwice\n")
    events: list[str] = []
    with Engine(config, on_event=lambda e: events.append(e.message)) as engine:
        handles = [engine.submit(_request(tmp_path, f"r{i}", "red")) for i in range(3)]
        outcomes = [h.wait() for h in handles]
    assert all(_objects(o, "segment") == 2 for o in outcomes)
    assert (tmp_path / "starts").read_text().count("start") == 3, "two failed starts, then one that worked"
    assert any("failed to start" in m and "try 2 of 3" in m for m in events), events


def test_a_worker_that_never_starts_fails_its_runs_after_the_restarts_without_durations(
        tmp_path: Path, current_config: PipelineConfig) -> None:
    config = _start_fail_config(current_config, tmp_path, "always\n")
    with Engine(config) as engine:
        handles = [engine.submit(_request(tmp_path, f"r{i}", "red")) for i in range(2)]
        for h in handles:
            with pytest.raises(StageFailed, match="failing on purpose at start"):
                h.wait()
    assert (tmp_path / "starts").read_text().count("start") == 3, "1 start + engine.max_restarts=2 restarts"
    for h in handles:
        record = json.loads((h.run_dir / "run.json").read_text())["stages"]["segment"]
        assert record["status"] == "failed" and record["duration_s"] is None, record


def test_closing_the_engine_leaves_every_run_record_final(tmp_path: Path, current_config: PipelineConfig) -> None:
    # the hanging run's group-mates have begun (run.json says running) but wait for the worker; closing the
    # engine stops the worker and hands them back: they must not stay "running"
    engine = Engine(current_config)
    with engine:
        busy = engine.submit(_request(tmp_path, "busy", "hang"))
        mates = [engine.submit(_request(tmp_path, f"mate{i}", "red")) for i in range(2)]
        deadline = time.monotonic() + 30
        while busy.stage != "segment":
            assert time.monotonic() < deadline, "the first run never started"
            time.sleep(0.05)
        time.sleep(0.3)
    for name in ("busy", "mate0", "mate1"):
        path = tmp_path / "runs" / name / "run.json"
        if path.exists():
            stage = json.loads(path.read_text())["stages"].get("segment", {})
            assert stage.get("status") in (None, "failed", "succeeded"), (name, stage)
            assert not list((tmp_path / "runs" / name).glob("*.partial"))
    assert all(h.done() for h in [busy, *mates])
