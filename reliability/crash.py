"""Crash safety of the real server: SIGKILL ``writ serve`` mid-stream, restart, check.

Writers (threads, each with its own HTTP connection) stream signed grants into
a real ``writ serve`` process: single records and batches of 10..100, each
POST's bytes and answer recorded. The server is killed with SIGKILL at a
random moment (``mid-post``: a few milliseconds after a POST went out;
``random``: a random delay into the stream), restarted on the same data
directory, and checked:

- every acknowledged record is served at its seq, byte for byte, and every
  acknowledgement's (size, root) is a head of the served tree;
- every record ever served before is still served, unchanged;
- the served ledger audits clean from genesis (``ledger.audit`` over the new
  records on top of the state verified so far; ``writ audit --data DIR
  --anchor`` at the end and every ``--audit-every`` kills);
- nothing torn: ``/checkpoint`` verifies under the log key and names exactly
  the served tree, its 0x04 timestamp never goes back (not even across the
  kill); the last entry bundle and level-0 hash tile (and one random full
  one) hold exactly the served records;
- an unacknowledged batch is all or nothing: all of its records at their
  seqs, or none.

Writers then re-sync their head from the server (``GET /v1/records``) and the
next round starts.

    python -m reliability.crash --kills 200 [--seed 1] [--writers 2] [--max-delay 0.4]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.harness import post_records
from device_sim.measure import percentiles
from device_sim.server_process import ServerProcess, start_server, stop_server
from ledger import encoding
from ledger.audit import audit
from ledger.crypto import SeedSigner, sha256
from ledger.state import LedgerState
from ledger.tiles import TILE_WIDTH
from ledger.tree import MerkleLevels, leaf_hash

from .common import (
    base_ledger,
    check_tiles,
    fetch_records,
    grant_batch,
    init_server,
    machine,
    verify_checkpoint,
    writ_audit_data,
)

ORIGIN = "crash.writ.example/ledger"
#: server flags: the rate limit is not what is under test here.
SERVER_FLAGS: dict[str, Any] = {"write_rate": 100000, "write_burst": 100000, "log_level": "warning"}


@dataclass
class Post:
    """One POST /v1/records: the bytes sent and what came back (``status`` None: no answer)."""

    raws: list[bytes]
    first_seq: int
    status: int | None = None
    ack: dict[str, Any] | None = None


@dataclass
class CrashReport:
    kills: int = 0
    seconds: float = 0.0
    posts: int = 0
    acked_posts: int = 0
    acked_records: int = 0
    refused_posts: int = 0  # 409 stale-head between racing writers, 429, ...
    unacked_posts: int = 0  # sent, no answer (the kill)
    unacked_committed: int = 0  # ... whose records are all there
    unacked_absent: int = 0  # ... of which none is
    final_size: int = 0
    kill_modes: Counter[str] = field(default_factory=Counter)
    restart_seconds: list[float] = field(default_factory=list)
    audits: int = 0
    violations: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "kills": self.kills,
            "seconds": round(self.seconds, 1),
            "posts": self.posts,
            "acked_posts": self.acked_posts,
            "acked_records": self.acked_records,
            "refused_posts": self.refused_posts,
            "unacked_posts": self.unacked_posts,
            "unacked_committed": self.unacked_committed,
            "unacked_absent": self.unacked_absent,
            "final_size": self.final_size,
            "kill_modes": dict(self.kill_modes),
            "restart_seconds": {k: round(v, 2) for k, v in percentiles(self.restart_seconds).items()},
            "writ_audits": self.audits,
            "violations": self.violations,
        }


class _Round:
    """One server life: writers stream until the kill."""

    def __init__(self, url: str, base: LedgerState, root: SeedSigner, rng: random.Random) -> None:
        self.url = url
        self.root = root
        self.rng = rng
        self.base = base
        self.stop = threading.Event()
        self.sent = threading.Event()  # set each time a POST goes out
        self.lock = threading.Lock()
        self.posts: list[Post] = []

    def writer(self, wid: int, seed: int) -> None:
        rng = random.Random(seed)
        with self.lock:
            state = self.base.copy()
        n = 0
        with httpx.Client(timeout=10.0) as client:
            while not self.stop.is_set():
                k = 1 if rng.random() < 0.3 else rng.randint(10, 100)
                work, raws = grant_batch(state, self.root, [f"w{wid}-{n + i}" for i in range(k)])
                n += k
                post = Post(raws, state.size)
                with self.lock:
                    self.posts.append(post)
                self.sent.set()
                try:
                    r = client.post(
                        self.url + "/v1/records",
                        content=encoding.pack_records(raws),
                        headers={"content-type": "application/msgpack"},
                    )
                except httpx.HTTPError:
                    return  # the server is gone: this POST stays unanswered
                post.status = r.status_code
                if r.status_code == 200:
                    post.ack = r.json()
                    state = work
                    continue
                if r.status_code == 429:
                    time.sleep(float(r.headers.get("retry-after", "1")))
                # 409 (another writer won the seq) or another refusal: catch up from the server
                try:
                    state.apply_all(fetch_records(client, self.url, state.size))
                except httpx.HTTPError:
                    return


class CrashRunner:
    """The whole experiment; :meth:`run` returns a :class:`CrashReport` (violations listed, not raised)."""

    def __init__(
        self,
        work_dir: Path,
        *,
        kills: int,
        seed: int = 1,
        writers: int = 2,
        max_delay: float = 0.4,
        audit_every: int = 0,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.work_dir = work_dir
        self.kills = kills
        self.rng = random.Random(seed)
        self.seed = seed
        self.writers = writers
        self.max_delay = max_delay
        self.audit_every = audit_every
        self.log = log or (lambda _msg: None)
        self.root = SeedSigner(sha256(b"writ-crash-root/" + str(seed).encode()))
        self.report = CrashReport()
        # what has been verified so far
        self.state = LedgerState(self.root.public_key, origin=ORIGIN)
        self.levels = MerkleLevels()
        self.served: list[bytes] = []
        self.acked: dict[int, bytes] = {}
        self.last_ts = 0
        self.data_dir = work_dir / "data"
        self.log_key = b""

    # -- checks --------------------------------------------------------------

    def _violation(self, msg: str) -> None:
        self.report.violations.append(msg)
        self.log("VIOLATION: " + msg)

    def check(self, srv: ServerProcess, posts: list[Post]) -> None:
        with httpx.Client(timeout=30.0) as client:
            served = fetch_records(client, srv.url)
            n_old = len(self.served)
            if served[:n_old] != self.served:
                bad = (
                    next(i for i, (a, b) in enumerate(zip(served, self.served, strict=False)) if a != b)
                    if (len(served) >= n_old)
                    else len(served)
                )
                self._violation(f"a record served before the kill changed or vanished (first at seq {bad})")
                return
            try:
                audit([served[n_old:]], anchor=self.root.public_key, state=self.state)
            except Exception as exc:  # the audit names the first bad record
                self._violation(f"the served ledger does not audit clean: {exc!r}")
                return
            self.levels.extend(leaf_hash(r) for r in served[n_old:])
            self.served = served
            for p in posts:
                if p.ack is not None:
                    for i, raw in enumerate(p.raws):
                        self.acked[p.first_seq + i] = raw
                    size, root = p.ack["size"], bytes.fromhex(p.ack["root"])
                    if p.ack["first_seq"] != p.first_seq or p.ack["appended"] != len(p.raws):
                        self._violation(f"acknowledgement {p.ack} does not describe the batch sent")
                    if size > len(served) or self.levels.root(size) != root:
                        self._violation(f"acknowledged head ({size}, {root.hex()[:16]}) is not a served head")
                elif p.status is None:
                    present = sum(
                        1
                        for i, raw in enumerate(p.raws)
                        if p.first_seq + i < len(served) and served[p.first_seq + i] == raw
                    )
                    self.report.unacked_posts += 1
                    if present == len(p.raws):
                        self.report.unacked_committed += 1
                    elif present == 0:
                        self.report.unacked_absent += 1
                    else:
                        self._violation(
                            f"torn batch: {present} of the {len(p.raws)} records of an unacknowledged "
                            f"POST (seqs {p.first_seq}..) are stored"
                        )
                else:
                    self.report.refused_posts += 1
                    if any(
                        p.first_seq + i < len(served) and served[p.first_seq + i] == raw
                        for i, raw in enumerate(p.raws)
                    ):
                        self._violation(f"a POST refused with {p.status} was stored (seq {p.first_seq}..)")
            for seq, raw in self.acked.items():
                if seq >= len(served) or served[seq] != raw:
                    self._violation(f"acknowledged record {seq} lost or changed after SIGKILL")
                    break
            try:
                vc = verify_checkpoint(client, srv.url, ORIGIN, self.log_key, len(served), self.state.root)
                ts = vc.timestamp or 0
                if ts < self.last_ts:
                    self._violation(f"checkpoint timestamp went back from {self.last_ts} to {ts}")
                self.last_ts = ts
                last = (len(served) - 1) // TILE_WIDTH
                check_tiles(client, srv.url, served, self.levels, last)
                if last > 0:
                    check_tiles(client, srv.url, served, self.levels, self.rng.randrange(last))
            except Exception as exc:
                self._violation(f"torn read path: {exc!r}")

    # -- the loop ------------------------------------------------------------

    def _one_round(self, srv: ServerProcess) -> list[Post]:
        rnd = _Round(srv.url, self.state, self.root, self.rng)
        threads = [
            threading.Thread(target=rnd.writer, args=(w, self.rng.getrandbits(32)), daemon=True)
            for w in range(self.writers)
        ]
        for t in threads:
            t.start()
        rnd.sent.wait(10.0)  # the stream has started
        if self.rng.random() < 0.5:
            mode = "mid-post"
            time.sleep(self.rng.uniform(0.0, self.max_delay / 2))
            rnd.sent.clear()
            rnd.sent.wait(10.0)
            time.sleep(self.rng.uniform(0.0, 0.01))
        else:
            mode = "random"
            time.sleep(self.rng.uniform(0.0, self.max_delay))
        srv.process.send_signal(signal.SIGKILL)
        srv.process.wait(10)
        rnd.stop.set()
        for t in threads:
            t.join(30)
        self.report.kill_modes[mode] += 1
        with rnd.lock:
            posts = list(rnd.posts)
        self.report.posts += len(posts)
        self.report.acked_posts += sum(1 for p in posts if p.ack is not None)
        self.report.acked_records += sum(len(p.raws) for p in posts if p.ack is not None)
        return posts

    def _start(self) -> ServerProcess:
        t = time.monotonic()
        srv = start_server(self.data_dir, ready_timeout=120.0, **SERVER_FLAGS)
        self.report.restart_seconds.append(time.monotonic() - t)
        return srv

    def run(self) -> CrashReport:
        t0 = time.monotonic()
        self.log_key = init_server(self.data_dir, self.root, ORIGIN)
        srv = self._start()
        try:
            base = base_ledger(self.root, ORIGIN, self.log_key)
            self.check(srv, [Post(base, 0, 200, post_records(srv.url, base))])
            for k in range(1, self.kills + 1):
                posts = self._one_round(srv)
                stop_server(srv.process)  # already dead: closes its pipe
                self.report.kills = k
                srv = self._start()
                self.check(srv, posts)
                if self.audit_every and k % self.audit_every == 0:
                    writ_audit_data(self.data_dir, self.root.public_key)
                    self.report.audits += 1
                self.log(
                    f"kill {k}/{self.kills}: size {len(self.served)}, {self.report.acked_records} records "
                    f"acknowledged, restart {self.report.restart_seconds[-1]:.2f} s"
                )
                if self.report.violations:
                    break
        finally:
            code_stop = stop_server(srv.process)
        if code_stop != 0:
            self._violation(f"writ serve exited {code_stop} on SIGTERM")
        doc = writ_audit_data(self.data_dir, self.root.public_key)
        self.report.audits += 1
        if (doc["size"], doc["root"]) != (len(self.served), self.state.root.hex()):
            self._violation(
                f"writ audit --data reports {doc['size']} records, {len(self.served)} were served"
            )
        self.report.final_size = len(self.served)
        self.report.seconds = time.monotonic() - t0
        return self.report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m reliability.crash", description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--writers", type=int, default=2)
    ap.add_argument("--max-delay", type=float, default=0.4, help="longest random stream before a kill (s)")
    ap.add_argument("--audit-every", type=int, default=0, help="run `writ audit --data` every N kills")
    ap.add_argument("--work-dir", type=Path, help="keep the data directory here (default: a temp dir)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="writ-crash-"))
    work.mkdir(parents=True, exist_ok=True)
    runner = CrashRunner(
        work,
        kills=args.kills,
        seed=args.seed,
        writers=args.writers,
        max_delay=args.max_delay,
        audit_every=args.audit_every,
        log=None if args.quiet else lambda m: print(m, file=sys.stderr, flush=True),
    )
    report = runner.run()
    out = report.to_json()
    out["machine"] = machine()
    print(json.dumps(out))
    if args.work_dir is None and not report.violations:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
