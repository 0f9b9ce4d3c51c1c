"""A single-flight edge cache for the (immutable) tiles, in front of the origin."""

from __future__ import annotations

import asyncio
from collections import OrderedDict

import httpx

__all__ = ["TileCache"]


class TileCache(httpx.AsyncBaseTransport):
    """An HTTP cache in front of the origin, for the tiles only.

    Tiles (``/tile/...``) are immutable (tlog-tiles), so any cache may keep
    them: this one keeps the last ``capacity`` 200 answers and makes
    concurrent requests for the same tile wait for one origin fetch
    (single-flight), as a CDN or an nginx ``proxy_cache_lock`` would. Every
    device still receives, and verifies, every byte; only the origin is
    spared. ``/checkpoint`` and everything else go straight to the origin.
    """

    def __init__(self, inner: httpx.AsyncBaseTransport, capacity: int = 128) -> None:
        self.inner = inner
        self.capacity = capacity
        self._cache: OrderedDict[str, tuple[int, list[tuple[bytes, bytes]], bytes]] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[tuple[int, list[tuple[bytes, bytes]], bytes]]] = {}
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _response(
        hit: tuple[int, list[tuple[bytes, bytes]], bytes], request: httpx.Request
    ) -> httpx.Response:
        status, headers, body = hit
        return httpx.Response(status, headers=headers, content=body, request=request)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method != "GET" or "/tile/" not in request.url.path:
            return await self.inner.handle_async_request(request)
        key = str(request.url)
        hit = self._cache.get(key)
        if hit is not None:
            self.hits += 1
            self._cache.move_to_end(key)
            return self._response(hit, request)
        waiting = self._inflight.get(key)
        if waiting is not None:
            self.hits += 1
            return self._response(await asyncio.shield(waiting), request)
        fut: asyncio.Future[tuple[int, list[tuple[bytes, bytes]], bytes]] = (
            asyncio.get_running_loop().create_future()
        )
        self._inflight[key] = fut
        self.misses += 1
        try:
            resp = await self.inner.handle_async_request(request)
            try:
                body = await resp.aread()
            finally:
                await resp.aclose()
            keep = [
                (k, v) for k, v in resp.headers.raw if k.lower() not in (b"transfer-encoding", b"connection")
            ]
            entry = (resp.status_code, keep, body)
            if resp.status_code == 200:
                self._cache[key] = entry
                while len(self._cache) > self.capacity:
                    self._cache.popitem(last=False)
            fut.set_result(entry)
            return self._response(entry, request)
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: waiters re-raise it, nobody else must
            raise
        finally:
            del self._inflight[key]

    async def aclose(self) -> None:
        await self.inner.aclose()
