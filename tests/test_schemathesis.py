"""schemathesis against the OpenAPI description of the JSON routes, on the real server.

Property-based: schemathesis generates requests from ``/openapi.json`` (valid
and invalid parameters) and checks that the server never answers 5xx and that
its answers match the document it publishes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import hypothesis
import pytest

from ledger import encoding
from tests.helpers.server import running_server
from tests.helpers.vectors_data import ledger_vectors

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

V = ledger_vectors()


def _to_msgpack(value: object) -> object:
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    if isinstance(value, list):
        return [_to_msgpack(v) for v in value]
    return value


def _msgpack(ctx: object, value: object) -> bytes:
    """Generated bodies as MessagePack (strings become bin, as records are)."""
    return encoding.pack(_to_msgpack(value))


schemathesis.serializer("application/msgpack")(_msgpack)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("schemathesis")
    with running_server(Path(tmp), V.anchor, V.origin) as srv:
        r = httpx.post(
            srv.url + "/v1/records",
            content=encoding.pack_records(V.records[:8]),
            headers={"content-type": "application/msgpack"},
        )
        assert r.status_code == 200, r.text
        yield srv.url


@pytest.fixture(scope="module")
def api_schema(served: str) -> object:
    return schemathesis.openapi.from_url(served + "/openapi.json").exclude(path="/v1/events")


def test_json_routes_conform_and_never_fail(api_schema: object) -> None:
    """Every operation: generated requests never get a 5xx, and answers match the document."""
    operations = [r.ok() for r in api_schema.get_all_operations()]  # type: ignore[attr-defined]
    assert len(operations) >= 8
    for op in operations:

        @hypothesis.given(case=op.as_strategy())
        @hypothesis.settings(
            max_examples=20,
            deadline=None,
            suppress_health_check=list(hypothesis.HealthCheck),
            database=None,
        )
        def run(case: object) -> None:
            # a schema cannot say "validly signed": positive-data acceptance is
            # meaningless for the signed write routes; every other check runs.
            case.call_and_validate(excluded_checks=[positive_data_acceptance])  # type: ignore[attr-defined]

        run()
