"""Appends against a real ``writ serve`` (SQLite, WAL, synchronous=FULL: every reply is durable).

    python -m bench.append [--quick]

Three loads, each repeated, each from pre-signed records chained one on the
previous (an integrator's records: each names the seq and the root it goes on):

- single-record POSTs from 1 client;
- single-record POSTs from 16 concurrent clients. One generator hands the next
  record, in chain order, to whichever of the 16 is free, so 16 requests are
  in flight at once and the server can commit them together only if it groups
  them (group commit). A request that reaches the server before its
  predecessor is refused ``409 stale-head``; the client re-sends the same
  record (it becomes valid as soon as the predecessor commits) and the 409s
  are counted;
- batches of 1000 records per POST, one after another.

The ceilings, measured in the same run on the same disk: Ed25519 verifies/s
(PyNaCl, 1 thread and all cores), ``os.fsync`` of a 4 KiB write/s in the data
directory, and SQLite single-row commits/s (WAL, synchronous=FULL) there; the
established system to compare with is SQLite itself, doing only the storage
part. A target missed gets a py-spy profile of the server under that load.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import statistics
import time
from pathlib import Path

import httpx

from bench.common import build_ledger, cores, raw_verify_rate
from bench.harness import (
    Chain,
    Config,
    RawHttp,
    Result,
    Served,
    figure,
    ledger_server,
    module_main,
    module_result,
    post_records,
    profile_server,
    ref,
    table,
)
from device_sim.measure import percentile
from ledger import crypto, encoding, records

COMMAND = "python -m bench.append"
CONCURRENCY = 16
BATCH = 1000


# --- ceilings ---------------------------------------------------------------------------------


def fsync_rate(directory: Path, seconds: float) -> float:
    """4 KiB ``pwrite`` + ``os.fsync`` per iteration, on a file in ``directory``."""
    path = directory / "fsync-probe.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        block = os.urandom(4096)
        n = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            os.pwrite(fd, block, (n % 16) * 4096)
            os.fsync(fd)
            n += 1
        return n / (time.perf_counter() - t0)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)


def sqlite_rate(directory: Path, seconds: float, rows_per_commit: int) -> float:
    """Rows/s committed by SQLite (WAL, synchronous=FULL) in transactions of ``rows_per_commit``."""
    path = directory / "sqlite-probe.db"
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        db.execute(
            "CREATE TABLE records (seq INTEGER PRIMARY KEY, raw BLOB NOT NULL, leaf_hash BLOB NOT NULL)"
        )
        raw = os.urandom(150)
        seq = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            db.execute("BEGIN IMMEDIATE")
            db.executemany(
                "INSERT INTO records VALUES (?, ?, ?)",
                [(seq + i, raw, crypto.sha256(raw)) for i in range(rows_per_commit)],
            )
            db.execute("COMMIT")
            seq += rows_per_commit
        return seq / (time.perf_counter() - t0)
    finally:
        db.close()
        for suffix in ("", "-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)


# --- loads ------------------------------------------------------------------------------------


class Pool:
    """Pre-signed records of one chain, handed out in order."""

    def __init__(self, chain: Chain) -> None:
        self.chain = chain
        self.bodies: list[bytes] = []
        self.raws: list[bytes] = []
        self.pos = 0
        self.signing_s = 0.0

    def left(self) -> int:
        return len(self.raws) - self.pos

    def ensure(self, n: int) -> None:
        """At least ``n`` records not yet sent (signing more, outside any timed run)."""
        if self.left() >= n:
            return
        t = time.perf_counter()
        more = self.chain.make(n - self.left())
        self.raws += more
        self.bodies += [encoding.pack_records([r]) for r in more]
        self.signing_s += time.perf_counter() - t


async def _singles(srv: Served, pool: Pool, clients: int, seconds: float) -> dict[str, float]:
    """``clients`` connections POST one record each, in chain order, for ``seconds``."""
    headers = {"Content-Type": "application/msgpack"}
    stop_at = time.perf_counter() + seconds
    conflicts = 0
    errors = 0
    done = 0
    latencies: list[float] = []
    start_pos = pool.pos

    async def worker() -> None:
        nonlocal conflicts, errors, done
        c = RawHttp("127.0.0.1", srv.port)
        await c.connect()
        try:
            while time.perf_counter() < stop_at and pool.left() > 0:
                i = pool.pos
                pool.pos += 1
                while True:
                    t = time.perf_counter()
                    status, body = await c.request("POST", "/v1/records", pool.bodies[i], headers)
                    if status == 200:
                        latencies.append(time.perf_counter() - t)
                        done += 1
                        break
                    if status == 409:
                        conflicts += 1
                        await asyncio.sleep(0)
                        continue
                    errors += 1
                    if errors > 100:
                        raise RuntimeError(f"POST /v1/records: {status} {body[:200]!r}")
                    await asyncio.sleep(0.01)
        finally:
            await c.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    elapsed = time.perf_counter() - t0
    latencies.sort()
    assert done == pool.pos - start_pos
    return {
        "appends": done,
        "seconds": elapsed,
        "per_s": done / elapsed,
        "conflicts": conflicts,
        "errors": errors,
        "p50_ms": 1000 * percentile(latencies, 50) if latencies else 0.0,
        "p99_ms": 1000 * percentile(latencies, 99) if latencies else 0.0,
    }


def _batches(srv: Served, pool: Pool, n_batches: int) -> dict[str, float]:
    with httpx.Client(timeout=120) as client:
        t0 = time.perf_counter()
        total = 0
        for _ in range(n_batches):
            raws = pool.raws[pool.pos : pool.pos + BATCH]
            if not raws:
                break
            post_records(srv.url, raws, client)
            pool.pos += len(raws)
            total += len(raws)
        elapsed = time.perf_counter() - t0
    return {"appends": total, "seconds": elapsed, "per_s": total / elapsed}


def _group_stats(url: str) -> tuple[float, float]:
    """(sum, count) of the server's commit-group-size histogram."""
    text = httpx.get(url + "/metrics", timeout=10).text
    s = c = 0.0
    for line in text.splitlines():
        if line.startswith("writ_commit_group_requests_sum"):
            s = float(line.split()[-1])
        elif line.startswith("writ_commit_group_requests_count"):
            c = float(line.split()[-1])
    return s, c


