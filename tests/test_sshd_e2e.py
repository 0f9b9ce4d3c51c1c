"""Ledger-governed SSH with real programs: ``writ serve``, the device agent,
a real OpenSSH ``sshd -D`` asking ``device authorized-keys``, and ``ssh -i``.

The lost-tablet story over SSH: a tablet (``holder init``) is granted from its
enrollment request and logs in; the integrator revokes it by name; the agent
applies the SSE push and the next login is refused within 5 s of the revoke's
acknowledgement. Also refused: a grant signed but never published, an
expired grant, a technician's own ssh-keygen key once its key is revoked, and
a tablet granted for another site. Skipped only where sshd cannot run (not
root, OpenSSH missing), with the reason.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.sshd import SSH_KEYGEN, Sshd, agent_applied, running_sshd, ssh_login, sshd_unavailable
from tests.helpers.server import running_server, writ_command

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(sshd_unavailable() is not None, reason=str(sshd_unavailable())),
]

ORIGIN = "ledger.example/ssh-e2e"
PW = "e2e passphrase"
DEVICE_SCOPE = "plant-7/line-3"


class Env:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.env = {
            **os.environ,
            "WRIT_HOME": str(tmp / "home"),
            "PW": PW,
            "WRIT_KDF_COST": "interactive",
            "PYTHONUNBUFFERED": "1",
        }
        self.env.pop("WRIT_ANCHOR", None)
        self.key = ["--key", str(tmp / "root.key"), "--passphrase-env", "PW"]
        self.server = ""

    def run(self, cmd: list[str], code: int = 0) -> dict[str, Any]:
        proc = subprocess.run(
            cmd, capture_output=True, timeout=60, check=False, env=self.env, stdin=subprocess.DEVNULL
        )
        err = proc.stderr.decode()
        assert "Traceback" not in err, err
        out = proc.stdout.decode().strip().splitlines()
        assert proc.returncode == code, (cmd, proc.stdout, err)
        doc: dict[str, Any] = json.loads(out[-1]) if out else {}
        return doc

    def writ(self, *args: object, code: int = 0) -> dict[str, Any]:
        return self.run([*writ_command(), *map(str, args)], code)

    def device(self, *args: object, code: int = 0) -> dict[str, Any]:
        return self.run([sys.executable, "-m", "device_sim", *map(str, args)], code)

    def grant(self, *args: object) -> int:
        seq: int = self.writ("grant", "--server", self.server, *args, *self.key)["seq"]
        return seq


@pytest.fixture
def agent_log(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "agent.log"


def _start_agent(e: Env, plc: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "device_sim", "device", "run", "--state", str(plc), "--server", e.server],
            stdout=subprocess.PIPE,
            stderr=err,
            env=e.env,
            stdin=subprocess.DEVNULL,
        )


def _holder(e: Env, name: str) -> tuple[Path, dict[str, Any]]:
    d = e.tmp / name
    return d, e.device("holder", "init", "--state", d, "--name", name)


def test_lost_tablet_is_refused_by_a_real_sshd_within_5_s(tmp_path: Path, agent_log: Path) -> None:
    e = Env(tmp_path)
    anchor = e.writ(
        "root", "init", "--out", tmp_path / "root.key", "--passphrase-env", "PW", "--no-successor"
    )["anchor"]
    with running_server(tmp_path, bytes.fromhex(anchor), ORIGIN, checkpoint_interval=1) as srv:
        e.server = srv.url
        e.writ("genesis", "--origin", ORIGIN, "--server", srv.url, *e.key)
        plc = tmp_path / "plc"
        e.device("device", "init", "--state", plc, "--anchor", anchor, "--origin", ORIGIN, "--name", "plc-17")
        e.grant("--request", plc / "enroll.bin", "--role", "device", "--scope", DEVICE_SCOPE)

        tablet, t = _holder(e, "tablet-07")
        assert t["ssh_public_key"].startswith("ssh-ed25519 ")
        e.grant("--request", tablet / "enroll.bin", "--role", "operator", "--scope", "plant-7")

        # refused cases, prepared before the agent starts
        other_site, _ = _holder(e, "tablet-other-site")
        e.grant("--request", other_site / "enroll.bin", "--role", "operator", "--scope", "plant-9")
        unpublished, _ = _holder(e, "tablet-unpublished")
        e.writ(
            "sign",
            "--server",
            srv.url,
            "grant",
            "--request",
            unpublished / "enroll.bin",
            "--role",
            "operator",
            "--out",
            tmp_path / "never-pushed.records",
            *e.key,
        )
        own = tmp_path / "alice_ed25519"
        assert SSH_KEYGEN is not None
        subprocess.run(
            [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", "alice", "-f", str(own)], check=True
        )
        alice = e.writ(
            "grant", "--server", srv.url, "--ssh-public-key", f"{own}.pub", "--role", "operator", *e.key
        )
        assert alice["name"] == "alice"
        expiring, _ = _holder(e, "tablet-expiring")
        expires_at = int(time.time()) + 12
        e.grant("--request", expiring / "enroll.bin", "--role", "operator", "--not-after", expires_at)

        agent = _start_agent(e, plc, agent_log)
        try:
            agent_applied(agent_log, alice["size"] + 1)
            with running_sshd(tmp_path / "sshd", plc) as sshd:
                assert ssh_login(sshd, expiring / "id_ed25519"), sshd.log.read_text()[-3000:]
                assert ssh_login(sshd, tablet / "id_ed25519")
                assert ssh_login(sshd, own)
                assert not ssh_login(sshd, other_site / "id_ed25519")  # out of scope
                assert not ssh_login(sshd, unpublished / "id_ed25519")  # signed, never published

                # the tablet is lost: the integrator revokes it by name
                r = e.writ("revoke", "--server", srv.url, "--name", "tablet-07", "--reason", "lost", *e.key)
                acked = time.monotonic()  # the command exits after the server's acknowledgement
                refused_after = _first_refusal(sshd, tablet / "id_ed25519", acked)
                assert refused_after < 5.0, refused_after
                agent_applied(agent_log, r["size"])

                # a technician's own key, revoked by key: every grant of it ends
                e.writ(
                    "revoke",
                    "--server",
                    srv.url,
                    "--subject",
                    alice["subject"],
                    "--reason",
                    "retired",
                    *e.key,
                )
                _first_refusal(sshd, own, time.monotonic())

                # the expiring grant stops at not_after with no record at all
                time.sleep(max(0.0, expires_at - time.time() + 0.2))
                assert not ssh_login(sshd, expiring / "id_ed25519")
                assert ssh_login(sshd, tablet / "id_ed25519") is False
        finally:
            agent.send_signal(signal.SIGTERM)
            stdout, _ = agent.communicate(timeout=5)
            assert agent.returncode == 0
        out = json.loads(stdout)
        assert out["stopped"] is True
        events = [json.loads(x)["event"] for x in agent_log.read_text().splitlines()]
        assert "receipt" in events and events[-1] == "stopped"


def _first_refusal(sshd: Sshd, key: Path, since: float, limit: float = 10.0) -> float:
    """Log in back to back until refused; seconds from ``since`` to that refusal."""
    while time.monotonic() - since < limit:
        if not ssh_login(sshd, key):
            return time.monotonic() - since
    raise AssertionError(f"{key} still logs in {limit} s after its revoke: {sshd.log.read_text()[-3000:]}")


def test_the_deploy_sshd_snippet_passes_sshd_t_and_governs_only_its_accounts(tmp_path: Path) -> None:
    from bench.sshd import SSHD

    assert SSHD is not None and SSH_KEYGEN is not None
    subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "host")], check=True)
    snippet = Path(__file__).resolve().parent.parent / "deploy" / "sshd_config.d" / "writ.conf"
    cfg = tmp_path / "sshd_config"
    cfg.write_text(f"HostKey {tmp_path / 'host'}\nPidFile none\nInclude {snippet}\n")
    assert subprocess.run([SSHD, "-t", "-f", str(cfg)], capture_output=True, check=False).returncode == 0

    def effective(user: str) -> dict[str, str]:
        out = subprocess.run(
            [SSHD, "-T", "-f", str(cfg), "-C", f"user={user},host=x,addr=127.0.0.1"],
            capture_output=True,
            check=True,
            text=True,
        ).stdout
        return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)

    tech = effective("technician")
    assert tech["authorizedkeyscommand"] == "/usr/local/lib/writ/writ-authorized-keys %u"
    assert tech["authorizedkeyscommanduser"] == "writ-device"
    assert (tech["authorizedkeysfile"], tech["passwordauthentication"]) == ("none", "no")
    assert effective("someone-else")["authorizedkeyscommand"] == "none"
