"""SIGKILL the real server at random moments of a stream of appends (docs/threats.md:
power loss or kill -9): no acknowledged record is lost, nothing torn is served,
an unacknowledged batch is all or nothing, the ledger audits clean.

``reliability/crash.py`` does the work (see its docstring for every check);
CI runs ``WRIT_CRASH_KILLS`` kills (default 50), the long local run is
``python -m reliability.crash --kills 200``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from device_sim.server_process import start_server, stop_server
from reliability.crash import ORIGIN, CrashRunner, Post
from tests.helpers.server import Mirror

pytestmark = pytest.mark.e2e


def test_sigkill_at_random_moments_loses_nothing_and_tears_nothing(tmp_path: Path) -> None:
    kills = int(os.environ.get("WRIT_CRASH_KILLS", "50"))
    seed = int(os.environ.get("WRIT_CRASH_SEED", "1"))
    report = CrashRunner(tmp_path, kills=kills, seed=seed).run()
    print(json.dumps(report.to_json()))
    assert report.violations == []
    assert report.kills == kills
    # the stream really ran, and kills landed both between and inside requests
    assert report.acked_records > 5 * kills
    assert report.unacked_posts > 0 and report.unacked_absent > 0
    assert set(report.kill_modes) == {"mid-post", "random"}
    assert report.final_size >= 2 + report.acked_records


def test_the_crash_checker_is_not_blind(tmp_path: Path) -> None:
    """The checks above would see a lost acknowledgement, a torn batch and a changed record."""
    runner = CrashRunner(tmp_path, kills=0)
    assert runner.run().violations == []
    srv = start_server(runner.data_dir)
    try:
        m = Mirror(runner.root, ORIGIN)
        m.extend(runner.served)
        n = len(runner.served)
        never_stored = m.grant(os.urandom(32), "operator", "never-stored")
        ack = {"size": n + 1, "root": m.state.root.hex(), "appended": 1, "first_seq": n}
        runner.check(srv, [Post([never_stored], n, 200, ack)])
        runner.check(srv, [Post([runner.served[1], never_stored], 1, None)])
        runner.served[0] = runner.served[0][:-1] + bytes([runner.served[0][-1] ^ 1])
        runner.check(srv, [])
    finally:
        stop_server(srv.process)
    v = " | ".join(runner.report.violations)
    for seen in (
        "acknowledged head (3,",
        "acknowledged record 2 lost",
        "torn batch: 1 of the 2",
        "changed or vanished",
    ):
        assert seen in v, v
