"""The agent loop end to end over real HTTP: scripted VLM double + colour-blob segmenter double."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipeline.config import PipelineConfig
from pipeline.errors import VLMError
from pipeline.stages.agent.loop import run_agent
from tests.doubles.segmenters import ColorBlobSegmenterDouble
from tests.doubles.vllm_server import start_test_server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with start_test_server(log_dir=tmp_path_factory.mktemp("vllm-double")) as srv:
        yield srv


def _image() -> Image.Image:
    """300×200: a big red box (id 1 after sorting), a small red box and a blue box."""
    image = Image.new("RGB", (300, 200), (40, 40, 40))
    draw = ImageDraw.Draw(image)
    draw.rectangle([10, 10, 109, 109], fill=(255, 0, 0))  # big red: 100×100
    draw.rectangle([200, 150, 239, 189], fill=(255, 0, 0))  # small red: 40×40
    draw.rectangle([150, 20, 209, 79], fill=(0, 0, 255))  # blue: 60×60
    return image


def _config(**agent) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "vlm": {"served_name": "test-model", "retries": 1, "request_timeout_s": 10, "image_max_side": 128},
            "agent": {"max_rounds": 3, "max_phrases": 4, **agent},
        }
    )


def _run(server, tmp_path, config=None):
    image = _image()
    segmenter = ColorBlobSegmenterDouble(config.segment if config else _config().segment)
    segmenter.set_image(image)  # the worker does this before run_agent
    progress: list[tuple[int, int, str]] = []
    outcome = run_agent(
        segmenter,
        image,
        "the blue box and the bigger red box",
        config=config or _config(),
        vlm_url=server.url,
        out_dir=tmp_path / "agent",
        progress=lambda d, t, m: progress.append((d, t, m)),
    )
    return outcome, segmenter, progress


def _keep(ids, reason="matches"):
    return {"decision": "keep", "keep": [{"id": i, "reason": f"{reason} {i}"} for i in ids], "new_phrases": [], "reason": "done"}


def test_two_rounds_propose_retry_keep(server, tmp_path):
    server.load_script(
        [
            {"content": {"phrases": ["red box"], "reason": "start with red"}, "reasoning": "think 1"},
            {
                "content": {"decision": "retry", "keep": [], "new_phrases": ["blue box"], "reason": "blue missing"},
                "reasoning": "think 2",
                "reasoning_field": "reasoning_content",
            },
            {"content": "{\"decision\": \"keep\"", "reasoning": "cut"},  # invalid JSON: retried
            {"content": _keep([1, 2]), "reasoning": "think 3", "reasoning_field": "inline"},
        ]
    )
    outcome, segmenter, progress = _run(server, tmp_path)

    assert segmenter.encodings == 1  # the image was encoded once, by the caller
    assert outcome.reason is None
    assert outcome.phrases == ["red box", "blue box"]
    # round 2 candidates (pool of both rounds, by score): 1 big red 0.95, 2 blue 0.95, 3 small red 0.90
    labels = [c.label for c in outcome.candidates]
    assert labels == ["red box", "blue box"]
    assert [c.area for c in outcome.candidates] == [100 * 100, 60 * 60]
    assert [c.decision for c in outcome.candidates] == ["matches 1", "matches 2"]
    assert outcome.candidates[0].mask.shape == (200, 300)  # full resolution, not the VLM's copy

    transcript = json.loads((tmp_path / "agent" / "transcript.json").read_text())
    requests = transcript["requests"]
    assert [(r["purpose"], r["attempt"]) for r in requests] == [
        ("propose", 1), ("review", 1), ("review", 1), ("review", 2)
    ]
    assert [r.get("reasoning") for r in requests] == ["think 1", "think 2", "cut", "think 3"]
    assert "not valid JSON" in requests[2]["error"]
    assert requests[3]["answer"]["keep"][1] == {"id": 2, "reason": "matches 2"}
    assert all(r["model"] == "test-model" and r["usage"]["total_tokens"] > 0 for r in requests)
    assert all(r["latency_s"] >= 0 for r in requests)
    assert [len(r["candidates"]) for r in transcript["rounds"]] == [2, 3]
    assert transcript["outcome"]["reason"] is None
    for name in ("overlay_round1.png", "overlay_round2.png"):
        with Image.open(tmp_path / "agent" / name) as overlay:
            assert overlay.size == (300, 200)

    sent = server.requests()
    assert [len(r["images"]) for r in sent] == [1, 2, 2, 2]  # photo; photo + overlay
    assert all(max(size) <= 128 for r in sent for size in r["images"])
    assert '"blue box"' in sent[-1]["texts"][-1] and "last round" not in sent[1]["texts"][-1]
    assert progress[0][1] == 3 and progress[-1][2] == "2 object(s) kept"


def test_no_match_from_the_first_answer_is_a_valid_empty_result(server, tmp_path):
    server.load_script([{"content": {"phrases": [], "reason": "there is no cat in this picture"}}])
    outcome, _, _ = _run(server, tmp_path)
    assert outcome.candidates == []
    assert outcome.reason == "no object matches: there is no cat in this picture"


def test_segmenter_finding_nothing_asks_for_new_phrases_then_review_says_none(server, tmp_path):
    server.load_script(
        [
            {"content": {"phrases": ["cat"], "reason": "a cat"}},
            {"content": {"phrases": ["yellow box"], "reason": "maybe this"}},
            {"content": {"phrases": ["red box"], "reason": "try red"}},
            {"content": {"decision": "none", "keep": [], "new_phrases": [], "reason": "red is not a cat"}},
        ]
    )
    outcome, _, _ = _run(server, tmp_path)
    assert outcome.candidates == [] and outcome.reason == "no object matches: red is not a cat"
    assert outcome.phrases == ["cat", "yellow box", "red box"]
    assert 'SAM 3 found nothing for these phrases: "cat"' in server.requests()[1]["texts"][-1]


def test_last_round_forbids_retry_and_out_of_range_ids(server, tmp_path):
    server.load_script(
        [
            {"content": {"phrases": ["blue box"], "reason": "blue"}},
            {"content": {"decision": "retry", "keep": [], "new_phrases": ["red box"], "reason": "more"}},
            {"content": _keep([7])},
            {"content": _keep([1])},
        ]
    )
    config = _config(max_rounds=1)
    config = config.model_copy(update={"vlm": config.vlm.model_copy(update={"retries": 2})})
    outcome, _, _ = _run(server, tmp_path, config)
    assert [c.label for c in outcome.candidates] == ["blue box"]
    errors = [r.get("error") for r in json.loads((tmp_path / "agent" / "transcript.json").read_text())["requests"]]
    assert "last round" in errors[1] and "only 1..1 exist" in errors[2] and errors[3] is None
    assert "This is the last round" in server.requests()[1]["texts"][-1]


def test_vlm_failure_is_raised_and_the_transcript_says_why(server, tmp_path):
    server.load_script([{"content": "nope"}, {"content": "still nope"}])
    with pytest.raises(VLMError, match="no usable propose answer"):
        _run(server, tmp_path)
    transcript = json.loads((tmp_path / "agent" / "transcript.json").read_text())
    assert "no usable propose answer" in transcript["outcome"]["error"]
    assert len(transcript["requests"]) == 2


def test_kept_masks_are_the_segmenters_masks(server, tmp_path):
    server.load_script([{"content": {"phrases": ["blue box"], "reason": "blue"}}, {"content": _keep([1])}])
    outcome, _, _ = _run(server, tmp_path)
    expected = np.zeros((200, 300), bool)
    expected[20:80, 150:210] = True
    assert np.array_equal(outcome.candidates[0].mask, expected)


def test_segment_worker_query_mode_writes_masks_manifest_and_agent_dir(server, tmp_path):
    """The worker path the runner uses: run_agent inside SegmentWorker, outputs renamed into the run dir."""
    import io

    from pipeline.driver.sources import store_photo
    from pipeline.stages.protocol import Job, Reporter
    from pipeline.stages.segment import SegmentWorker

    run_dir = tmp_path / "run"
    run_dir.mkdir(parents=True)
    _image().save(run_dir.parent / f"{run_dir.name}.png")
    store_photo(run_dir, run_dir.parent / f"{run_dir.name}.png")
    config = _config().model_copy(
        update={"segment": _config().segment.model_copy(update={"backend": "tests.doubles.segmenters:ColorBlobSegmenterDouble"})}
    )
    server.load_script([{"content": {"phrases": ["blue box"], "reason": "blue"}}, {"content": _keep([1], "blue box")}])
    worker = SegmentWorker(config)
    job = Job(id="j", run_dir=str(run_dir), fingerprint="sha256:test", params={"mode": "query", "query": "the blue box", "vlm_url": server.url})
    summary = worker.run(job, config, Reporter(io.StringIO())).result()
    assert summary["objects"] == 1 and worker.segmenter.encodings == 1
    manifest = json.loads((run_dir / "masks" / "manifest.json").read_text())
    assert manifest["mode"] == "query" and manifest["prompts"] == ["blue box"]
    assert manifest["objects"][0]["decision"] == "blue box 1"
    assert (run_dir / "agent" / "transcript.json").exists() and (run_dir / "agent" / "overlay_round1.png").exists()
    assert not (run_dir / "agent.partial").exists()


def test_api_key_is_sent_but_never_written(tmp_path, monkeypatch):
    secret = "sk-agent-test-1a2b3c4d"
    monkeypatch.setenv("AGENT_TEST_KEY", secret)
    with start_test_server(api_key=secret, log_dir=tmp_path) as keyed:
        keyed.load_script([{"content": {"phrases": ["blue box"], "reason": "blue"}}, {"content": _keep([1])}])
        config = _config()
        config = config.model_copy(update={"vlm": config.vlm.model_copy(update={"api_key_env": "AGENT_TEST_KEY"})})
        outcome, _, _ = _run(keyed, tmp_path, config)  # the keyed double answers 401 without the right key
        assert len(outcome.candidates) == 1
        assert secret not in keyed.log_path.read_text()
    for path in (tmp_path / "agent").iterdir():
        assert secret.encode() not in path.read_bytes()


def test_a_group_of_query_jobs_asks_its_first_proposals_ahead_together(server, tmp_path):
    """prepare_group sends every query job's first VLM request at once; each run then uses its own answer."""
    import io

    from pipeline.driver.sources import store_photo
    from pipeline.stages.protocol import Job, Reporter
    from pipeline.stages.segment import SegmentWorker

    config = _config().model_copy(
        update={"segment": _config().segment.model_copy(update={"backend": "tests.doubles.segmenters:ColorBlobSegmenterDouble"})}
    )
    jobs = []
    for i in range(3):
        run_dir = tmp_path / f"run{i}"
        run_dir.mkdir(parents=True)
        _image().save(run_dir.parent / f"{run_dir.name}.png")
        store_photo(run_dir, run_dir.parent / f"{run_dir.name}.png")
        jobs.append(Job(id=f"j{i}", run_dir=str(run_dir), fingerprint="sha256:test",
                        params={"mode": "query", "query": "the blue box", "vlm_url": server.url}))
    propose = {"content": {"phrases": ["blue box"], "reason": "blue"}, "delay_s": 0.3}
    server.load_script([propose] * 3 + [{"content": _keep([1], "blue box")}] * 3)
    worker = SegmentWorker(config)
    worker.prepare_group(jobs, {job.id: config for job in jobs})
    summaries = [worker.run(job, config, Reporter(io.StringIO())).result() for job in jobs]
    assert [s["objects"] for s in summaries] == [1, 1, 1]
    kinds = ["review" if len(r["images"]) == 2 else "propose" for r in server.requests()]
    assert kinds == ["propose"] * 3 + ["review"] * 3  # all three proposals were asked before any review
    for job in jobs:
        transcript = json.loads((Path(job.run_dir) / "agent" / "transcript.json").read_text())
        purposes = [(r["purpose"], r.get("asked_ahead", False)) for r in transcript["requests"]]
        assert purposes == [("propose", True), ("review", False)]
