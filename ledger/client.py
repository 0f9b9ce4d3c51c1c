"""The one HTTP fetch layer of every Writ client: a sync face and an async face.

:class:`BaseClient` holds what both faces share (after httpx's own
``BaseClient``): building a request (the base URL, ``Accept-Encoding:
identity``, the user agent), reading the answer within a byte cap whatever
its encoding claims (:class:`ledger.transport.BoundedBody`), the deadlines,
the retry policy (429/503 with a short ``Retry-After``), redirects refused,
and the one mapping of an answer to an error (:func:`problem_error`). The
faces only do the I/O:

- :class:`Client`, synchronous, for the ``writ`` commands (and the fleet's
  integrator, from a worker thread): the ledger API (checkpoint, records,
  ``POST /v1/records``...).
- :class:`AsyncClient`, for devices, the device agent and the fleet: bytes
  with a total deadline per request (a slow-loris server raises
  :class:`~ledger.errors.TransportError` instead of hanging the device), raw
  exchanges for answers the caller judges itself (receipts), and
  :meth:`AsyncClient.stream` for an event stream (same caps, same errors).
  A custom ``httpx.AsyncBaseTransport`` (the fleet's fast transport, a tile
  cache) plugs in under it through ``transport=`` or a given
  ``httpx.AsyncClient``.

Every failure is a :class:`~ledger.errors.WritError`: no answer, a timeout
or a refused redirect is a ``TransportError`` (``unreachable``,
``http-error``, ``response-too-large``); an answer whose problem+json
``type`` names one of our own rejections is that class
(``urn:writ:problem:stale-head`` -> :class:`~ledger.errors.StaleHead`), on
both faces alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Self

import httpx

from .encoding import MAX_RECORD, pack_records, unpack_records
from .errors import (
    BadMessage,
    BadTilePath,
    HTTPStatusError,
    RecordRejected,
    ResponseTooLarge,
    StorageError,
    TransportError,
    UsageError,
    VerificationError,
    WritError,
    by_type,
)
from .redact import redact
from .transport import IDENTITY, BoundedBody

__all__ = [
    "CAP_JSON",
    "CAP_NOTE",
    "CAP_RECORDS",
    "PAGE",
    "PROBLEM_PREFIX",
    "AsyncClient",
    "BaseClient",
    "Client",
    "Deadlines",
    "clean",
    "normalise_server",
    "parse_json",
    "problem_error",
]

#: records per ``GET/POST /v1/records`` (the server's limit).
PAGE = 1000
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 30.0
CAP_NOTE = 1 << 20
CAP_RECORDS = PAGE * MAX_RECORD + 64 * 1024
CAP_JSON = 16 << 20
#: the part of an error answer that is read for its problem+json
CAP_PROBLEM = 64 * 1024
USER_AGENT = "writ/0.1"
PROBLEM_PREFIX = "urn:writ:problem:"
#: a ``Retry-After`` longer than this is not waited for (the error is raised).
MAX_RETRY_AFTER = 10.0

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class Deadlines:
    """Connect and read timeouts (seconds), and a total deadline per request
    (connect to last byte; enforced by the async face)."""

    connect: float = CONNECT_TIMEOUT
    read: float = READ_TIMEOUT
    total: float | None = None

    def httpx(self) -> httpx.Timeout:
        return httpx.Timeout(self.read, connect=self.connect)


def clean(text: object, limit: int = 300) -> str:
    """Text from the network or an exception, fit for a message: no control
    characters, no URL password, at most ``limit`` characters."""
    s = redact(_CONTROL.sub(" ", str(text)))
    return s if len(s) <= limit else s[: limit - 1] + "…"


def normalise_server(url: str | None) -> str:
    """A server's base URL (http or https, no trailing slash), or :class:`UsageError`."""
    if not url:
        raise UsageError("--server URL is required")
    u = url.strip().rstrip("/")
    if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", u):
        raise UsageError(f"--server must be an http:// or https:// URL, not {redact(clean(url, 80))!r}")
    return u


def parse_json(body: bytes, what: str) -> Any:
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise HTTPStatusError(f"the server's answer to {what} is not JSON") from None


# --- the one answer -> error table ----------------------------------------------

#: problem types that map onto our own error classes: a rejection of what we sent
#: (a record rule, a malformed message, the storage failing). Not mapped:
#: HTTP-level problems (rate-limited, overloaded, not-found...) and
#: ``bad-tile-path``, the server's "no such tile" (a 404: an answer about the
#: request, never a verdict on data), which stay :class:`HTTPStatusError`.
_MAPPABLE = (VerificationError, StorageError)
_NOT_MAPPED = (BadTilePath,)


