"""Black-box witness run: two real ``writ witness serve``, a real ``writ serve
--witness A --witness B``, and devices (``python -m device_sim``) requiring
K = 1 and K = 2 cosignatures; then one witness goes down and, with K = 1,
nothing stalls."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from ledger import checkpoints, encoding, messages
from ledger.crypto import SeedSigner

from .helpers.server import run_writ, start_server, stop_server, writ_command
from .helpers.witness import init_witness, run_json, start_witness, stop_witness

pytestmark = pytest.mark.e2e

ORIGIN = "ledger.example/witnessed"
PW = "witness passphrase"


def _wait(pred: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_two_witnesses_a_real_server_and_devices_requiring_1_and_2(tmp_path: Path) -> None:
    env = {**os.environ, "WRIT_HOME": str(tmp_path / "home"), "PW": PW, "WRIT_KDF_COST": "interactive"}
    env.pop("WRIT_ANCHOR", None)

    def writ(*args: object) -> dict[str, Any]:
        code, doc = run_json([*writ_command(), *map(str, args)], env)
        assert code == 0, (args, doc)
        return doc

    def device(*args: object, code: int = 0) -> dict[str, Any]:
        rc, doc = run_json([sys.executable, "-m", "device_sim", *map(str, args)], env)
        assert rc == code, (args, doc)
        return doc

    root = tmp_path / "root.key"
    anchor = writ("root", "init", "--out", root, "--passphrase-env", "PW", "--no-successor")["anchor"]
    key = ["--key", root, "--passphrase-env", "PW"]
    data = tmp_path / "server" / "data"
    code, server_doc, err = run_writ(
        "server", "init", "--data", str(data), "--anchor", anchor, "--origin", ORIGIN
    )
    assert code == 0, err
    log_vkey = server_doc["log_vkey"]

    witnesses = []
    for i in (1, 2):
        wdir = tmp_path / f"witness-{i}" / "data"
        init_witness(wdir, f"witness.example/w{i}")
        witnesses.append(start_witness(wdir, [f"{ORIGIN}={log_vkey}"]))
    srv = start_server(data, checkpoint_interval=1, witness=[w.url for w in witnesses])
    try:
        url = srv.url
        writ("genesis", "--origin", ORIGIN, "--server", url, *key)
        for w in witnesses:
            writ(
                "grant",
                "--server",
                url,
                "--subject",
                w.public_key.hex(),
                "--role",
                "witness",
                "--name",
                w.name,
                *key,
            )

        def ledger() -> dict[str, Any]:
            doc: dict[str, Any] = httpx.get(url + "/v1/ledger").json()
            return doc

        def cosigned(n: int) -> bool:
            led = ledger()
            return sum(1 for x in led["witnesses"] if x["cosigned_size"] == led["size"]) >= n

        _wait(lambda: cosigned(2), "both witnesses to cosign")
        note = httpx.get(url + "/checkpoint").text
        vc = checkpoints.verify_checkpoint(
            note,
            ORIGIN,
            [srv.log_public_key],
            [(w.name, w.public_key) for w in witnesses],
            require_witnesses=2,
        )
        assert set(vc.cosigners) == {w.name for w in witnesses}

        devices = {}
        for k in (1, 2):
            d = tmp_path / f"device-k{k}"
            device(
                "device",
                "init",
                "--state",
                d,
                "--anchor",
                anchor,
                "--origin",
                ORIGIN,
                "--require-witnesses",
                k,
            )
            devices[k] = d

        tablet = SeedSigner.generate()
        t = writ(
            "grant", "--server", url, "--subject", tablet.public_key.hex(), "--role", "operator",
            "--name", "tablet-07", *key,
        )  # fmt: skip
        raw = encoding.unpack_records(
            httpx.get(url + f"/v1/records?start={t['seq']}&limit=1").content, max_count=1
        )
        _wait(lambda: cosigned(2), "the tablet's grant to be cosigned")

        def check(d: Path) -> tuple[int, dict[str, Any]]:
            ch = device("device", "challenge", "--state", d)
            auth = d.parent / (d.name + ".auth")
            auth.write_bytes(
                messages.make_auth(
                    raw[0],
                    tablet,
                    bytes.fromhex(ch["device_key"]),
                    bytes.fromhex(ch["challenge"]),
                    int(time.time()),
                )
            )
            rc, doc = run_json(
                [
                    sys.executable,
                    "-m",
                    "device_sim",
                    "device",
                    "check",
                    "--state",
                    str(d),
                    "--auth",
                    str(auth),
                ],
                env,
            )
            return rc, doc

        for d in devices.values():
            assert device("device", "sync", "--state", d, "--server", url)["size"] == ledger()["size"]
            assert check(d) == (0, {**check(d)[1], "accepted": True})

        r = writ(
            "revoke", "--server", url, "--name", "tablet-07", "--reason", "lost", "--wait-witnessed", *key
        )
        assert r["witnessed"]["complete"] and r["witnessed"]["cosigners"] == sorted(w.name for w in witnesses)
        assert r["witnessed"]["size"] > r["seq"]
        for d in devices.values():
            assert device("device", "sync", "--state", d, "--server", url)["size"] == r["seq"] + 1
            rc, doc = check(d)
            assert (rc, doc["reason"]) == (1, "revoked")

        # one of two witnesses down, K = 1: appends, reads and devices go on
        stop_witness(witnesses[1])
        spare = SeedSigner.generate()
        started = time.monotonic()
        s = writ(
            "grant",
            "--server",
            url,
            "--subject",
            spare.public_key.hex(),
            "--role",
            "operator",
            "--name",
            "spare",
            *key,
        )
        assert time.monotonic() - started < 30
        _wait(lambda: cosigned(1), "the surviving witness to cosign")
        led = ledger()
        states = {x["url"]: x["state"] for x in led["witnesses"]}
        assert states[witnesses[0].url] == "ok"
        _wait(
            lambda: {x["url"]: x["state"] for x in ledger()["witnesses"]}[witnesses[1].url] == "down", "down"
        )
        assert device("device", "sync", "--state", devices[1], "--server", url)["size"] == s["seq"] + 1
        audit = writ("audit", "--server", url, "--anchor", anchor)
        assert audit["ok"] and audit["checkpoint"]["cosigners"] == [witnesses[0].name]
        # every witness cosigning is what --wait-witnessed waits for: with one down it times out
        rc, late = run_json(
            [*writ_command(), "grant", "--server", url, "--subject", SeedSigner.generate().public_key.hex(),
             "--role", "operator", "--name", "late", "--wait-witnessed", "2", *map(str, key)],
            env,
        )  # fmt: skip
        assert (rc, late["error"]) == (1, "not-witnessed") and late["witnessed"]["cosigners"] == [
            witnesses[0].name
        ]
    finally:
        stop_server(srv)
        for w in witnesses:
            stop_witness(w)
