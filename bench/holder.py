"""Hold N idle HTTP connections open from one process (for memory measurements).

    python -m bench.holder URL --n 10000 [--mode sse|partial]

``sse``: ``GET`` the URL (an event stream) and read until the first complete
event, then stay idle (heartbeats are read and dropped). ``partial``: send an
unfinished request head and stay silent (an idle connection a server must keep).
Prints ``{"connected": K, "failed": F, "seconds": T}`` once every connection is
established, then holds them until its standard input closes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
import urllib.parse

from ledger.fileio import raise_open_files_limit


async def _hold(url: str, n: int, mode: str, parallel: int) -> None:
    u = urllib.parse.urlsplit(url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    path = u.path + (f"?{u.query}" if u.query else "")
    writers: list[asyncio.StreamWriter] = []
    readers: list[asyncio.Task[None]] = []
    failed = 0
    sem = asyncio.Semaphore(parallel)

    async def drain(reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(Exception):
            while await reader.read(65536):
                pass

    async def one() -> None:
        nonlocal failed
        async with sem:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 30)
                if mode == "sse":
                    writer.write(
                        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n".encode()
                    )
                    buf = b""
                    while True:
                        chunk = await asyncio.wait_for(reader.read(65536), 30)
                        if not chunk:
                            raise ConnectionError("closed")
                        buf += chunk
                        i = buf.find(b"event: checkpoint")
                        if i >= 0 and b"\n\n" in buf[i:]:
                            break
                    readers.append(asyncio.create_task(drain(reader)))
                else:
                    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n".encode())
                    await writer.drain()
                writers.append(writer)
            except (OSError, TimeoutError, ConnectionError):
                failed += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    print(
        json.dumps(
            {"connected": len(writers), "failed": failed, "seconds": round(time.perf_counter() - t0, 2)}
        )
    )
    sys.stdout.flush()
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for w in writers:
        w.close()
    for t in readers:
        t.cancel()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("url")
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--mode", choices=("sse", "partial"), default="sse")
    ap.add_argument("--parallel", type=int, default=200, help="connections being opened at once")
    args = ap.parse_args(argv)
    raise_open_files_limit(args.n + 1024)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_hold(args.url, args.n, args.mode, args.parallel))


if __name__ == "__main__":
    main()
