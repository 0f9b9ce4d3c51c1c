"""Read paths: ``GET /checkpoint`` and ``GET /tile/0/000`` requests/s from one server worker.

    python -m bench.readpath [--quick]

The load generator runs in its own process: ``wrk`` (Debian's) with one
thread and 64 keep-alive connections when it is installed, otherwise
``python -m bench.loadgen`` (asyncio raw HTTP; it says which ran). Targets,
each measured in the same run with the same generator:

- ``writ serve`` itself (one uvicorn process: uvloop + httptools + Starlette);
- the limit for any Python ASGI worker here: a minimal Starlette app on the
  same uvicorn stack returning the same bytes from memory;
- the nginx site of ``deploy/nginx/writ.conf`` in front of the server (one
  nginx worker; ``/checkpoint`` micro-cached for 1 s, tiles cached), access
  log off;
- the established comparable: the same nginx serving the same bytes as
  static files.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import statistics
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from bench.harness import (
    Config,
    Result,
    figure,
    free_port,
    ledger_server,
    module_main,
    module_result,
    nginx_exe,
    profile_server,
    ref,
    running_nginx,
    table,
    wait_answering,
)
from device_sim.server_process import stop_server

COMMAND = "python -m bench.readpath"
CONNECTIONS = 64
PATHS = ("/checkpoint", "/tile/0/000")


def _wrk(url: str, seconds: float, connections: int) -> dict[str, Any]:
    exe = shutil.which("wrk")
    assert exe is not None
    proc = subprocess.run(
        [exe, "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", url],
        capture_output=True,
        timeout=seconds + 60,
        check=False,
    )
    out = proc.stdout.decode(errors="replace")
    m = re.search(r"Requests/sec:\s*([\d.]+)", out)
    non = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
    err = re.search(r"Socket errors:.*?connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "per_s": float(m.group(1)) if m else 0.0,
        "non_2xx": int(non.group(1)) if non else 0,
        "errors": sum(int(x) for x in err.groups()) if err else 0,
        "generator": f"wrk -t1 -c{connections}",
    }


def load(url: str, seconds: float, connections: int = CONNECTIONS) -> dict[str, Any]:
    if shutil.which("wrk"):
        return _wrk(url, seconds, connections)
    from bench.loadgen import run_load

    return run_load(url, connections, seconds, procs=1)


MINIMAL_APP = textwrap.dedent(
    '''
    """The same bytes from memory on the same stack: uvicorn (uvloop, httptools) + Starlette."""
    from pathlib import Path
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    HERE = Path(__file__).parent
    CP = (HERE / "checkpoint").read_bytes()
    TILE = (HERE / "tile" / "0" / "000").read_bytes()

    async def checkpoint(request):
        return Response(CP, media_type="text/plain; charset=utf-8", headers={"Cache-Control": "no-cache"})

    async def tile(request):
        return Response(TILE, media_type="application/octet-stream")

    app = Starlette(routes=[Route("/checkpoint", checkpoint), Route("/tile/0/000", tile)])
    '''
)


@contextlib.contextmanager
def minimal_app(static: Path) -> Iterator[str]:
    (static / "minimal_app.py").write_text(MINIMAL_APP, encoding="utf-8")
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "minimal_app:app",
            "--app-dir",
            str(static),
            "--port",
            str(port),
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_answering(
            proc, url + "/checkpoint", "the minimal uvicorn app", 20, lambda r: r.status_code == 200
        )
        yield url
    finally:
        stop_server(proc, timeout=10)


def run(cfg: Config) -> Result:
    cmd = COMMAND + (" --quick" if cfg.quick else "")
    res = module_result("readpath", "Read paths: /checkpoint and a full hash tile", cmd)
    rep: int = cfg.pick(2, 3)
    secs: float = cfg.pick(2.0, 5.0)
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    static = cfg.work / "static"
    (static / "tile" / "0").mkdir(parents=True, exist_ok=True)
    have_nginx = nginx_exe() is not None

    def measure(name: str, base: str) -> None:
        for path in PATHS:
            got = results.setdefault(name, {}).setdefault(path, [])
            load(base + path, 1.0)  # warm up (and fill the caches)
            for _ in range(rep):
                got.append(load(base + path, secs))

    with ledger_server(cfg.work, n_records=1000, checkpoint_interval=3600) as srv:
        (static / "checkpoint").write_bytes(httpx.get(srv.url + "/checkpoint").content)
        (static / "tile" / "0" / "000").write_bytes(httpx.get(srv.url + "/tile/0/000").content)
        measure("server", srv.url)
        for path, want in (("/checkpoint", 10_000.0), ("/tile/0/000", 0.0)):
            v = [r["per_s"] for r in results["server"][path]]
            if statistics.median(v) < want or path != "/checkpoint":
                out = cfg.work / f"readpath{path.replace('/', '_')}.raw"
                block = profile_server(
                    srv.pid,
                    secs,
                    out,
                    lambda: load(srv.url + path, secs),  # noqa: B023 - called before the loop moves on
                    f"writ serve under GET {path}",
                    f"{secs:.0f} s of the load",
                )
                if block is not None:
                    res["profiles"].append(block)
        if have_nginx:
            with running_nginx(cfg.work, srv.url, static) as ng:
                measure("nginx", ng.url)
                measure("static", ng.static_url)
                hit = httpx.get(ng.url + "/tile/0/000").headers.get("x-cache-status")
                res["raw"] = {"nginx_tile_cache_status": hit}
    with minimal_app(static) as url:
        measure("minimal", url)

    generator = next(iter(next(iter(results.values())).values()))[0]["generator"]
    res["notes"].append(
        f"load generator: {generator}, {secs:.0f} s per run, in its own process on the same 2 cores "
        "as the server (each side gets about one core)"
    )
    if not have_nginx:
        res["notes"].append(
            "nginx is not installed: no figures through the deploy/ cache or for static files"
        )

    def vals(name: str, path: str) -> list[float]:
        return [r["per_s"] for r in results.get(name, {}).get(path, [])]

    def med(name: str, path: str) -> float | None:
        v = vals(name, path)
        return statistics.median(v) if v else None

    for path in PATHS:
        label = "GET /checkpoint" if path == "/checkpoint" else "GET /tile/0/000 (full hash tile, 8 KiB)"
        lim = ref(
            "a minimal Starlette app on the same uvicorn stack, same bytes from memory",
            med("minimal", path),
            "req/s",
        )
        comp = (
            ref(
                f"nginx {_nginx_version()}, same bytes as a static file, 1 worker",
                med("static", path),
                "req/s",
            )
            if have_nginx
            else None
        )
        res["figures"].append(
            figure(
                f"readpath.server{path.replace('/', '_')}",
                f"{label}, writ serve (1 worker)",
                vals("server", path),
                "req/s",
                command=cmd,
                limit=lim,
                comparable=comp,
                target=(">=", 10_000) if path == "/checkpoint" else None,
                note=_errs(results.get("server", {}).get(path, [])),
            )
        )
        if have_nginx:
            res["figures"].append(
                figure(
                    f"readpath.nginx{path.replace('/', '_')}",
                    f"{label}, through deploy/nginx (cache, 1 worker)",
                    vals("nginx", path),
                    "req/s",
                    command=cmd,
                    limit=ref(
                        f"nginx {_nginx_version()}, same bytes as a static file, 1 worker",
                        med("static", path),
                        "req/s",
                    ),
                    note=_errs(results.get("nginx", {}).get(path, [])),
                )
            )
    rows = []
    for name, what in (
        ("server", "writ serve"),
        ("minimal", "minimal Starlette app (limit)"),
        ("nginx", "deploy/nginx cache"),
        ("static", "nginx static (comparable)"),
    ):
        if name in results:
            rows.append([what, *(", ".join(f"{v:,.0f}" for v in vals(name, p)) for p in PATHS)])
    res["tables"].append(table("Every run (req/s)", ["target", *PATHS], rows))
    res.setdefault("raw", {})["runs"] = results
    return res


def _errs(rows: list[dict[str, Any]]) -> str:
    non = sum(r.get("non_2xx", 0) for r in rows)
    err = sum(r.get("errors", 0) for r in rows)
    return "" if not non and not err else f"{non} non-2xx responses, {err} socket errors over the runs"


def _nginx_version() -> str:
    exe = nginx_exe()
    if exe is None:
        return ""
    out = subprocess.run([exe, "-v"], capture_output=True, check=False, timeout=10).stderr.decode()
    m = re.search(r"nginx/([\d.]+)", out)
    return m.group(1) if m else ""


def main(argv: list[str] | None = None) -> Result:
    return module_main("readpath", run, argv, __doc__)


if __name__ == "__main__":
    main()
