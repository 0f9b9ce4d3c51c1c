"""The ``writ`` console script as real processes against a real ``writ serve``.

One flow, end to end, the way an integrator runs it: root init with 2-of-3
shares -> server init / serve -> genesis -> a device enrolls itself
(``python -m device_sim device init``) and is granted from its request -> a
tablet and an on-call revoker key are granted -> the tablet is lost and the
on-call engineer revokes it by name with the revoker key -> the device syncs
and posts its receipt -> ``writ status tablet-07`` shows how far the revoke
spread -> audits from the server and from the data directory; then a bundle
for a site with no network, applied by the device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ledger import messages
from ledger.crypto import SeedSigner
from ledger.state import LedgerState
from tests.helpers.server import running_server, writ_command
from tests.helpers.story import grant_oncall, oncall_env, oncall_revokes_tablet, root_init

pytestmark = pytest.mark.e2e

ORIGIN = "ledger.example/e2e"
PW = "e2e passphrase"


def _run(cmd: list[str], env: dict[str, str], timeout: float = 60.0) -> tuple[int, dict[str, Any], str]:
    proc = subprocess.run(
        cmd, capture_output=True, timeout=timeout, check=False, env=env, stdin=subprocess.DEVNULL
    )
    out = proc.stdout.decode().strip().splitlines()
    err = proc.stderr.decode()
    assert "Traceback" not in err, err
    assert len(out) == 1, (cmd, proc.stdout, err)
    return proc.returncode, json.loads(out[0]), err


def test_lost_tablet_end_to_end(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "WRIT_HOME": str(tmp_path / "home"),
        "PW": PW,
        "WRIT_KDF_COST": "interactive",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("WRIT_ANCHOR", None)

    def writ(*args: object, code: int = 0, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
        rc, doc, err = _run([*writ_command(), *map(str, args)], {**env, **(extra_env or {})})
        assert rc == code, (args, doc, err)
        return doc

    def device(*args: object) -> dict[str, Any]:
        rc, doc, err = _run([sys.executable, "-m", "device_sim", *map(str, args)], env)
        assert rc == 0, (args, doc, err)
        return doc

    init, key = root_init(writ, tmp_path)
    anchor = init["anchor"]
    assert init["next_root_digest"] and len(init["shares"]) == 3

    with running_server(tmp_path, bytes.fromhex(anchor), ORIGIN, checkpoint_interval=1) as srv:
        g = writ("genesis", "--origin", ORIGIN, "--server", srv.url, *key)
        assert g == {**g, "seq": 1, "log_public_key": srv.log_public_key.hex()}

        plc = tmp_path / "plc"
        dev = device(
            "device", "init", "--state", plc, "--anchor", anchor, "--origin", ORIGIN, "--name", "plc-17"
        )
        d = writ("grant", "--server", srv.url, "--request", plc / "enroll.bin", "--role", "device", *key)
        assert d["name"] == "plc-17" and d["subject"] == dev["public_key"]

        tablet = SeedSigner.generate()
        (tmp_path / "tablet.enroll").write_bytes(messages.make_enroll(tablet, "tablet-07", int(time.time())))
        t = writ(
            "grant", "--server", srv.url, "--request", tmp_path / "tablet.enroll", "--role", "operator", *key
        )
        oncall = grant_oncall(writ, srv.url, key, tmp_path)

        # THE lost-tablet command, from the on-call engineer's own machine (own mirror)
        r = oncall_revokes_tablet(writ, srv.url, tmp_path, anchor)
        assert r["target"] == t["seq"] and r["reason"] == "lost"

        synced = device("device", "sync", "--state", plc, "--server", srv.url)
        assert synced["size"] == r["seq"] + 1
        device("device", "receipt", "--state", plc, "--server", srv.url)
        s = writ("status", "tablet-07", "--server", srv.url, extra_env=oncall_env(tmp_path, anchor))
        assert s["status"] == "revoked" and s["revocation"]["seq"] == r["seq"]
        assert s["devices"]["applied"] == 1 and s["devices"]["total"] == 1

        # nothing left to revoke: a clean refusal, nothing appended
        oncall_revokes_tablet(writ, srv.url, tmp_path, anchor, code=1)

        a = writ("audit", "--server", srv.url, "--anchor", anchor)
        assert a["ok"] and a["size"] == r["seq"] + 1 and a["checkpoint"]["size"] == a["size"]
        assert a["records_by_kind"]["revoke"] == 1

        # a site with no network path: a bundle, applied by a fresh device
        bundle = tmp_path / "site.bundle"
        writ("bundle", "export", "--server", srv.url, "--out", bundle)
        site = tmp_path / "site"
        device("device", "init", "--state", site, "--anchor", anchor, "--origin", ORIGIN)
        assert device("device", "sync", "--state", site, "--bundle", bundle)["size"] == a["size"]

        # every record verifies byte for byte under the core's rules
        st = LedgerState(bytes.fromhex(anchor))
        for raw in messages.parse_bundle(bundle.read_bytes()).records:
            assert st.apply(raw).raw == raw
        assert st.root.hex() == a["root"]
        data_dir = srv.data_dir

    # the auditor reads the stopped server's database read-only, without its storage code
    d2 = writ("audit", "--data", data_dir, "--anchor", anchor, "--json")
    assert d2["root"] == a["root"]
    unreachable = writ(
        "status", "tablet-07", "--server", srv.url, code=4, extra_env=oncall_env(tmp_path, anchor)
    )
    assert unreachable["error"] == "unreachable"
    # `python -m api.main` (the composition root) is the same program
    rc, doc, _ = _run([sys.executable, "-m", "api.main", "key", "public", str(tmp_path / "oncall.key")], env)
    assert rc == 0 and doc["public_key"] == oncall["public_key"]