def _problem(content_type: str, body: bytes) -> tuple[str | None, str, dict[str, Any]]:
    """(type name, detail text, extra members) of a problem+json body, when it is one."""
    if "json" not in content_type.lower():
        return None, "", {}
    try:
        doc = json.loads(body[:CAP_PROBLEM].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None, "", {}
    if not isinstance(doc, dict):
        return None, "", {}
    name: str | None = None
    t = doc.get("type")
    if isinstance(t, str) and t.startswith(PROBLEM_PREFIX):
        name = t[len(PROBLEM_PREFIX) :][:64] or None
    d = doc.get("detail") or doc.get("title")
    extra: dict[str, Any] = {}
    for k, v in doc.items():
        if k in ("type", "title", "status", "detail") or not isinstance(k, str):
            continue
        if isinstance(v, str):
            extra[k] = clean(v, 200)
        elif isinstance(v, int | bool) or v is None:
            extra[k] = v
    return name, clean(d) if isinstance(d, str) else "", extra


def problem_error(status: int, content_type: str, body: bytes, what: str, **context: Any) -> WritError:
    """The error an answer other than 2xx means, on every face alike.

    A problem+json whose ``type`` (``urn:writ:problem:NAME``) names one of our
    own rejections (:func:`ledger.errors.by_type`: a record rule, a malformed
    message, a storage failure) is that class, with the problem's members as
    detail (``seq``...). Anything else (an HTTP-level problem, a redirect,
    a proxy's HTML page) is :class:`HTTPStatusError` naming the ``problem``.
    Both carry the HTTP status as ``status`` and ``http_status``."""
    name, detail, extra = _problem(content_type, body)
    if 300 <= status < 400:
        detail = detail or "a redirect, which Writ clients never follow"
    message = f"the server refused {what} ({status}{' ' + name if name else ''}): {detail or 'no detail'}"
    cls = by_type(name) if name else None
    if cls is not None and issubclass(cls, _MAPPABLE) and not issubclass(cls, _NOT_MAPPED):
        err: WritError
        try:
            if issubclass(cls, RecordRejected):
                seq = extra.pop("seq", None)
                err = cls(message, seq=seq if type(seq) is int else None, **extra)
            else:
                err = cls(message, **extra)
        except TypeError:
            err = cls(message)
        err.detail["http_status"] = status
        return err
    return HTTPStatusError(message, status=status, http_status=status, problem=name, **context)


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        wait = float(value)
    except ValueError:
        return None
    return wait if 0 <= wait <= MAX_RETRY_AFTER else None


# --- the shared base --------------------------------------------------------------


class BaseClient:
    """What both faces share: request building, caps, deadlines, retries, errors."""

    def __init__(self, base: str, *, deadlines: Deadlines, user_agent: str = USER_AGENT) -> None:
        self.base = base.rstrip("/")
        self.shown = redact(self.base)  # what messages name: never a password in the URL
        self.deadlines = deadlines
        self.user_agent = user_agent

    def url(self, path: str) -> str:
        """``path`` under the base URL; an absolute ``http(s)://`` URL is taken as it is."""
        if path.startswith(("http://", "https://")) or not self.base:
            return path
        return self.base + "/" + path.lstrip("/")

    def headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {**IDENTITY, "User-Agent": self.user_agent, **(extra or {})}

    @staticmethod
    def reader(headers: httpx.Headers, cap: int, what: str) -> BoundedBody:
        """The capped reader of an answer; a declared length above ``cap`` is refused at once."""
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            raise ResponseTooLarge(
                f"{what} announces {declared} bytes, more than the {cap} allowed", limit=cap
            )
        return BoundedBody(headers.get("content-encoding"), cap, what)

    def failure(self, exc: Exception, what: str) -> WritError:
        """A transport failure (httpx's or the OS's) as our error."""
        if isinstance(exc, httpx.InvalidURL | httpx.UnsupportedProtocol):
            return UsageError(f"bad server URL: {clean(exc, 120)}")
        server = (
            f"the server at {self.shown}" if self.shown else "the server"
        )  # no base: ``what`` names the URL
        if isinstance(exc, httpx.TimeoutException | TimeoutError):
            return TransportError(f"{what}: {server} did not answer in time")
        if isinstance(exc, httpx.HTTPError):
            return TransportError(
                f"{what}: {server} is unreachable ({type(exc).__name__}: {clean(exc, 120)})"
            )
        return TransportError(f"{what}: {server} is unreachable ({clean(exc, 120)})")

    @staticmethod
    def retry_wait(
        status: int, headers: httpx.Headers, attempt: int, retries: int, retry_on: tuple[int, ...]
    ) -> float | None:
        """Seconds to wait before sending again, or None (do not)."""
        if status not in retry_on or attempt >= retries:
            return None
        return _retry_after(headers.get("retry-after"))

    @staticmethod
    def check(status: int, headers: httpx.Headers, body: bytes, what: str, **context: Any) -> None:
        """Raise the error an answer other than 2xx means (redirects are never followed)."""
        if not 200 <= status < 300:
            raise problem_error(status, headers.get("content-type", ""), body, what, **context)


_RETRY_ON = (429, 503)


class Client(BaseClient):
    """The synchronous face: the Writ ledger API for the ``writ`` commands.

    ``http`` is an ``httpx.Client`` to use (a test's in-process app, a
    custom transport); it is then not closed by :meth:`close`."""

    def __init__(
        self,
        server: str,
        *,
        http: httpx.Client | None = None,
        deadlines: Deadlines = Deadlines(),
        user_agent: str = "writ-cli/0.1",
    ) -> None:
        super().__init__(normalise_server(server), deadlines=deadlines, user_agent=user_agent)
        self._owns = http is None
        self._http = (
            http
            if http is not None
            else httpx.Client(timeout=deadlines.httpx(), follow_redirects=False, trust_env=False)
        )

    def close(self) -> None:
        if self._owns:
            self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        cap: int,
        params: dict[str, Any] | None = None,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        retries: int = 2,
        retry_on: tuple[int, ...] = _RETRY_ON,
    ) -> tuple[int, httpx.Headers, bytes]:
        """One exchange: (status, headers, body) of a 2xx answer, or the mapped error."""
        what = path
        for attempt in range(retries + 1):
            try:
                with self._http.stream(
                    method,
                    self.url(path),
                    params=params,
                    content=content,
                    headers=self.headers(headers),
                    follow_redirects=False,
                ) as r:
                    reader = self.reader(r.headers, cap, f"the server's answer to {what}")
                    if r.is_stream_consumed:  # an in-memory transport (tests): the bytes are here already
                        body = reader.decoded(r.content)
                    else:
                        for chunk in r.iter_raw():
                            reader.feed(chunk)
                        body = reader.finish()
                    status, hdrs = r.status_code, r.headers
            except (httpx.HTTPError, OSError) as exc:
                raise self.failure(exc, what) from None
            wait = self.retry_wait(status, hdrs, attempt, retries, retry_on)
            if wait is not None:
                time.sleep(wait)
                continue
            self.check(status, hdrs, body, what)
            return status, hdrs, body
        raise AssertionError("unreachable")  # pragma: no cover

    def get_json(self, path: str, params: dict[str, Any] | None = None, *, cap: int = CAP_JSON) -> Any:
        _, _, body = self.request("GET", path, params=params, cap=cap, headers={"Accept": "application/json"})
        return parse_json(body, path)

    def _object(self, path: str, cap: int = CAP_JSON) -> dict[str, Any]:
        doc = self.get_json(path, cap=cap)
        if not isinstance(doc, dict):
            raise HTTPStatusError(f"GET {path} did not answer a JSON object")
        return doc

    # -- the ledger API ----------------------------------------------------------

    def checkpoint(self) -> str:
        _, _, body = self.request("GET", "/checkpoint", cap=CAP_NOTE)
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError:
            raise BadMessage("the checkpoint is not UTF-8 text") from None

    def records(self, start: int, limit: int) -> list[bytes]:
        _, _, body = self.request(
            "GET", "/v1/records", params={"start": start, "limit": limit}, cap=CAP_RECORDS
        )
        return unpack_records(body, max_count=PAGE, error=BadMessage)

    def ledger(self) -> dict[str, Any]:
        return self._object("/v1/ledger", 65536)

    def fleet(self) -> dict[str, Any]:
        return self._object("/v1/fleet")

    def post_records(self, raws: list[bytes]) -> dict[str, Any]:
        _, _, body = self.request(
            "POST",
            "/v1/records",
            content=pack_records(raws),
            headers={"Content-Type": "application/msgpack", "Accept": "application/json"},
            cap=65536,
            retries=2,
            retry_on=(429,),  # a 503 may come after the append went through: never blindly re-sent
        )
        doc = parse_json(body, "/v1/records")
        if not isinstance(doc, dict):
            raise HTTPStatusError("POST /v1/records did not answer a JSON object")
        return doc


