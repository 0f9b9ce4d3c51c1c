"""Memory: RSS per simulated device, and per idle SSE client on the server.

    python -m bench.memory [--quick]

- Per device: the fleet simulation's own RSS growth from before its devices
  exist to after they are booted, divided by N (``python -m device_sim fleet``
  reports it), at N = 1,000 and 10,000. When the propagation module ran in
  the same suite, its runs are reused.
- Per idle SSE client: a fresh ``writ serve``; a separate process
  (``python -m bench.holder``) opens N connections to ``/v1/events``, reads
  the first event on each and stays idle; the server's VmRSS is read from
  ``/proc/<pid>/status`` before and after. Target: 10,000 idle clients hold
  the server under 400 MB.
- The comparable: nginx (Debian's, one worker) holding the same number of
  idle client connections (an unfinished request head each), its worker's
  VmRSS before and after.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from typing import Any

import httpx

from bench.harness import (
    Config,
    Result,
    figure,
    ledger_server,
    module_main,
    module_result,
    nginx_exe,
    python_exe,
    ref,
    running_nginx,
    table,
)
from device_sim.measure import rss_kib

COMMAND = "python -m bench.memory"
TARGET_MB = 400


def _sse_clients(url: str) -> int:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("writ_sse_clients "):
            return int(float(line.split()[-1]))
    return -1


def hold(
    url: str, n: int, mode: str, measure: Any, settle: float = 2.0, during: Any = None
) -> dict[str, Any]:
    """Open ``n`` idle connections from a holder process; call ``measure()`` before and after."""
    before = measure()
    proc = subprocess.Popen(
        [python_exe(), "-m", "bench.holder", url, "--n", str(n), "--mode", mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stdin is not None
    try:
        line = proc.stdout.readline().decode()
        doc: dict[str, Any] = json.loads(line) if line.strip() else {"connected": 0, "failed": n}
        time.sleep(settle)
        after = measure()
        doc.update(before_kib=before, after_kib=after)
        if during is not None:
            doc["during"] = during()
        return doc
    finally:
        proc.stdin.close()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def idle_sse(cfg: Config, n: int) -> dict[str, Any]:
    with ledger_server(cfg.work, n_records=100, max_sse_clients=n + 1000) as srv:
        for _ in range(20):  # warm the server's code paths first
            httpx.get(srv.url + "/checkpoint")
        return hold(
            srv.url + "/v1/events", n, "sse", lambda: rss_kib(srv.pid), during=lambda: _sse_clients(srv.url)
        )


def idle_nginx(cfg: Config, n: int) -> dict[str, Any] | None:
    if nginx_exe() is None:
        return None
    static = cfg.work / "static-mem"
    static.mkdir(exist_ok=True)
    (static / "checkpoint").write_text("x\n")
    with ledger_server(cfg.work) as srv, running_nginx(cfg.work, srv.url, static) as ng:
        httpx.get(ng.static_url + "/checkpoint")

        def worker_rss() -> int:
            return sum(rss_kib(p) for p in ng.worker_pids())

        return hold(ng.static_url + "/checkpoint", n, "partial", worker_rss)


def run(cfg: Config) -> Result:
    cmd = COMMAND + (" --quick" if cfg.quick else "")
    res = module_result("memory", "Memory: per simulated device, per idle SSE client", cmd)
    n_sse: int = cfg.pick(1000, 10_000)
    rep: int = cfg.pick(1, 2)

    sse = [idle_sse(cfg, n_sse) for _ in range(rep)]
    ngx = idle_nginx(cfg, n_sse)
    per = [(d["after_kib"] - d["before_kib"]) / max(1, d["connected"]) for d in sse]
    total_mb = [d["after_kib"] / 1024 for d in sse]
    ngx_per = (ngx["after_kib"] - ngx["before_kib"]) / max(1, ngx["connected"]) if ngx else None
    failed = sum(d["failed"] for d in sse)
    res["figures"].append(
        figure(
            "memory.sse_client_kib",
            "server RSS per idle SSE client",
            per,
            "KiB",
            command=cmd,
            comparable=ref(
                "nginx, one worker: RSS per idle client connection (unfinished request head)", ngx_per, "KiB"
            ),
            note=(
                f"{n_sse:,} clients from a separate process; {failed} failed to connect; the server counted "
                f"{', '.join(str(d.get('during')) for d in sse)} streams"
            ),
        )
    )
    # scale to 10,000 when the quick run held fewer
    scale = 10_000 / n_sse
    at10k = [d["before_kib"] / 1024 + (d["after_kib"] - d["before_kib"]) / 1024 * scale for d in sse]
    res["figures"].append(
        figure(
            "memory.sse_10k_total_mb",
            "server RSS with 10,000 idle SSE clients"
            + ("" if n_sse == 10_000 else f" (extrapolated from {n_sse:,})"),
            at10k,
            "MB",
            command=cmd,
            target=("<=", TARGET_MB),
            note=f"RSS before the clients: {statistics.median(d['before_kib'] for d in sse) / 1024:.0f} MB; "
            f"with them: {statistics.median(total_mb):.0f} MB",
        )
    )

    # per simulated device: the fleet's own measurement
    fleet_ns: list[int] = cfg.pick([1000], [1000, 10_000])
    rows: list[list[Any]] = []
    for n in fleet_ns:
        runs = cfg.shared.get("fleet", {}).get(f"{n}-sse")
        if not runs:
            from bench.propagation import fleet_run

            runs = [fleet_run(cfg, n, "sse")]
        vals = [d["rss_per_device_kib"] for d in runs if d.get("rss_per_device_kib") is not None]
        if not vals:
            res["notes"].append(f"the fleet at N={n} reported no rss_per_device_kib")
            continue
        srv_growth = [
            (d["_server_rss_kib"][1] - d["_server_rss_kib"][0]) / n for d in runs if "_server_rss_kib" in d
        ]
        res["figures"].append(
            figure(
                f"memory.device_kib_{n}",
                f"RSS per simulated device (fleet of {n:,}, one process)",
                vals,
                "KiB",
                command=f"python -m device_sim fleet --devices {n} ... (run by {cmd})",
                note=(
                    "the fleet's RSS growth from before the devices exist to after they are booted, / N; "
                    f"the server grew {statistics.median(srv_growth):.2f} KiB per device over the run"
                    if srv_growth
                    else ""
                ),
            )
        )
        for d in runs:
            rows.append([f"{n:,}", d.get("rss_per_device_kib"), d.get("rss_mib"), d.get("push_model")])
    res["tables"].append(
        table(
            "Fleet runs measured",
            ["devices", "KiB per device", "fleet RSS at the end (MiB)", "push model"],
            rows,
        )
    )
    res["raw"] = {"sse": sse, "nginx": ngx}
    return res


def main(argv: list[str] | None = None) -> Result:
    return module_main("memory", run, argv, __doc__)


if __name__ == "__main__":
    main()
