"""A GET load generator for when ``wrk`` is not installed: processes of asyncio raw-HTTP clients.

    python -m bench.loadgen URL [--connections 64] [--seconds 5] [--procs 1]

Prints one JSON line: ``{"requests", "seconds", "per_s", "non_2xx", "errors", "generator"}``.
Each process keeps ``connections / procs`` keep-alive connections busy with
back-to-back GETs of the same URL. Much slower per request than wrk: on a
2-core machine its own CPU use caps what it can measure (say so next to its figures).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
import urllib.parse
from typing import Any

from bench.harness import RawHttp


async def _load(host: str, port: int, path: str, connections: int, seconds: float) -> dict[str, Any]:
    stop = time.perf_counter() + seconds
    ok = non2xx = errors = 0

    async def one() -> None:
        nonlocal ok, non2xx, errors
        c = RawHttp(host, port)
        try:
            await c.connect()
            while time.perf_counter() < stop:
                status, _ = await c.request("GET", path)
                if 200 <= status < 300:
                    ok += 1
                else:
                    non2xx += 1
        except (OSError, asyncio.IncompleteReadError, ValueError):
            errors += 1
        finally:
            await c.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(connections)))
    return {"requests": ok + non2xx, "non_2xx": non2xx, "errors": errors, "seconds": time.perf_counter() - t0}


def child(url: str, connections: int, seconds: float) -> dict[str, Any]:
    u = urllib.parse.urlsplit(url)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    path = u.path + (f"?{u.query}" if u.query else "")
    return asyncio.run(_load(u.hostname or "127.0.0.1", u.port or 80, path, connections, seconds))


def run_load(url: str, connections: int, seconds: float, procs: int) -> dict[str, Any]:
    """Run ``procs`` child processes and add up their counts."""
    per = max(1, connections // procs)
    kids = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.loadgen",
                url,
                "--connections",
                str(per),
                "--seconds",
                str(seconds),
                "--child",
            ],
            stdout=subprocess.PIPE,
        )
        for _ in range(procs)
    ]
    docs = []
    for k in kids:
        out, _ = k.communicate(timeout=seconds + 60)
        docs.append(json.loads(out.decode().strip().splitlines()[-1]))
    total = sum(d["requests"] for d in docs)
    secs = max(d["seconds"] for d in docs)
    return {
        "requests": total,
        "seconds": secs,
        "per_s": total / secs if secs else 0.0,
        "non_2xx": sum(d["non_2xx"] for d in docs),
        "errors": sum(d["errors"] for d in docs),
        "generator": f"bench.loadgen ({procs} process(es), asyncio raw HTTP/1.1)",
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("url")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--procs", type=int, default=1)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.url, args.connections, args.seconds)))
    else:
        print(json.dumps(run_load(args.url, args.connections, args.seconds, args.procs)))


if __name__ == "__main__":
    main()
