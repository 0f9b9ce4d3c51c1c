"""Load on the real server over loopback (bounded in count and time; stops by itself).

``reliability/load.py`` drives one ``writ serve`` process with idle SSE
clients, checkpoint pollers and racing writers at once, then checks that no
acknowledged record is lost, every stream got the last checkpoint, and the
ledger audits clean after SIGTERM. The second test gives the server a small
SSE cap and write rate and checks it sheds the excess with 503 ``overloaded``
and 429 ``rate-limited`` (both with ``Retry-After``), never corrupting
anything. ``WRIT_LOAD_SSE`` / ``WRIT_LOAD_SECONDS`` enlarge the first test;
``python -m reliability.load --sse 10000`` is the long local run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from reliability.load import LoadConfig, LoadRun

pytestmark = pytest.mark.e2e


def test_idle_sse_clients_polling_and_writers_at_once(tmp_path: Path) -> None:
    cfg = LoadConfig(
        sse=int(os.environ.get("WRIT_LOAD_SSE", "1000")),
        pollers=10,
        writers=2,
        duration=float(os.environ.get("WRIT_LOAD_SECONDS", "8")),
        checkpoint_interval=2.0,
    )
    report = LoadRun(tmp_path, cfg).run()
    print(json.dumps(report.to_json()))
    assert report.violations == []
    assert report.sse_connected == cfg.sse and not report.sse_refused and not report.sse_errors
    assert report.sse_missing_last == 0 and report.sse_dropped == 0
    assert report.polls > 0 and set(report.poll_status) == {"200"}
    assert set(report.writes) <= {"200", "409"} and report.writes["200"] > 0  # 409: writers racing
    assert report.acked_records > 0 and report.audit_ok
    # every stream heard every re-sign too: at least one event per checkpoint interval
    assert report.sse_events >= cfg.sse * int(cfg.duration / cfg.checkpoint_interval)


def test_the_server_sheds_writes_with_429_and_stays_consistent(tmp_path: Path) -> None:
    cfg = LoadConfig(
        sse=20,
        pollers=2,
        writers=3,
        write_rate=5.0,
        write_burst=5,
        write_pause=0.0,
        duration=4.0,
        checkpoint_interval=1.0,
    )
    report = LoadRun(tmp_path, cfg).run()
    print(json.dumps(report.to_json()))
    assert report.violations == []
    assert report.writes["429"] > 0 and report.write_retry_after == report.writes["429"]
    assert set(report.writes) <= {"200", "409", "429"} and report.writes["200"] > 0
    assert report.writes["200"] <= 5 + cfg.duration * 5.0 * 2  # the bucket held
    assert report.audit_ok and report.sse_missing_last == 0


def _sse_cap(tmp_path: Path, sse: int, connect_batch: int) -> None:
    cfg = LoadConfig(
        sse=sse, max_sse_clients=50, pollers=1, writers=1, duration=2.0, connect_batch=connect_batch
    )
    report = LoadRun(tmp_path, cfg).run()
    print(json.dumps(report.to_json()))
    assert report.violations == [] and report.audit_ok
    assert report.sse_connected == 50, f"{report.sse_connected} streams admitted with a cap of 50"
    refused = sse - 50
    assert (
        dict(report.sse_refused) == {"503 overloaded": refused} and report.sse_refused_retry_after == refused
    )


def test_the_sse_cap_sheds_streams_opened_one_by_one_with_503(tmp_path: Path) -> None:
    _sse_cap(tmp_path, sse=80, connect_batch=1)


def test_the_sse_cap_holds_for_streams_opened_at_once(tmp_path: Path) -> None:
    _sse_cap(tmp_path, sse=200, connect_batch=200)
