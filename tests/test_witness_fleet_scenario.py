"""``python -m device_sim fleet --scenario stolen-log-key`` against a real
``writ serve --witness A --witness B`` and two real witnesses."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import pytest

from .helpers.server import RunningServer, run_writ, start_server, stop_server, writ_command
from .helpers.witness import RunningWitness, init_witness, run_json, start_witness, stop_witness

pytestmark = pytest.mark.e2e

ORIGIN = "ledger.example/stolen"
PW = "scenario passphrase"


class Setup(NamedTuple):
    env: dict[str, str]
    root: Path
    srv: RunningServer
    witnesses: list[RunningWitness]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("stolen")
    env = {**os.environ, "WRIT_HOME": str(tmp / "home"), "PW": PW, "WRIT_KDF_COST": "interactive"}
    env.pop("WRIT_ANCHOR", None)
    root = tmp / "root.key"
    code, doc = run_json(
        [*writ_command(), "root", "init", "--out", str(root), "--passphrase-env", "PW", "--no-successor"], env
    )
    assert code == 0, doc
    anchor = doc["anchor"]
    data = tmp / "server" / "data"
    code, sdoc, err = run_writ("server", "init", "--data", str(data), "--anchor", anchor, "--origin", ORIGIN)
    assert code == 0, err
    witnesses = []
    for i in (1, 2):
        wdir = tmp / f"w{i}" / "data"
        init_witness(wdir, f"witness.example/w{i}")
        witnesses.append(start_witness(wdir, [f"{ORIGIN}={sdoc['log_vkey']}"]))
    srv = start_server(data, checkpoint_interval=1, witness=[w.url for w in witnesses])
    try:
        key = ["--key", str(root), "--passphrase-env", "PW"]
        assert (
            run_json([*writ_command(), "genesis", "--origin", ORIGIN, "--server", srv.url, *key], env)[0] == 0
        )
        for w in witnesses:
            code, doc = run_json(
                [*writ_command(), "grant", "--server", srv.url, "--subject", w.public_key.hex(),
                 "--role", "witness", "--name", w.name, *key],
                env,
            )  # fmt: skip
            assert code == 0, doc
        assert httpx.get(srv.url + "/v1/ledger").status_code == 200
        yield Setup(env, root, srv, witnesses)
    finally:
        stop_server(srv)
        for w in witnesses:
            stop_witness(w)


def _fleet(s: Setup, k: int) -> tuple[int, dict[str, Any]]:
    return run_json(
        [sys.executable, "-m", "device_sim", "fleet", "--server", s.srv.url, "--devices", "4",
         "--key", str(s.root), "--passphrase-env", "PW", "--scenario", "stolen-log-key",
         "--log-key", str(s.srv.data_dir / "log.key"), "--require-witnesses", str(k), "--max-staleness", "2"],
        s.env,
    )  # fmt: skip


def test_without_witnesses_the_stolen_log_key_fools_the_frozen_half(setup: Setup) -> None:
    code, out = _fleet(setup, 0)
    assert code == 1 and out["all_refused"] is False
    assert out["accepted_before"] == 5
    assert out["frozen"]["accepted"] == 2  # fooled: they accept the revoked tablet
    assert out["honest"] == {"accepted": 0, "refused": 2, "reasons": {"revoked": 2}}
    assert out["control_k0"]["fooled"] is True


def test_with_one_witness_required_every_device_refuses_and_keeps_evidence(setup: Setup) -> None:
    code, out = _fleet(setup, 1)
    assert code == 0 and out["all_refused"] is True, out
    assert out["frozen"] == {"accepted": 0, "refused": 2, "reasons": {"stale": 2}}
    assert out["honest"] == {"accepted": 0, "refused": 2, "reasons": {"revoked": 2}}
    assert out["rollback_evidence"] == 2
    assert out["control_k0"]["fooled"] is True


def test_the_scenario_needs_the_stolen_key(setup: Setup) -> None:
    code, out = run_json(
        [sys.executable, "-m", "device_sim", "fleet", "--server", setup.srv.url, "--devices", "2",
         "--key", str(setup.root), "--passphrase-env", "PW", "--scenario", "stolen-log-key"],
        setup.env,
    )  # fmt: skip
    assert code == 2 and out["error"] == "usage"
