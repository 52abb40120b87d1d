"""VLMClient against the scripted vLLM double over real HTTP: reasoning fields, JSON validation, retries, errors."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from pipeline.config import PipelineConfig, VLMConfig
from pipeline.errors import VLMError
from pipeline.stages.agent.client import VLMClient, encode_image, parse_answer, split_reasoning
from pipeline.stages.agent.prompts import ProposeAnswer, ReviewAnswer
from tests.doubles.vllm_server import start_test_server

ANSWER = {"phrases": ["red square"], "reason": "the request names a red square"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with start_test_server(log_dir=tmp_path_factory.mktemp("vllm-double")) as srv:
        yield srv


def _config(**vlm) -> VLMConfig:
    base = {"served_name": "test-model", "retries": 1, "request_timeout_s": 10, "image_max_side": 64}
    return PipelineConfig.model_validate({"vlm": {**base, **vlm}}).vlm


def _ask(server, config: VLMConfig | None = None, attempts: list | None = None):
    image = Image.new("RGB", (200, 100), (255, 0, 0))
    on_attempt = attempts.append if attempts is not None else None
    with VLMClient(server.url, config or _config(), on_attempt=on_attempt) as client:
        return client.ask(purpose="propose", system="sys", text="find it", images=[image], answer=ProposeAnswer)


@pytest.mark.parametrize("field", ["reasoning", "reasoning_content", "both", "inline"])
def test_reasoning_is_found_wherever_the_server_puts_it(server, field):
    server.load_script([{"content": ANSWER, "reasoning": "I see a red square.", "reasoning_field": field}])
    reply = _ask(server)
    assert reply.answer.phrases == ["red square"]
    assert reply.reasoning == "I see a red square."
    assert "</think>" not in reply.content
    assert reply.attempts == 1 and reply.usage["prompt_tokens"] > 0


def test_request_carries_schema_downscaled_clean_image_and_sampling(server):
    server.load_script([{"content": ANSWER, "reasoning": "ok"}])
    _ask(server, _config(max_tokens=1234, temperature=0.25))
    (req,) = server.requests()
    assert req["model"] == "test-model"
    assert req["max_completion_tokens"] == 1234 and req["max_tokens"] is None and req["temperature"] == 0.25
    assert req["response_format"]["type"] == "json_schema"
    assert req["response_format"]["json_schema"]["schema"]["required"] == ["phrases", "reason"]
    assert req["images"] == [[64, 32]]  # 200×100 downscaled to a 64 px long side; decoded strictly
    assert req["roles"] == ["system", "user"]


def test_truncated_then_invalid_then_valid_answer_is_retried_within_budget(server):
    server.load_script(
        [
            {"content": "", "reasoning": "long thinking…", "finish_reason": "length"},
            {"content": "{not json", "reasoning": "oops"},
            {"content": ANSWER, "reasoning": "fine"},
        ]
    )
    attempts: list[dict] = []
    reply = _ask(server, _config(retries=2), attempts)
    assert reply.attempts == 3
    assert "finish_reason 'length'" in attempts[0]["error"]
    assert "not valid JSON" in attempts[1]["error"]
    assert attempts[2]["answer"] == ANSWER
    sent = server.requests()
    assert "could not be used" in sent[1]["texts"][-1]  # the retry says what was wrong


def test_exhausted_retry_budget_is_a_vlm_error_naming_the_problem(server):
    server.load_script([{"content": {"phrases": "not a list", "reason": 1}}] * 2)
    with pytest.raises(VLMError, match=r"no usable propose answer in 2 attempt\(s\).*ProposeAnswer schema"):
        _ask(server, _config(retries=1))


def test_http_400_fails_at_once_with_the_server_message(server):
    server.load_script([{"content": ANSWER}])
    bad = "data:image/jpeg;base64,AAAA\nAAAA"  # a line break: vLLM's strict decoder refuses it
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": bad}}]}]
    with VLMClient(server.url, _config()) as client:
        with pytest.raises(VLMError, match="HTTP 400.*Non-base64") as info:
            client.request(purpose="propose", messages=messages, answer=ProposeAnswer)
    assert "base64" in info.value.hint
    assert server.requests() == []  # refused before the script was consulted


def test_model_name_mismatch_is_a_clear_error(server):
    with pytest.raises(VLMError, match=r"serves \['test-model'\], not 'other'"):
        _ask(server, _config(served_name="other", model="also-other"))


def test_model_falls_back_to_vlm_model_when_served_name_is_not_listed(server):
    server.load_script([{"content": ANSWER}])
    assert _ask(server, _config(served_name="nope", model="test-model")).model == "test-model"


def test_unreachable_endpoint_is_a_vlm_error(tmp_path):
    from tests.doubles.vllm_server import free_port

    with pytest.raises(VLMError, match="cannot reach"):
        _ask(type("S", (), {"url": f"http://127.0.0.1:{free_port()}/v1"})())


def test_split_reasoning_and_parse_answer_edge_cases():
    msg = type("M", (), {"content": "<think>a</think>b", "reasoning": None, "model_extra": {}})()
    assert split_reasoning(msg) == ("a", "b")
    msg = type("M", (), {"content": None, "model_extra": {"reasoning": "only thinking"}})()
    assert split_reasoning(msg) == ("only thinking", None)
    assert parse_answer("```json\n" + json.dumps(ANSWER) + "\n```", ProposeAnswer).phrases == ["red square"]
    with pytest.raises(ValueError, match="keep"):
        parse_answer(json.dumps({"decision": "keep", "keep": [], "new_phrases": [], "reason": "x"}), ReviewAnswer)


def test_encode_image_is_clean_base64_and_keeps_aspect():
    url, size = encode_image(Image.new("RGB", (3000, 1000)), 1280)
    assert size == (1280, 427)
    assert url.startswith("data:image/jpeg;base64,") and "\n" not in url and " " not in url


def _vllm_verdicts() -> list[dict]:
    from tests.doubles.vllm_server import SCHEMA_PATH

    path = SCHEMA_PATH.with_name(SCHEMA_PATH.name.replace("request.schema", "verdicts"))
    return json.loads(path.read_text())["probes"]


def test_the_test_server_accepts_and_rejects_exactly_what_vllm_does(server):
    """Each probe's verdict was taken from vLLM's own ChatCompletionRequest (make_vllm_schema.py)."""
    import httpx

    probes = _vllm_verdicts()
    assert any(p["accepted"] for p in probes) and not all(p["accepted"] for p in probes)
    for probe in probes:
        body = probe["body"]
        if isinstance(body, dict) and "model" in body:
            body = {**body, "model": "no-such-model"}  # accepted bodies stop at the model check (404), not the script
        res = httpx.post(server.url + "/chat/completions", json=body, timeout=10)
        assert res.status_code == (404 if probe["accepted"] else 400), (probe, res.text)


@pytest.mark.parametrize("body, content_type, needle, param", [
    (b"not json", "application/json", "JSON decode error", "body.0"),
    (b'{"model": "test-model"}', "application/json", "'messages' is a required property", "body"),
    (b'{"model": "test-model", "messages": [{"content": "hi"}]}', "application/json; charset=utf-8", "not valid", "body.messages.0"),
    (b'{"model": "test-model", "messages": "hi"}', "text/plain", "Unsupported Media Type", None),
])
def test_the_test_server_answers_bad_requests_in_vllms_shape(server, body, content_type, needle, param):
    import httpx

    res = httpx.post(server.url + "/chat/completions", content=body, headers={"Content-Type": content_type}, timeout=10)
    assert res.status_code == 400
    error = res.json()["error"]
    assert error["message"].startswith("1 validation error:\n  ") and needle in error["message"]
    assert (error["type"], error["code"], error["param"]) == ("Bad Request", 400, param)
