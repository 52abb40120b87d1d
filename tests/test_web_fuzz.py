"""A bounded property-based fuzz of the served OpenAPI schema (schemathesis): no request may get a 5xx."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from tests.web_helpers import Server, photo_bytes, start_server, wait_state

MAX_EXAMPLES = 25  # per operation: ~10 s on 2 cores


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("fuzz")
    server = start_server("--demo", "--jobs-dir", str(root / "jobs"), "--set", f"engine.state_dir={root / 'state'}",
                          "--max-queue", "1000", log=root / "serve.log")
    with server.client() as c:  # one finished job, so ids and file paths can also hit real ones
        job = c.post("/api/jobs", files={"image": ("a.png", photo_bytes(), "image/png")}, data={"prompt": "red"}).json()
        wait_state(c, job["id"], ("succeeded",))
    yield server
    assert server.stop() in (0, -15)


@pytest.fixture(scope="module")
def api_schema(fuzz_server: Server):  # noqa: ANN201 - a schemathesis schema
    return schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case) -> None:  # noqa: ANN001 - a schemathesis Case
    response = case.call(timeout=60)
    case.validate_response(response, checks=[not_a_server_error])
