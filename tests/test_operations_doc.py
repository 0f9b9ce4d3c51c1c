"""docs/operations.md's commands, run: every `writ` command line of its ``sh`` blocks.

The runbook is read, its fenced ``sh`` blocks are split into command lines,
and every line that runs `writ` is executed in a temporary directory against
real `writ serve` processes, in the order of the page, with a small table
that maps the runbook's hosts, paths and placeholders onto the test's. What
the runbook does with other tools (systemd, `mv`, `curl` to copy records) is
done here in a few lines of glue between the commands. The nginx check's tile
path is fetched from the server: it must exist on a ledger of a few records.

When the page gains, loses or changes a `writ` line, :data:`EXPECTED` fails
first: update it and the scenario together.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers.server import RunningServer, backup_data_dir, start_server, stop_server, writ_command

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "operations.md"
PW = "correct horse battery"
ORIGIN = "ledger.example/plant-7"

#: the `writ` lines of the runbook, in page order (continuation lines joined, comments dropped).
EXPECTED = [
    'sudo -u writ /opt/writ/.venv/bin/writ server init --data /var/lib/writ --anchor "$ANCHOR"'
    " --origin ledger.example/plant-7",
    '/opt/writ/.venv/bin/writ audit --data /tmp/check --anchor "$ANCHOR"',
    "writ revoke --name tablet-07 --reason lost --revoker-key oncall.key --passphrase-env ONCALL_PASSPHRASE"
    " --server https://ledger.example",
    "sudo -u writ $W serve --data /var/lib/writ --port 8100 &",
    'writ bundle export --server http://127.0.0.1:8100 --anchor "$ANCHOR" --out ledger.bundle',
    'writ mirror import --mirror DIR --anchor "$ANCHOR" ledger.bundle',
    'sudo -u writ $W server init --data /var/lib/writ-new --anchor "$ANCHOR" --origin ledger.example/plant-7',
    "sudo -u writ $W serve --data /var/lib/writ-new --port 8101 &",
    'writ sign --offline --mirror DIR --anchor "$ANCHOR" --out logkey.bin revoke --name log'
    " --reason key_compromise --key root.key --passphrase-env ROOT_PASSPHRASE",
    'writ sign --offline --mirror DIR --anchor "$ANCHOR" --out logkey.bin grant --subject NEW_LOG_PUBLIC_KEY'
    " --role log --name log-2 --key root.key --passphrase-env ROOT_PASSPHRASE",
    'writ audit --server https://ledger.example --anchor "$ANCHOR"',
]


def sh_lines(text: str) -> list[str]:
    """Every command line of the ``sh`` blocks (continuations joined, trailing comments dropped)."""
    out: list[str] = []
    for block in re.findall(r"^ *```sh\n(.*?)^ *```", text, re.M | re.S):
        joined = re.sub(r"\\\n\s*", "", block)
        for line in joined.splitlines():
            line = re.sub(r"\s{2,}#.*$", "", line).strip()
            if line and not line.startswith("#"):
                out.append(" ".join(line.split()))
    return out


def writ_lines(text: str) -> list[str]:
    pattern = re.compile(r"^(sudo -u writ )?(/opt/writ/\.venv/bin/writ|\$W|writ) ")
    return [line for line in sh_lines(text) if pattern.match(line)]


class Scenario:
    """The runbook's world in a temporary directory: placeholders, servers, the substitutions."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.subs: dict[str, str] = {
            "/var/lib/writ-new": str(tmp / "lib" / "writ-new"),
            "/var/lib/writ": str(tmp / "lib" / "writ"),
            "/tmp/check": str(tmp / "check"),
            " DIR ": f" {tmp / 'offline-mirror'} ",
        }
        self.servers: list[RunningServer] = []
        (tmp / "lib").mkdir()

    def substitute(self, line: str) -> list[str]:
        line = re.sub(r"^sudo -u writ ", "", line)
        line = re.sub(r"^(/opt/writ/\.venv/bin/writ|\$W) ", "writ ", line)
        for k, v in self.subs.items():
            line = line.replace(k, v)
        words = shlex.split(line)
        assert words[0] == "writ"
        return words[1:]

    def run(self, line: str, *, expect: int = 0) -> dict[str, Any]:
        args = self.substitute(line)
        proc = subprocess.run(
            [*writ_command(), *args], capture_output=True, timeout=120, check=False, cwd=self.tmp
        )
        out = proc.stdout.decode().strip().splitlines()
        doc: dict[str, Any] = json.loads(out[-1]) if out else {}
        assert proc.returncode == expect, (line, args, doc, proc.stderr.decode())
        return doc

    def serve(self, line: str) -> RunningServer:
        """A ``writ serve ... &`` line: started in the background (on a free port, not the page's)."""
        args = self.substitute(line.rstrip("& ").strip())
        srv = start_server(Path(args[args.index("--data") + 1]))
        self.servers.append(srv)
        return srv

    def stop(self, srv: RunningServer) -> None:
        assert stop_server(srv) == 0
        self.servers.remove(srv)

    def close(self) -> None:
        for srv in list(self.servers):
            stop_server(srv)