class AsyncClient(BaseClient):
    """The async face: bytes within a cap and a total deadline per request.

    ``http`` is a shared ``httpx.AsyncClient`` (not closed here); without
    one, the face makes its own over ``transport`` (any
    ``httpx.AsyncBaseTransport``, e.g. the fleet's fast transport) and
    closes it in :meth:`aclose`. ``base`` may be empty: paths are then
    absolute URLs."""

    def __init__(
        self,
        base: str = "",
        *,
        http: httpx.AsyncClient | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 10.0,
        user_agent: str = "writ-device/0.1",
    ) -> None:
        super().__init__(
            base, deadlines=Deadlines(connect=timeout, read=timeout, total=timeout), user_agent=user_agent
        )
        self._owns = http is None
        self.http = (
            http
            if http is not None
            else httpx.AsyncClient(transport=transport, follow_redirects=False, trust_env=False)
        )

    @property
    def timeout(self) -> float:
        return self.deadlines.total or self.deadlines.read

    async def aclose(self) -> None:
        if self._owns:
            await self.http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def exchange(
        self,
        method: str,
        path: str,
        *,
        cap: int,
        headers: dict[str, str] | None = None,
        content: bytes | None = None,
        timeout: float | None = None,
    ) -> tuple[int, httpx.Headers, bytes]:
        """One request within the total deadline and the byte cap, whatever it answers:
        (status, headers, body). Only a transport failure raises."""
        url = self.url(path)
        what = f"{method} {url}"
        limit = self.timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(limit):
                async with self.http.stream(
                    method,
                    url,
                    headers=self.headers(headers),
                    content=content,
                    timeout=limit,
                    follow_redirects=False,
                ) as resp:
                    reader = self.reader(resp.headers, cap, what)
                    if resp.is_stream_consumed:  # an in-memory response: already read
                        return resp.status_code, resp.headers, reader.decoded(resp.content)
                    async for chunk in resp.aiter_raw():
                        reader.feed(chunk)
                    return resp.status_code, resp.headers, reader.finish()
        except TimeoutError:
            raise TransportError(f"{what} did not finish within {limit:g} s", url=url) from None
        except (httpx.HTTPError, OSError) as exc:
            err = self.failure(exc, what)
            if isinstance(err, TransportError):
                err.detail["url"] = url
            raise err from None

    async def get(
        self, path: str, *, cap: int, headers: dict[str, str] | None = None, timeout: float | None = None
    ) -> bytes:
        """GET ``path``: the body of a 2xx answer, or the mapped error."""
        status, hdrs, body = await self.exchange("GET", path, cap=cap, headers=headers, timeout=timeout)
        self.check(status, hdrs, body, f"GET {self.url(path)}", url=self.url(path))
        return body

    async def post(
        self,
        path: str,
        content: bytes,
        content_type: str,
        *,
        cap: int = CAP_PROBLEM,
        timeout: float | None = None,
    ) -> tuple[int, Any]:
        """POST ``content``: (status, decoded JSON answer or None); the caller judges the status
        (a receipt's refusal is logged and retried by its own rules, not raised)."""
        status, _, body = await self.exchange(
            "POST",
            path,
            cap=cap,
            headers={"Content-Type": content_type, "Accept": "application/json"},
            content=content,
            timeout=timeout,
        )
        try:
            return status, json.loads(body)
        except (ValueError, RecursionError):
            return status, None

    @contextlib.asynccontextmanager
    async def stream(
        self, path: str, *, headers: dict[str, str] | None = None, idle: float | None = None
    ) -> AsyncIterator[httpx.Response]:
        """An open ``GET`` stream (Server-Sent Events): a 2xx answer, connected within the
        deadline, each read within ``idle`` seconds; the caller reads it with its own cap.
        Transport failures while it is read raise the same errors as every request."""
        url = self.url(path)
        what = f"GET {url}"
        t = httpx.Timeout(self.timeout, read=idle if idle is not None else self.timeout)
        try:
            async with self.http.stream(
                "GET", url, headers=self.headers(headers), timeout=t, follow_redirects=False
            ) as resp:
                if not 200 <= resp.status_code < 300:
                    head = await self._head(resp)
                    self.check(resp.status_code, resp.headers, head, what, url=url)
                yield resp
        except (httpx.HTTPError, OSError) as exc:
            err = self.failure(exc, what)
            if isinstance(err, TransportError):
                err.detail["url"] = url
            raise err from None

    async def _head(self, resp: httpx.Response) -> bytes:
        """At most :data:`CAP_PROBLEM` bytes of an error answer (its problem+json)."""
        try:
            reader = BoundedBody(resp.headers.get("content-encoding"), CAP_PROBLEM, "an error answer")
            if resp.is_stream_consumed:
                return reader.decoded(resp.content[:CAP_PROBLEM])
            async with asyncio.timeout(self.timeout):
                async for chunk in resp.aiter_raw():
                    reader.feed(chunk)
            return reader.finish()
        except (WritError, TimeoutError, httpx.HTTPError):
            return b""
