"""Property-based requests generated from the OpenAPI schema: nothing a client sends gets a 5xx."""
from __future__ import annotations

import time

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.python.asgi import shutdown_lifespans
from service_support import tiny_settings

from app.main import create_app

EXAMPLES_PER_OPERATION = 30


@pytest.fixture(scope="module")
def api_schema(tiny_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("schemathesis-data")
    # Short restore wait: generated restore calls must not each hold the run for long.
    app = create_app(tiny_settings(tiny_dir, data, restore_wait_s=2, max_new_tokens=16))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    ready = schema["/ready"]["GET"]
    deadline = time.monotonic() + 120
    while ready.Case().call().status_code != 200:  # the model loads in the background
        assert time.monotonic() < deadline, "service never became ready"
        time.sleep(0.2)
    yield schema
    shutdown_lifespans()


def test_no_server_errors(api_schema):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 10
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def no_5xx(case) -> None:
            response = case.call()
            assert response.status_code < 500, (
                f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:500]}"
            )

        no_5xx()