@pytest.fixture
def scenario(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Scenario]:
    for var in ("PW", "ROOT_PASSPHRASE", "ONCALL_PASSPHRASE"):
        monkeypatch.setenv(var, PW)
    monkeypatch.setenv("WRIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WRIT_KDF_COST", "interactive")
    monkeypatch.delenv("WRIT_ANCHOR", raising=False)
    s = Scenario(tmp_path)
    try:
        yield s
    finally:
        s.close()


def copy_records(src: str, dst: str) -> int:
    """Runbook step 4 (curl): pages of GET /v1/records posted as they are."""
    n = 0
    while True:
        page = httpx.get(f"{src}/v1/records?start={n}", timeout=30)
        assert page.status_code == 200
        if len(page.content) <= 1:
            return n
        r = httpx.post(
            dst + "/v1/records", content=page.content, headers={"Content-Type": "application/msgpack"}
        )
        assert r.status_code == 200, r.text
        n += 1000


def test_every_writ_command_of_the_runbook_runs(scenario: Scenario) -> None:
    text = DOC.read_text()
    lines = writ_lines(text)
    assert lines == EXPECTED
    s = scenario

    def key(name: str) -> list[str]:
        return ["--key", name, "--passphrase-env", "PW"]

    # the offline machine's root key (air-gapped.md), in the working directory as the page has it
    root = s.run("writ root init --out root.key --passphrase-env PW --no-successor")
    s.subs['"$ANCHOR"'] = root["anchor"]

    # section 2: the data directory; section 3: systemd starts it; the root opens the ledger
    s.run(lines[0])
    live = s.serve("writ serve --data /var/lib/writ &")
    s.subs["https://ledger.example"] = live.url
    s.run(f"writ genesis --origin {ORIGIN} --server https://ledger.example " + " ".join(key("root.key")))
    oncall = s.run("writ key init --out oncall.key --passphrase-env PW --role revoker")
    for subject, role, name in (
        (oncall["public_key"], "revoker", "oncall"),
        ("77" * 32, "operator", "tablet-07"),
    ):
        s.run(
            f"writ grant --server https://ledger.example --subject {subject} --role {role} --name {name} "
            + " ".join(key("root.key"))
        )

    # section 4: the nginx check's tile exists on a ledger of a few records (nginx aside)
    for line in sh_lines(text):
        m = re.match(r"curl -sI http://ledger\.example(/tile/\S+)", line)
        if m:
            assert httpx.get(live.url + m.group(1), timeout=10).status_code == 200, m.group(1)

    # section 5: test a backup (an online copy stands in for last night's file)
    backup_data_dir(live.data_dir, s.tmp / "check")
    assert s.run(lines[1])["size"] == 4

    # section 7: the on-call revoker revokes a lost tablet
    revoked = s.run(lines[2])
    assert revoked["signer"] == 2 and revoked["reason"] == "lost"

    # replacing the log key: step 1 stops the server, step 2 serves it on loopback
    s.stop(live)
    old = s.serve(lines[3])
    s.subs["http://127.0.0.1:8100"] = old.url
    s.run(lines[4])
    s.run(lines[5])
    # step 3: the new directory and key
    new_key = s.run(lines[6])["log_public_key"]
    s.subs["NEW_LOG_PUBLIC_KEY"] = new_key
    new = s.serve(lines[7])
    s.subs["http://127.0.0.1:8101"] = new.url
    # step 4: copy the records; both servers then show one tree
    assert copy_records(old.url, new.url) > 0
    assert (
        httpx.get(new.url + "/v1/ledger").json()["root"] == httpx.get(old.url + "/v1/ledger").json()["root"]
    )
    s.stop(old)
    # step 5: sign the revoke of the old log grant and the grant of the new key, offline
    s.run(lines[8])
    assert s.run(lines[9])["records"] == 2
    # step 6: append them to the new server
    r = httpx.post(
        new.url + "/v1/records",
        content=(s.tmp / "logkey.bin").read_bytes(),
        headers={"Content-Type": "application/msgpack"},
    )
    assert r.status_code == 200, r.text
    # step 7: the new directory becomes the real one; the audit passes with the new log key
    s.stop(new)
    (s.tmp / "lib" / "writ").rename(s.tmp / "lib" / "writ-stolen")
    (s.tmp / "lib" / "writ-new").rename(s.tmp / "lib" / "writ")
    live = s.serve("writ serve --data /var/lib/writ &")
    s.subs["https://ledger.example"] = live.url
    audit = s.run(lines[10])
    assert audit["size"] == 7 and audit["log_keys"] == [new_key]