# --- the module -------------------------------------------------------------------------------


def run(cfg: Config) -> Result:
    cmd = COMMAND + (" --quick" if cfg.quick else "")
    res = module_result("append", "Appends: a real `writ serve`, SQLite with fsync", cmd)
    rep: int = cfg.pick(2, 3)
    secs: float = cfg.pick(2.0, 5.0)
    n_batches: int = cfg.pick(4, 12)
    n_cores = cores()

    # the verify ceiling, over real record signatures
    root, raws = build_ledger(cfg.pick(4000, 20_000))
    items = [
        (root.public_key, crypto.RECORD_DOMAIN, e.body_bytes, e.signature) for e in map(records.parse, raws)
    ]
    v1 = [raw_verify_rate(items, 1) for _ in range(rep)]
    vn = [raw_verify_rate(items, n_cores) for _ in range(rep)]
    vn_med = statistics.median(vn)

    with ledger_server(cfg.work, n_records=1000) as srv:
        data = srv.data_dir
        fs = [fsync_rate(data, cfg.pick(1.0, 2.0)) for _ in range(rep)]
        sq1 = [sqlite_rate(data, cfg.pick(1.0, 2.0), 1) for _ in range(rep)]
        sqb = [sqlite_rate(data, cfg.pick(1.0, 2.0), BATCH) for _ in range(rep)]
        fs_med, sq1_med = statistics.median(fs), statistics.median(sq1)

        # records are signed ahead of each run: signing is not part of what is timed
        pool = Pool(srv.chain)
        runs: dict[str, list[dict[str, float]]] = {"c1": [], "c16": [], "batch": []}
        groups: dict[str, float] = {}
        rate = 1000.0
        for name, clients in (("c1", 1), ("c16", CONCURRENCY)):
            s0, n0 = _group_stats(srv.url)
            for _ in range(rep):
                pool.ensure(int(rate * secs * 2) + 2000)
                r = asyncio.run(_singles(srv, pool, clients, secs))
                runs[name].append(r)
                rate = max(rate, r["per_s"])
            s1, n1 = _group_stats(srv.url)
            groups[name] = (s1 - s0) / (n1 - n0) if n1 > n0 else 0.0
        for _ in range(rep):
            pool.ensure(n_batches * BATCH)
            runs["batch"].append(_batches(srv, pool, n_batches))

        c16 = [r["per_s"] for r in runs["c16"]]
        batch = [r["per_s"] for r in runs["batch"]]
        prof_dir = cfg.work / "profiles"
        prof_dir.mkdir(exist_ok=True)
        if statistics.median(c16) < 3000:
            pool.ensure(int(rate * (secs + 1) * 2) + 2000)
            out = prof_dir / "append-c16.raw"
            block = profile_server(
                srv.pid,
                secs + 1,
                out,
                lambda: asyncio.run(_singles(srv, pool, CONCURRENCY, secs)),
                "the server under 16 concurrent single-record POSTs",
                f"{secs:.0f} s of the c=16 load",
            )
            if block is not None:
                res["profiles"].append(block)
        if statistics.median(batch) < 0.6 * vn_med:
            pool.ensure(BATCH * 60)
            out = prof_dir / "append-batch.raw"

            def batches_for_4s() -> None:
                t_end = time.perf_counter() + 4
                while time.perf_counter() < t_end and pool.left() >= BATCH:
                    _batches(srv, pool, 1)

            block = profile_server(
                srv.pid,
                4,
                out,
                batches_for_4s,
                "the server under batches of 1000 records",
                "4 s of batch POSTs",
            )
            if block is not None:
                res["profiles"].append(block)

    lim_fsync = ref("os.fsync of a 4 KiB write, same directory", round(fs_med), "fsyncs/s")
    sqlite_single = ref(
        f"SQLite {sqlite3.sqlite_version}: single-row commits (WAL, synchronous=FULL), same directory",
        round(sq1_med),
        "rows/s",
    )
    res["figures"] += [
        figure(
            "append.single_c1",
            "single-record POSTs, 1 client",
            [r["per_s"] for r in runs["c1"]],
            "appends/s",
            command=cmd,
            limit=lim_fsync,
            comparable=sqlite_single,
            note=f"p50 latency {_med(runs['c1'], 'p50_ms'):.1f} ms, p99 {_med(runs['c1'], 'p99_ms'):.1f} ms",
        ),
        figure(
            "append.single_c16",
            f"single-record POSTs, {CONCURRENCY} concurrent clients",
            c16,
            "appends/s",
            command=cmd,
            limit=ref(
                f"Ed25519 verify, 1 thread (the single-record path verifies inline); fsync {fs_med:,.0f}/s "
                "is not a limit once commits are grouped",
                round(statistics.median(v1)),
                "verifies/s",
            ),
            comparable=sqlite_single,
            target=(">=", 3000),
            note=(
                f"{sum(r['conflicts'] for r in runs['c16'])} x 409 stale-head re-sent in "
                f"{sum(r['appends'] for r in runs['c16'])} appends; mean commit group "
                f"{groups.get('c16', 0):.1f} requests (c=1: {groups.get('c1', 0):.1f}); "
                f"p50 latency {_med(runs['c16'], 'p50_ms'):.1f} ms, p99 {_med(runs['c16'], 'p99_ms'):.1f} ms"
            ),
        ),
        figure(
            "append.batch",
            f"batches of {BATCH} records per POST, one after another",
            batch,
            "records/s",
            command=cmd,
            limit=ref(f"raw Ed25519 verify, PyNaCl, {n_cores} threads", round(vn_med), "verifies/s"),
            comparable=ref(
                f"SQLite {sqlite3.sqlite_version}: {BATCH}-row transactions (WAL, "
                "synchronous=FULL), same directory",
                round(statistics.median(sqb)),
                "rows/s",
            ),
            target_of_limit=0.6,
        ),
    ]
    res["tables"].append(
        table(
            "Ceilings measured in the same run",
            ["what", "median", "runs"],
            [
                ["Ed25519 verify, PyNaCl, 1 thread", f"{statistics.median(v1):,.0f}/s", _runs(v1)],
                [f"Ed25519 verify, PyNaCl, {n_cores} threads", f"{vn_med:,.0f}/s", _runs(vn)],
                ["os.fsync (4 KiB pwrite), data directory", f"{fs_med:,.0f}/s", _runs(fs)],
                ["SQLite single-row commit, WAL, synchronous=FULL", f"{sq1_med:,.0f}/s", _runs(sq1)],
                [
                    f"SQLite {BATCH}-row commit, WAL, synchronous=FULL",
                    f"{statistics.median(sqb):,.0f} rows/s",
                    _runs(sqb),
                ],
            ],
            note="The load generator (an asyncio raw-HTTP client) runs on the same 2 cores as the server.",
        )
    )
    res["raw"] = {**runs, "groups": groups, "signed": len(pool.raws), "signing_s": round(pool.signing_s, 1)}
    return res


def _med(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rows) if rows else 0.0


def _runs(vals: list[float]) -> str:
    return ", ".join(f"{v:,.0f}" for v in vals)


def main(argv: list[str] | None = None) -> Result:
    return module_main("append", run, argv, __doc__)


if __name__ == "__main__":
    main()
