"""ledger.client: one fetch layer, two faces, one answer -> error table.

Every server answer below is served to the sync face (the CLI's) and to the
async face (devices, the agent, the fleet), plain and as an event stream, and
must raise the same error class on each."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator, Callable, Iterator

import httpx
import pytest

from ledger.client import AsyncClient, Client, problem_error
from ledger.errors import (
    BadMessage,
    BadSignature,
    HTTPStatusError,
    ResponseTooLarge,
    StaleHead,
    StorageError,
    TransportError,
    UnknownDevice,
    UsageError,
    WritError,
)

BASE = "http://log.test"
Handler = Callable[[httpx.Request], httpx.Response]


def problem(status: int, name: str, **extra: object) -> httpx.Response:
    doc = {"type": f"urn:writ:problem:{name}", "title": name, "status": status, "detail": f"{name}!", **extra}
    return httpx.Response(status, json=doc, headers={"Content-Type": "application/problem+json"})


#: (what the server answers, the error every face raises, the problem name kept)
TABLE: list[tuple[str, Callable[[], httpx.Response], type[WritError], str | None]] = [
    ("409 stale-head", lambda: problem(409, "stale-head", seq=7), StaleHead, None),
    ("422 bad-signature", lambda: problem(422, "bad-signature", seq=3), BadSignature, None),
    ("400 bad-message", lambda: problem(400, "bad-message"), BadMessage, None),
    ("422 unknown-device", lambda: problem(422, "unknown-device"), UnknownDevice, None),
    ("503 storage-error", lambda: problem(503, "storage-error"), StorageError, None),
    ("404 bad-tile-path", lambda: problem(404, "bad-tile-path"), HTTPStatusError, "bad-tile-path"),
    ("404 not-found", lambda: problem(404, "not-found"), HTTPStatusError, "not-found"),
    ("429 rate-limited", lambda: problem(429, "rate-limited"), HTTPStatusError, "rate-limited"),
    ("503 overloaded", lambda: problem(503, "overloaded"), HTTPStatusError, "overloaded"),
    ("500 html", lambda: httpx.Response(500, text="<h1>oops</h1>"), HTTPStatusError, None),
    ("502 json not a problem", lambda: httpx.Response(502, json=[1, 2]), HTTPStatusError, None),
    ("an unknown problem", lambda: problem(418, "teapot"), HTTPStatusError, "teapot"),
    ("a foreign problem type", lambda: httpx.Response(409, json={"type": "stale-head"}), HTTPStatusError, None),  # noqa: E501
    ("302 redirect", lambda: httpx.Response(302, headers={"Location": "http://x.test/"}), HTTPStatusError, None),  # noqa: E501
]  # fmt: skip


def sync_face(handler: Handler) -> Client:
    return Client(BASE, http=httpx.Client(transport=httpx.MockTransport(handler)))


def async_face(handler: Handler, timeout: float = 5.0) -> AsyncClient:
    async def ahandler(request: httpx.Request) -> httpx.Response:
        return handler(request)

    return AsyncClient(BASE, transport=httpx.MockTransport(ahandler), timeout=timeout)


def raised_sync(handler: Handler, cap: int = 1 << 20) -> WritError:
    with sync_face(handler) as c, pytest.raises(WritError) as e:
        c.request("GET", "/checkpoint", cap=cap, retries=0)
    return e.value


def raised_async(handler: Handler, cap: int = 1 << 20, timeout: float = 5.0) -> WritError:
    async def go() -> None:
        async with async_face(handler, timeout) as c:
            await c.get("/checkpoint", cap=cap)

    with pytest.raises(WritError) as e:
        asyncio.run(go())
    return e.value


def raised_stream(handler: Handler) -> WritError:
    async def go() -> None:
        async with async_face(handler) as c, c.stream("/v1/events") as resp:
            async for _ in resp.aiter_raw():
                pass

    with pytest.raises(WritError) as e:
        asyncio.run(go())
    return e.value


@pytest.mark.parametrize(("answer", "cls", "name"), [t[1:] for t in TABLE], ids=[t[0] for t in TABLE])
def test_every_answer_is_the_same_error_on_every_face(
    answer: Callable[[], httpx.Response], cls: type[WritError], name: str | None
) -> None:
    errors = [raised(lambda r: answer()) for raised in (raised_sync, raised_async, raised_stream)]
    for err in errors:
        assert type(err) is cls, (type(err), err.message)
        assert err.detail["http_status"] == answer().status_code
        if cls is HTTPStatusError:
            assert err.detail["status"] == answer().status_code and err.detail["problem"] == name
    if cls is StaleHead:
        assert all(isinstance(e, StaleHead) and e.seq == 7 for e in errors)


def test_problem_error_keeps_no_control_characters_or_passwords() -> None:
    body = json.dumps({"type": "urn:writ:problem:bad-message", "detail": "a\x1b[31m http://u:pw@h/ b"})
    err = problem_error(400, "application/problem+json", body.encode(), "/v1/records")
    assert isinstance(err, BadMessage) and "\x1b" not in err.message and "pw" not in err.message


def test_a_redirect_is_never_followed() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(301, headers={"Location": "http://elsewhere.test/checkpoint"})

    for raised in (raised_sync, raised_async, raised_stream):
        seen.clear()
        assert isinstance(raised(handler), HTTPStatusError)
        assert seen == [BASE + "/checkpoint"] or seen == [BASE + "/v1/events"]


def test_a_redirect_is_refused_even_by_a_client_that_follows_them() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        if request.url.host == "elsewhere.test":
            return httpx.Response(200, text="a valid-looking answer")
        return httpx.Response(302, headers={"Location": "http://elsewhere.test/checkpoint"})

    http = httpx.Client(transport=httpx.MockTransport(handler), follow_redirects=True)
    with Client(BASE, http=http) as c, pytest.raises(HTTPStatusError):
        c.checkpoint()
    assert seen == ["log.test"]


def _chunks(total: int) -> Iterator[bytes]:
    for _ in range(total // 4096):
        yield b"x" * 4096


async def _achunks(total: int) -> AsyncIterator[bytes]:
    for _ in range(total // 4096):
        yield b"x" * 4096


@pytest.mark.parametrize("how", ["announced", "chunked", "gzip-bomb"])
def test_the_byte_cap_holds_on_both_faces(how: str) -> None:
    cap = 64 * 1024

    def answer(asynchronous: bool) -> Handler:
        def handler(request: httpx.Request) -> httpx.Response:
            if how == "announced":
                return httpx.Response(200, headers={"Content-Length": str(cap * 100)}, content=b"x" * 10)
            if how == "gzip-bomb":
                bomb = gzip.compress(bytes(cap * 64))
                return httpx.Response(200, headers={"Content-Encoding": "gzip"}, content=bomb)
            return httpx.Response(200, content=_achunks(cap * 4) if asynchronous else _chunks(cap * 4))

        return handler

    for err in (raised_sync(answer(False), cap), raised_async(answer(True), cap)):
        assert isinstance(err, ResponseTooLarge), err.message


def test_a_slow_server_hits_the_total_deadline() -> None:
    async def crawl() -> AsyncIterator[bytes]:
        for _ in range(100):
            await asyncio.sleep(0.05)
            yield b"x"

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=crawl())

    async def go() -> None:
        async with AsyncClient(BASE, transport=httpx.MockTransport(handler), timeout=0.3) as c:
            await c.get("/checkpoint", cap=1000)

    with pytest.raises(TransportError, match=r"within 0\.3 s"):
        asyncio.run(go())


@pytest.mark.parametrize("exc", [httpx.ConnectError("refused"), httpx.ReadTimeout("slow")])
def test_no_answer_is_unreachable_on_both_faces(exc: Exception) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    for err in (raised_sync(handler), raised_async(handler), raised_stream(handler)):
        assert type(err) is TransportError and err.type == "unreachable"


def test_requests_ask_for_identity_and_retry_a_short_retry_after() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if len(seen) == 1:
            return httpx.Response(429, headers={"Retry-After": "0"})
        return httpx.Response(200, text="note\n")

    with sync_face(handler) as c:
        assert c.checkpoint() == "note\n"
    assert len(seen) == 2 and all(r.headers["accept-encoding"] == "identity" for r in seen)


def test_a_bad_server_url_is_a_usage_error() -> None:
    with pytest.raises(UsageError):
        Client("ftp://log.test")
