"""Fuzz the server's write endpoints through the ASGI app (docs/protocol.md, "HTTP").

The app (``api.app.create_app`` on a :class:`~ledger.storage.MemoryStorage`,
rate limits lifted, a fixed clock) holds the whole vector ledger. The first
byte of an input picks the request, the rest is its body:

- bit 0: ``POST /v1/records`` (0) or ``POST /v1/receipts`` (1);
- bit 1: send ``Content-Type: application/msgpack`` (0) or a wrong or odd one
  picked by bits 2-3.

Oracles: the app never answers 5xx (the internal-error middleware turns an
escaped exception into a 500, so a 500 is a crash); every 4xx is RFC 9457
``application/problem+json`` with a ``type``; the ledger never changes (no
record can be signed by the fuzzer, and the vector ledger is complete:
size and root stay those of the vectors); only the vector receipt is accepted.

Run: ``python fuzz/fuzz_http.py -runs=20000`` (libFuzzer flags).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import _common as common

atheris = common.require_atheris("http")

with atheris.instrument_imports(include=["ledger", "api"]):
    from api.app import create_app
    from api.cli import create_data_dir
    from api.config import Limits, ServerConfig
    from ledger import encoding
    from ledger.storage import MemoryStorage

V = common.ledger_vectors()
RECORDS = common.vector_records()
RECEIPT = bytes.fromhex(V["receipt"]["message"])
SIZE = len(RECORDS)
ROOT = bytes.fromhex(V["final"]["root"])
#: the server's clock: a little after the vector checkpoint.
NOW = float(V["checkpoint"]["timestamp"] + 60)
CONTENT_TYPES = [b"application/json", b"application/msgpack; charset=utf-8", b"", b"APPLICATION/MSGPACK"]
UNLIMITED = Limits(write_rate=1e12, write_burst=1 << 60, receipt_rate=1e12, receipt_burst=1 << 60)

loop = asyncio.new_event_loop()


async def _request(
    app: Any, path: str, body: bytes, content_type: bytes
) -> tuple[int, dict[str, str], bytes]:
    """One request straight through the ASGI interface: (status, headers, body)."""
    headers = [(b"host", b"writ.test"), (b"content-length", str(len(body)).encode())]
    if content_type:
        headers.append((b"content-type", content_type))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("192.0.2.1", 40000),
        "server": ("writ.test", 80),
        "state": {},
    }
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)  # the client never disconnects while the app answers
        return {"type": "http.disconnect"}

    status = 0
    out_headers: dict[str, str] = {}
    chunks: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
            out_headers.update((k.decode("latin-1"), v.decode("latin-1")) for k, v in message["headers"])
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return status, out_headers, b"".join(chunks)


def _start() -> tuple[Any, Any]:
    """The app with its lifespan entered; keep both (a collected lifespan closes the storage)."""
    data_dir = Path(tempfile.mkdtemp(prefix="writ-fuzz-http-")) / "data"
    storage = MemoryStorage()
    try:
        loop.run_until_complete(create_data_dir(data_dir, common.anchor(), common.origin(), storage=storage))
        config = ServerConfig(data_dir=data_dir, checkpoint_interval=3600.0, limits=UNLIMITED)
        app = create_app(config, storage=storage, clock=lambda: NOW)
        lifespan = app.router.lifespan_context(app)
        loop.run_until_complete(lifespan.__aenter__())
    finally:  # the app has read its identity and log key: nothing else needs the directory
        shutil.rmtree(data_dir.parent, ignore_errors=True)
    status, _, body = loop.run_until_complete(
        _request(app, "/v1/records", encoding.pack_records(RECORDS), b"application/msgpack")
    )
    assert status == 200, (status, body)
    svc = app.state.service
    assert (svc.size, svc.root) == (SIZE, ROOT), "the server does not hold the vector ledger"
    return app, lifespan


APP, LIFESPAN = _start()


def test_one_input(data: bytes) -> None:
    if not data:
        return
    mode, body = data[0], data[1:]
    path = "/v1/receipts" if mode & 1 else "/v1/records"
    content_type = CONTENT_TYPES[(mode >> 2) & 3] if mode & 2 else b"application/msgpack"
    status, headers, payload = loop.run_until_complete(_request(APP, path, body, content_type))
    if status >= 500 or status < 200:
        raise AssertionError(f"{path} answered {status}: {payload[:500]!r}")
    if status >= 400:
        if not headers.get("content-type", "").startswith("application/problem+json"):
            raise AssertionError(f"{path} {status} is not problem+json: {headers}")
        problem = json.loads(payload)
        if not isinstance(problem.get("type"), str) or problem.get("status") not in (None, status):
            raise AssertionError(f"{path} {status}: malformed problem {problem}")
    elif path == "/v1/records" or body != RECEIPT:
        raise AssertionError(f"{path} accepted {body.hex()}: {payload[:500]!r}")
    svc = APP.state.service
    if (svc.size, svc.root) != (SIZE, ROOT):
        raise AssertionError(f"the ledger changed: size {svc.size}")


if __name__ == "__main__":
    common.main("http", test_one_input)
