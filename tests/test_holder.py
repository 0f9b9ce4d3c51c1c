"""The credential holder (``python -m device_sim holder ...``) and OpenSSH keys.

The holder's key is an OpenSSH key file that ``ssh -i`` and ``ssh-keygen``
read; its answers are the section 4 auth messages ``device check`` takes;
``writ grant --ssh-public-key`` makes a technician's existing ``ssh-ed25519``
key a grant subject and refuses every other key type. The last test is the
lost-tablet loop with shipped commands only, against a real ``writ serve``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from device_sim.holder import Candidate, Holder, pick_grant, read_grant_file
from ledger import encoding, messages, sshkey
from ledger.crypto import SeedSigner
from ledger.errors import BadKeyFile, BadMessage, BadSshKey, UsageError
from tests.helpers.device import T0, World
from tests.helpers.server import running_server, writ_command
from tests.test_device_cli import cli as device_cli

SSH_KEYGEN = shutil.which("ssh-keygen")
NOW = T0 + 1000
TS = T0 + 900


def cli(*args: object, code: int | None = 0) -> dict[str, Any]:
    """``python -m device_sim ARGS``: its one JSON line, the exit code checked."""
    rc, doc = device_cli(*map(str, args))
    if code is not None:
        assert rc == code, (args, doc)
    doc["_code"] = rc
    return doc


# --- OpenSSH keys -------------------------------------------------------------------


def _line(kind: bytes, payload: bytes, comment: str = "c") -> bytes:
    blob = struct.pack(">I", len(kind)) + kind + payload
    return kind + b" " + base64.b64encode(blob) + b" " + comment.encode() + b"\n"


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (_line(b"ssh-rsa", b"\x00\x00\x00\x03\x01\x00\x01"), "ssh-rsa, not ssh-ed25519"),
        (_line(b"ecdsa-sha2-nistp256", b"\x00\x00\x00\x08nistp256"), "ecdsa-sha2-nistp256, not ssh-ed25519"),
        (_line(b"sk-ssh-ed25519@openssh.com", bytes(40)), "not ssh-ed25519"),
        # the line says ed25519, the blob inside is RSA
        (
            b"ssh-ed25519 " + base64.b64encode(b"\x00\x00\x00\x07ssh-rsa" + bytes(8)) + b" x\n",
            "ssh-rsa, not ssh-ed25519",
        ),
        (b"-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n", "private key"),
        (b"", "holds no key"),
        (b"ssh-ed25519 !!!notbase64 x\n", "base64"),
        (b'command="rm -rf /" ssh-ed25519 AAAA x\n', "options are not accepted"),
        (
            sshkey.format_public_key(bytes(32), "a").encode()
            + b"\n"
            + sshkey.format_public_key(b"\x01" * 32, "b").encode(),
            "2 keys",
        ),
    ],
)
def test_a_non_ed25519_or_malformed_ssh_key_is_refused_with_a_clear_message(data: bytes, words: str) -> None:
    with pytest.raises(BadSshKey, match=words):
        sshkey.parse_public_key_file(data)


@given(
    st.binary(min_size=32, max_size=32),
    st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=40),
)
def test_public_key_lines_round_trip(key: bytes, comment: str) -> None:
    comment = comment.strip()
    parsed = sshkey.parse_public_key_file(sshkey.format_public_key(key, comment).encode())
    assert parsed == (key, comment)
    assert sshkey.parse_blob(sshkey.key_blob(key)) == key


@given(st.binary(max_size=300))
def test_garbage_key_files_raise_only_bad_ssh_key(data: bytes) -> None:
    for parse in (sshkey.parse_public_key_file, sshkey.parse_private_key):
        with contextlib.suppress(BadSshKey):
            parse(data)


def test_private_key_file_round_trips_and_a_mismatched_key_is_refused(tmp_path: Path) -> None:
    s = SeedSigner(b"\x07" * 32)
    text = sshkey.format_private_key(s.seed(), s.public_key, "tablet-07").encode()
    assert sshkey.parse_private_key(text) == (s.seed(), s.public_key, "tablet-07")
    other = SeedSigner(b"\x08" * 32)
    (tmp_path / "id_ed25519").write_bytes(sshkey.format_private_key(s.seed(), other.public_key, "x").encode())
    os.chmod(tmp_path / "id_ed25519", 0o600)
    with pytest.raises(BadKeyFile, match="does not match"):
        Holder.load(tmp_path)

    def string(b: bytes) -> bytes:
        return struct.pack(">I", len(b)) + b

    encrypted = b"openssh-key-v1\x00" + string(b"aes256-ctr") + string(b"bcrypt") + string(b"") + bytes(4)
    armoured = b"-----BEGIN OPENSSH PRIVATE KEY-----\n%s\n-----END OPENSSH PRIVATE KEY-----\n"
    with pytest.raises(BadSshKey, match="passphrase"):
        sshkey.parse_private_key(armoured % base64.b64encode(encrypted))


@pytest.mark.skipif(SSH_KEYGEN is None, reason="ssh-keygen is not installed")
def test_openssh_reads_the_holder_key_and_writ_reads_ssh_keygen_keys(tmp_path: Path) -> None:
    assert SSH_KEYGEN is not None
    out = cli("holder", "init", "--state", tmp_path / "tablet", "--name", "tablet-07")
    key = tmp_path / "tablet" / "id_ed25519"
    derived = subprocess.run([SSH_KEYGEN, "-y", "-f", str(key)], capture_output=True, check=True, text=True)
    assert derived.stdout.strip() == out["ssh_public_key"]
    fp = subprocess.run([SSH_KEYGEN, "-l", "-f", str(key)], capture_output=True, check=True, text=True)
    assert sshkey.fingerprint(bytes.fromhex(out["subject"])) in fp.stdout

    theirs = tmp_path / "alice"
    subprocess.run(
        [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", "alice@laptop", "-f", str(theirs)], check=True
    )
    seed, pub, comment = sshkey.parse_private_key(theirs.read_bytes())
    assert SeedSigner(seed).public_key == pub and comment == "alice@laptop"
    assert sshkey.parse_public_key_file(Path(f"{theirs}.pub").read_bytes()) == (pub, "alice@laptop")


# --- holder init and answer ------------------------------------------------------------


def test_holder_init_writes_a_0600_openssh_key_and_an_enrollment(tmp_path: Path) -> None:
    d = tmp_path / "tablet"
    out = cli("holder", "init", "--state", d, "--name", "tablet-07", "--now", T0)
    subject = bytes.fromhex(out["subject"])
    assert stat.S_IMODE(os.stat(d / "id_ed25519").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert out["ssh_public_key"] == sshkey.format_public_key(subject, "tablet-07")
    assert (d / "id_ed25519.pub").read_text().strip() == out["ssh_public_key"]
    enroll = messages.parse_enroll((d / "enroll.bin").read_bytes())
    assert (enroll.subject, enroll.name, enroll.time) == (subject, "tablet-07", T0)
    assert out["subject"] not in (d / "id_ed25519").read_text()  # not hex: the private key is not spelled out
    again = cli("holder", "init", "--state", d, code=2)
    assert again["error"] == "usage"


def test_a_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "tablet"
    cli("holder", "init", "--state", d)
    os.chmod(d / "id_ed25519", 0o644)
    with pytest.raises(Exception, match="0600"):
        Holder.load(d)


def _device(tmp_path: Path, w: World) -> tuple[Path, bytes]:
    d = tmp_path / "plc"
    out = cli("device", "init", "--state", d, "--anchor", w.root.public_key.hex(), "--origin", w.origin)
    return d, bytes.fromhex(out["public_key"])


def _sync(d: Path, w: World) -> None:
    bundle = d.parent / "site.bundle"
    bundle.write_bytes(w.bundle(0, TS))
    cli("device", "sync", "--state", d, "--bundle", bundle, "--now", NOW)


def _answer_and_check(d: Path, holder: Path, grant: Path, code: int) -> dict[str, Any]:
    ch = cli("device", "challenge", "--state", d)
    auth = d.parent / "auth.bin"
    cli(
        "holder", "answer", "--state", holder, "--challenge", ch["challenge"],
        "--device-key", ch["device_key"], "--grant", grant, "--out", auth, "--now", NOW,
    )  # fmt: skip
    return cli("device", "check", "--state", d, "--auth", auth, "--now", NOW, code=code)


def test_holder_answer_is_what_device_check_takes_until_the_revoke(tmp_path: Path) -> None:
    w = World()
    d, device_key = _device(tmp_path, w)
    w.grant(device_key, "device", "plc-17")
    holder = tmp_path / "tablet"
    subject = bytes.fromhex(cli("holder", "init", "--state", holder, "--name", "tablet-07")["subject"])
    seq = w.grant(subject, "operator", "tablet-07")
    grant = tmp_path / "grant.bin"
    grant.write_bytes(w.records[seq])
    _sync(d, w)
    ok = _answer_and_check(d, holder, grant, 0)
    assert ok["accepted"] is True and ok["grant_seq"] == seq

    # a records file (as writ sign writes) and a credential's JSON work the same way
    records_file = tmp_path / "grant.records"
    records_file.write_bytes(encoding.pack_records([w.records[1], w.records[seq]]))
    assert _answer_and_check(d, holder, records_file, 0)["accepted"] is True
    as_json = tmp_path / "grant.json"
    as_json.write_text(json.dumps({"seq": seq, "status": "active", "record": w.records[seq].hex()}))
    assert _answer_and_check(d, holder, as_json, 0)["accepted"] is True

    w.revoke(seq)
    _sync(d, w)
    refused = _answer_and_check(d, holder, grant, 1)
    assert (refused["accepted"], refused["reason"]) == (False, "revoked")


def test_an_unpublished_grant_answer_is_refused_by_the_device(tmp_path: Path) -> None:
    w = World()
    d, device_key = _device(tmp_path, w)
    w.grant(device_key, "device", "plc-17")
    holder = tmp_path / "tablet"
    subject = bytes.fromhex(cli("holder", "init", "--state", holder)["subject"])
    grant = tmp_path / "grant.bin"
    grant.write_bytes(w.grant_record(subject, "operator", "tablet-unpublished"))
    _sync(d, w)
    assert _answer_and_check(d, holder, grant, 1)["reason"] == "unpublished"


def test_answering_with_someone_elses_grant_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    w = World()
    holder = tmp_path / "tablet"
    cli("holder", "init", "--state", holder)
    seq = w.grant(w.tablet.public_key, "operator", "not-mine")
    grant = tmp_path / "grant.bin"
    grant.write_bytes(w.records[seq])
    out = tmp_path / "auth.bin"
    doc = cli(
        "holder", "answer", "--state", holder, "--challenge", "11" * 32, "--device-key", "22" * 32,
        "--grant", grant, "--out", out, code=3,
    )  # fmt: skip
    assert doc["error"] == "bad-message" and "another key" in doc["detail"]
    assert not out.exists()


def test_pick_grant_prefers_the_newest_active_then_the_newest() -> None:
    c = [
        Candidate(3, "operator", b"a", "active"),
        Candidate(7, "operator", b"b", "revoked"),
        Candidate(5, "admin", b"c", "active"),
    ]
    assert pick_grant(c, None).seq == 5
    assert pick_grant(c, "operator").seq == 3
    assert pick_grant([c[1]], None).seq == 7  # a revoked holder still answers; the device says why
    with pytest.raises(UsageError, match="no grant"):
        pick_grant(c, "revoker")


def test_a_damaged_grant_file_is_a_bad_message() -> None:
    with pytest.raises(BadMessage):
        read_grant_file(b"\x93\x01\x02", b"\x00" * 32)


# --- the lost-tablet loop with shipped commands only ----------------------------------


@pytest.mark.e2e
def test_lost_tablet_loop_with_shipped_commands(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "WRIT_HOME": str(tmp_path / "home"),
        "PW": "holder passphrase",
        "WRIT_KDF_COST": "interactive",
    }
    env.pop("WRIT_ANCHOR", None)

    def run(cmd: list[str], code: int = 0) -> dict[str, Any]:
        p = subprocess.run(
            cmd, capture_output=True, timeout=60, check=False, env=env, stdin=subprocess.DEVNULL
        )
        assert "Traceback" not in p.stderr.decode(), p.stderr
        assert p.returncode == code, (cmd, p.stdout, p.stderr)
        doc: dict[str, Any] = json.loads(p.stdout.decode().strip().splitlines()[-1])
        return doc

    def writ(*a: object, code: int = 0) -> dict[str, Any]:
        return run([*writ_command(), *map(str, a)], code)

    def dev(*a: object, code: int = 0) -> dict[str, Any]:
        return run([sys.executable, "-m", "device_sim", *map(str, a)], code)

    origin = "ledger.example/holder"
    key = ["--key", tmp_path / "root.key", "--passphrase-env", "PW"]
    anchor = writ("root", "init", "--out", tmp_path / "root.key", "--passphrase-env", "PW", "--no-successor")[
        "anchor"
    ]
    with running_server(tmp_path, bytes.fromhex(anchor), origin) as srv:
        s = srv.url
        writ("genesis", "--origin", origin, "--server", s, *key)
        plc, tab = tmp_path / "plc", tmp_path / "tablet"
        dev("device", "init", "--state", plc, "--anchor", anchor, "--origin", origin, "--name", "plc-17")
        writ("grant", "--server", s, "--request", plc / "enroll.bin", "--role", "device", *key)
        h = dev("holder", "init", "--state", tab, "--name", "tablet-07")
        g = writ("grant", "--server", s, "--request", tab / "enroll.bin", "--role", "operator", *key)
        assert g["subject"] == h["subject"] and g["name"] == "tablet-07"
        dev("device", "sync", "--state", plc, "--server", s)

        def answer_and_check(*source: object, code: int) -> dict[str, Any]:
            ch = dev("device", "challenge", "--state", plc)
            a = dev(
                "holder", "answer", "--state", tab, "--challenge", ch["challenge"],
                "--device-key", ch["device_key"], *source, "--out", tmp_path / "auth.bin",
            )  # fmt: skip
            assert a["grant_seq"] == g["seq"]
            return dev("device", "check", "--state", plc, "--auth", tmp_path / "auth.bin", code=code)

        assert answer_and_check("--server", s, code=0)["accepted"] is True
        assert (tab / "grant.bin").exists()  # kept for answers without network

        r = writ("revoke", "--server", s, "--name", "tablet-07", "--reason", "lost", *key)
        assert r["target"] == g["seq"]
        dev("device", "sync", "--state", plc, "--server", s)
        assert answer_and_check("--server", s, code=1)["reason"] == "revoked"
        assert answer_and_check("--grant", tab / "grant.bin", code=1)["reason"] == "revoked"

        # an RSA key is refused before anything is signed: nothing appended
        if SSH_KEYGEN is not None:
            rsa = tmp_path / "id_rsa"
            subprocess.run(
                [SSH_KEYGEN, "-q", "-t", "rsa", "-b", "1024", "-N", "", "-f", str(rsa)], check=True
            )
            before = dev("device", "sync", "--state", plc, "--server", s)["size"]
            bad = writ(
                "grant",
                "--server",
                s,
                "--ssh-public-key",
                f"{rsa}.pub",
                "--role",
                "operator",
                "--name",
                "bob",
                *key,
                code=1,
            )
            assert bad["error"] == "bad-ssh-key" and "ssh-ed25519" in bad["message"]
            time.sleep(0.1)
            assert dev("device", "sync", "--state", plc, "--server", s)["size"] == before
