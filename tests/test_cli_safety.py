"""Operator safety: the ``writ`` commands refuse nonsense before signing, retries append
nothing, a terminal user sees what is signed, and errors never end in a traceback.

Everything runs the real ``writ`` console script against a real ``writ serve``
(one per module); every refusal checks that the ledger's size did not move.
Prompts are driven through a pseudo-terminal (:func:`at_terminal`).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import io
import json
import os
import re
import select
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.main import build_parser
from ledger.progress import stage
from ledger.signers import load_key_file
from tests.helpers.server import RunningServer, running_server, writ_command

pytestmark = pytest.mark.e2e

ORIGIN = "ledger.example/safety"
PW = "safety passphrase"
YEAR = 365 * 86400


# --- running writ ------------------------------------------------------------------------


@dataclass
class Ran:
    code: int
    doc: dict[str, Any]
    err: str


def base_env(tmp: Path) -> dict[str, str]:
    env = {**os.environ, "PW": PW, "SHORT": "seven77", "WRIT_KDF_COST": "interactive"}
    env["WRIT_HOME"] = str(tmp / "home")
    env.pop("WRIT_ANCHOR", None)
    return env


def run(env: dict[str, str], *args: object, timeout: float = 60.0) -> Ran:
    """``writ ARGS`` with no terminal: exactly one JSON line on stdout, never a traceback."""
    proc = subprocess.run(
        [*writ_command(), *map(str, args)],
        capture_output=True,
        env=env,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
        check=False,
    )
    err = proc.stderr.decode()
    assert "Traceback" not in err, err
    lines = proc.stdout.decode().strip().splitlines()
    assert len(lines) == 1, (args, proc.stdout, err)
    doc = json.loads(lines[0])
    if proc.returncode:
        assert doc.get("error") and doc.get("message"), doc
        assert not err.startswith("writ: writ"), err
    return Ran(proc.returncode, doc, err)


def size(srv: RunningServer) -> int:
    n: int = httpx.get(srv.url + "/v1/ledger", timeout=5).json()["size"]
    return n


@dataclass
class World:
    srv: RunningServer
    tmp: Path
    env: dict[str, str]
    root: Path
    anchor: str
    shares: list[str]

    def key(self) -> list[object]:
        return ["--key", self.root, "--passphrase-env", "PW"]

    def writ(self, *args: object) -> Ran:
        return run(self.env, *args)

    def grant(self, subject: str, name: str, *extra: object, role: str = "operator") -> Ran:
        return self.writ(
            "grant", "--server", self.srv.url, "--subject", subject, "--role", role, "--name", name,
            *extra, *self.key(),
        )  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("safety")
    env = base_env(tmp)
    root = tmp / "root.key"
    init = run(
        env, "root", "init", "--out", root, "--passphrase-env", "PW",
        "--shares", "2-of-3", "--shares-out", tmp / "shares",
    )  # fmt: skip
    assert init.code == 0, init
    anchor = init.doc["anchor"]
    with running_server(tmp, bytes.fromhex(anchor), ORIGIN) as srv:
        g = run(
            env, "genesis", "--origin", ORIGIN, "--server", srv.url, "--key", root, "--passphrase-env", "PW"
        )
        assert g.code == 0, g
        yield World(srv, tmp, env, root, anchor, init.doc["shares"])


def refused(w: World, r: Ran, code: int, error: str, before: int) -> None:
    assert (r.code, r.doc["error"]) == (code, error), (r.doc, r.err)
    assert size(w.srv) == before, "a refusal appends nothing"


# --- grant: nothing wrong is signed -----------------------------------------------------


def test_misspelt_role_is_refused_before_signing(world: World) -> None:
    before = size(world.srv)
    r = world.grant("61" * 32, "tablet-61", role="opertor")
    refused(world, r, 2, "unknown-role", before)
    assert "'operator'" in r.doc["message"] and "--custom-role" in r.doc["message"]
    ok = world.grant("61" * 32, "tablet-61", "--custom-role", role="opertor")
    assert ok.code == 0 and ok.doc["role"] == "opertor" and size(world.srv) == before + 1


@pytest.mark.parametrize(
    ("label", "window"),
    [
        ("not_after in the past", ["--not-after", int(time.time()) - 3600]),
        ("a millisecond timestamp", ["--not-after", "1796558144000"]),
        ("a millisecond not_before", ["--not-before", "1796558144000"]),
        ("more than 100 years ahead", ["--not-after", int(time.time()) + 101 * YEAR]),
        (
            "not_after before not_before",
            ["--not-before", int(time.time()) + 2 * YEAR, "--not-after", int(time.time()) + YEAR],
        ),
        ("not_after equal to not_before", ["--not-before", 2_000_000_000, "--not-after", 2_000_000_000]),
    ],
)
def test_nonsense_validity_window_is_refused_before_signing(
    world: World, label: str, window: list[object]
) -> None:
    before = size(world.srv)
    r = world.grant("62" * 32, "tablet-62", *window)
    refused(world, r, 2, "bad-validity", before)
    assert "nothing was signed" in r.doc["message"], label


def test_sensible_validity_window_is_granted(world: World) -> None:
    now = int(time.time())
    r = world.grant("63" * 32, "tablet-63", "--not-before", now - 60, "--not-after", now + YEAR)
    assert r.code == 0, r


def test_retried_grant_appends_nothing_and_revoke_by_name_still_works(world: World) -> None:
    first = world.grant("64" * 32, "tablet-64", "--scope", "plant-7")
    assert first.code == 0
    before = size(world.srv)
    again = world.grant("64" * 32, "tablet-64", "--scope", "plant-7")
    assert again.code == 0 and again.doc["seq"] == first.doc["seq"] and again.doc["existing"] is True
    assert size(world.srv) == before and "already in force" in again.err
    # something else than a retry is a new grant: another scope
    other = world.grant("64" * 32, "tablet-64", "--scope", "plant-8")
    assert other.code == 0 and other.doc["seq"] == before and "existing" not in other.doc
    r = world.writ(
        "revoke", "--server", world.srv.url, "--name", "tablet-64", "--reason", "lost", *world.key()
    )
    assert (r.code, r.doc["error"]) == (2, "ambiguous-name"), "two different grants do share the name"
    r = world.writ("revoke", "--server", world.srv.url, other.doc["seq"], "--reason", "lost", *world.key())
    assert r.code == 0
    r = world.writ(
        "revoke", "--server", world.srv.url, "--name", "tablet-64", "--reason", "lost", *world.key()
    )
    assert r.code == 0 and r.doc["target"] == first.doc["seq"]
    # a repeated revoke is not a retry: refused, nothing appended
    before = size(world.srv)
    again_revoke = world.writ(
        "revoke", "--server", world.srv.url, first.doc["seq"], "--reason", "lost", *world.key()
    )
    refused(world, again_revoke, 1, "already-revoked", before)
    # a grant of a revoked credential is a new grant, not a retry
    regrant = world.grant("64" * 32, "tablet-64", "--scope", "plant-7")
    assert regrant.code == 0 and regrant.doc["seq"] == before and size(world.srv) == before + 1


# --- root init and rotate: the successor is a choice ---------------------------------------


def test_root_init_without_successor_choice_writes_nothing(world: World, tmp_path: Path) -> None:
    env = base_env(tmp_path)
    r = run(env, "root", "init", "--out", tmp_path / "r.key", "--passphrase-env", "PW")
    assert (r.code, r.doc["error"]) == (2, "no-successor-choice")
    assert "--no-successor" in r.doc["message"] and "--shares" in r.doc["message"]
    assert list(tmp_path.iterdir()) == []
    ok = run(env, "root", "init", "--out", tmp_path / "r.key", "--passphrase-env", "PW", "--no-successor")
    assert ok.code == 0 and ok.doc["next_root_digest"] is None


def test_rotate_without_successor_choice_is_refused(world: World) -> None:
    before = size(world.srv)
    out = world.tmp / "rotated.key"
    r = world.writ(
        "rotate", "--server", world.srv.url, "--successor-shares", *world.shares[:2],
        "--out", out, "--passphrase-env", "PW",
    )  # fmt: skip
    refused(world, r, 2, "no-successor-choice", before)
    assert not out.exists()


def test_shares_out_on_a_file_is_refused_before_any_key_is_made(world: World, tmp_path: Path) -> None:
    env = base_env(tmp_path)
    blocker = tmp_path / "sheets"
    blocker.write_text("a file, not a directory\n")
    r = run(
        env, "root", "init", "--out", tmp_path / "r.key", "--passphrase-env", "PW",
        "--shares", "2-of-3", "--shares-out", blocker,
    )  # fmt: skip
    assert (r.code, r.doc["error"]) == (2, "usage") and "not a directory" in r.doc["message"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sheets"]
    r2 = run(
        env, "root", "init", "--out", tmp_path / "r.key", "--passphrase-env", "PW",
        "--shares", "2-of-3", "--shares-out", blocker / "inside",
    )  # fmt: skip
    assert (r2.code, r2.doc["error"]) == (2, "usage")
    before = size(world.srv)
    r3 = world.writ(
        "rotate", "--server", world.srv.url, "--successor-shares", *world.shares[:2],
        "--out", tmp_path / "new.key", "--passphrase-env", "PW",
        "--shares", "2-of-3", "--shares-out", blocker,
    )  # fmt: skip
    refused(world, r3, 2, "usage", before)
    assert not (tmp_path / "new.key").exists()


# --- passphrases ---------------------------------------------------------------------------


def test_short_passphrase_is_refused_for_every_new_key(world: World, tmp_path: Path) -> None:
    env = base_env(tmp_path)
    cases: list[list[object]] = [
        ["root", "init", "--out", tmp_path / "a.key", "--no-successor"],
        ["key", "init", "--out", tmp_path / "b.key", "--role", "revoker"],
        [
            "root", "recover", "--shares", *world.shares[:2], "--expect-digest", "00" * 32,
            "--out", tmp_path / "c.key",
        ],
    ]  # fmt: skip
    for argv in cases:
        r = run(env, *argv, "--passphrase-env", "SHORT")
        assert (r.code, r.doc["error"]) == (2, "weak-passphrase"), (argv, r.doc)
        assert "--generate-passphrase" in r.doc["message"] and "seven77" not in r.err + json.dumps(r.doc)
    assert list(tmp_path.iterdir()) == []
    # generating one needs a terminal to show it on: never printed into a pipe
    r = run(env, "key", "init", "--out", tmp_path / "d.key", "--generate-passphrase")
    assert (r.code, r.doc["error"]) == (2, "usage") and not (tmp_path / "d.key").exists()


def test_generated_passphrase_is_shown_once_on_the_terminal(tmp_path: Path) -> None:
    key = tmp_path / "gen.key"
    words: list[str] = []

    def answer(screen: str) -> str:
        m = re.search(r"\n\r?\n    ([a-z]+(?: [a-z]+){5})\r?\n", screen)
        assert m, screen
        words.extend(m.group(1).split())
        return " ".join(words) + "\n"

    code, out, screen = at_terminal(
        base_env(tmp_path),
        ["key", "init", "--out", key, "--generate-passphrase"],
        [("Type it once to confirm: ", answer)],
    )
    assert code == 0, (out, screen)
    assert len(words) == 6 and " ".join(words) not in out
    assert load_key_file(key, " ".join(words).encode()).public_key.hex() == json.loads(out)["public_key"]


# --- confirmation at a terminal ------------------------------------------------------------


def _controlling_terminal() -> None:  # in the child, after setsid: the pty on fd 0 becomes its /dev/tty
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


Answer = str | Any  # a fixed reply, or a function of the screen so far


def at_terminal(
    env: dict[str, str], argv: list[object], script: list[tuple[str, Answer]], timeout: float = 60.0
) -> tuple[int, str, str]:
    """Run ``writ ARGV`` with a pseudo-terminal on stdin and stderr (its controlling terminal)
    and stdout on a pipe; after each prompt of ``script`` appears, type its answer.
    Returns (exit code, stdout, everything the terminal showed)."""
    master, slave = os.openpty()
    proc = subprocess.Popen(
        [*writ_command(), *map(str, argv)],
        stdin=slave,
        stderr=slave,
        stdout=subprocess.PIPE,
        env={**env, "COLUMNS": "200", "TERM": "dumb"},
        start_new_session=True,
        preexec_fn=_controlling_terminal,  # the pty becomes the child's /dev/tty
    )
    os.close(slave)
    screen = b""
    deadline = time.monotonic() + timeout
    pending = list(script)
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: the child closed the terminal
                    chunk = b""
                if not chunk and proc.poll() is not None:
                    break
                screen += chunk
            elif proc.poll() is not None:
                break
            text = screen.decode(errors="replace")
            if pending and pending[0][0] in text:
                prompt, reply = pending.pop(0)
                typed = reply if isinstance(reply, str) else reply(text)
                screen = screen.replace(prompt.encode(), b"<" + prompt.strip().encode() + b">", 1)
                os.write(master, typed.encode())
            assert time.monotonic() < deadline, f"the terminal session hung: {text!r}"
        assert proc.stdout is not None
        out = proc.stdout.read().decode()
        code = proc.wait(timeout)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    assert not pending, f"never asked {pending[0][0]!r}: {screen.decode(errors='replace')!r}"
    return code, out, screen.decode(errors="replace")


def test_terminal_user_sees_what_is_signed_and_can_decline(world: World) -> None:
    now = int(time.time())
    argv: list[object] = [
        "grant", "--server", world.srv.url, "--subject", "66" * 32, "--role", "operator",
        "--name", "tablet-66", "--scope", "plant-7/line-3", "--not-after", now + YEAR, *world.key(),
    ]  # fmt: skip
    before = size(world.srv)
    code, out, screen = at_terminal(world.env, argv, [("Sign? [y/N]", "n\n")])
    assert code == 1 and json.loads(out)["error"] == "declined"
    assert size(world.srv) == before
    for words in (
        "grant #",
        "role 'operator'",
        f"{'66' * 8}…",
        "name 'tablet-66'",
        "scope 'plant-7/line-3'",
        "valid from now until " + time.strftime("%Y-%m-%d", time.gmtime(now + YEAR)),
        f"signed by {world.anchor[:16]}…",
    ):
        assert words in screen, (words, screen)

    code, out, screen = at_terminal(world.env, argv, [("Sign? [y/N]", "y\n")])
    assert code == 0 and json.loads(out)["seq"] == before and size(world.srv) == before + 1

    # --yes: no question asked; a revoke asks too
    code, out, screen = at_terminal(
        world.env,
        ["revoke", "--server", world.srv.url, before, "--reason", "retired", *world.key()],
        [("Sign? [y/N]", "y\n")],
    )
    assert code == 0 and "revoke #" in screen and "'tablet-66'" in screen and "reason retired" in screen
    code, out, screen = at_terminal(world.env, [*argv[:4], "67" * 32, *argv[5:], "--yes"], [])
    assert code == 0 and "Sign?" not in screen and size(world.srv) == before + 3


def test_declined_rotate_leaves_no_new_sheets_and_no_new_key(world: World) -> None:
    out, sheets = world.tmp / "declined-root.key", world.tmp / "declined-sheets"
    before = size(world.srv)
    code, stdout, screen = at_terminal(
        world.env,
        [
            "rotate", "--server", world.srv.url, "--successor-shares", *world.shares[:2],
            "--out", out, "--passphrase-env", "PW", "--shares", "2-of-3", "--shares-out", sheets,
        ],
        [("Sign? [y/N]", "n\n")],
    )  # fmt: skip
    assert code == 1 and json.loads(stdout)["error"] == "declined"
    assert f"rotate #{before}: the root passes to " in screen and "its committed successor digest" in screen
    assert size(world.srv) == before
    assert not out.exists() and not Path(f"{out}.pub.json").exists()
    assert not sheets.exists() or list(sheets.iterdir()) == []


# --- Ctrl-C after the command landed ----------------------------------------------------------

_SLOW_AFTER = """
import sys, time
import ledger.writer as writer
import ledger.cli.main as main
import api.main as root
where = sys.argv.pop(1)
if where == "landed":
    real = writer.Writer.after_push
    def slow(*a):
        sys.stderr.write("LANDED\\n"); sys.stderr.flush(); time.sleep(1.5); real(*a)
    writer.Writer.after_push = slow
else:
    real_emit = main.emit
    def slow_emit(obj):
        real_emit(obj); time.sleep(1.5)
    main.emit = slow_emit
root.main()
"""


@pytest.mark.parametrize("where", ["landed", "printed"])
def test_ctrl_c_after_a_grant_landed_still_exits_0(world: World, where: str) -> None:
    """SIGINT once the record is appended (a slow step after the POST), or once the success JSON
    is printed: the command landed, so it exits 0 with its success JSON."""
    subject = ("68" if where == "landed" else "69") * 32
    argv = ["grant", "--server", world.srv.url, "--subject", subject, "--role", "operator"]
    argv += ["--name", f"ctrl-c-{where}", "--key", str(world.root), "--passphrase-env", "PW"]
    before = size(world.srv)
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_AFTER, where, *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=world.env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    if where == "landed":
        while b"LANDED" not in proc.stderr.readline():
            assert proc.poll() is None, proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    else:
        line = proc.stdout.readline()
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=30)
        out = line + rest
    assert proc.returncode == 0, (out, err)
    assert b"Traceback" not in err
    doc = json.loads(out.decode().strip().splitlines()[-1])
    assert doc["seq"] == before and size(world.srv) == before + 1


# --- server init and serve: clean errors ------------------------------------------------------


def test_server_init_on_a_file_or_an_impossible_path_is_a_clean_error(tmp_path: Path) -> None:
    env = base_env(tmp_path)
    anchor = "ab" * 32
    f = tmp_path / "file"
    f.write_text("x")
    for data, words in ((f, "is a file"), (f / "sub", "cannot create")):
        r = run(env, "server", "init", "--data", data, "--anchor", anchor, "--origin", ORIGIN)
        assert (r.code, r.doc["error"]) == (2, "usage") and words in r.doc["message"], r.doc
    assert f.read_text() == "x"


def test_server_init_anchor_with_spaces_is_a_usage_error(tmp_path: Path) -> None:
    """64 characters that are not 32 bytes of hex (``bytes.fromhex`` skips spaces: 22 bytes)
    are refused as usage by the one hex parser, before anything is created."""
    env = base_env(tmp_path)
    data = tmp_path / "data"
    for anchor in ("aa " * 20 + "aaaa", "zz" * 32, "ab" * 31):
        r = run(env, "server", "init", "--data", data, "--anchor", anchor, "--origin", ORIGIN)
        assert (r.code, r.doc["error"]) == (2, "usage") and "--anchor" in r.doc["message"], r.doc
    assert not data.exists()


async def test_server_init_failing_half_way_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk while the database is created: the log key already written is removed again,
    so that a retry starts clean instead of hitting `ledger-exists`."""
    import errno

    from api import cli as api_cli
    from ledger.errors import StorageError
    from ledger.storage.sqlite import SqliteStorage

    async def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SqliteStorage, "open", full_disk)
    with pytest.raises(StorageError, match="No space left on device"):
        await api_cli.create_data_dir(tmp_path / "data", b"\xab" * 32, ORIGIN)
    assert list(tmp_path.iterdir()) == []


@contextlib.contextmanager
def read_only_mount(path: Path) -> Iterator[None]:
    """A tmpfs at ``path`` (remounted read-only by the caller); skips without mount privileges."""
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("needs mount privileges (a read-only file system even root cannot write)")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def test_server_on_a_read_only_data_dir_is_a_clean_error(tmp_path: Path) -> None:
    env = base_env(tmp_path)
    mnt = tmp_path / "mnt"
    with read_only_mount(mnt):
        data = mnt / "data"
        r = run(env, "server", "init", "--data", data, "--anchor", "ab" * 32, "--origin", ORIGIN)
        assert r.code == 0
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        r2 = run(env, "server", "init", "--data", mnt / "other", "--anchor", "ab" * 32, "--origin", ORIGIN)
        assert (r2.code, r2.doc["error"]) == (2, "usage") and "Read-only" in r2.doc["message"]
        # serve: says the directory is not writable, before binding (not "could not serve on the port")
        r3 = run(env, "serve", "--data", data, "--port", "1")
        assert (r3.code, r3.doc["error"]) == (1, "storage-error"), r3.doc
        assert "not writable" in r3.doc["message"] and "port" not in r3.doc["message"]


# --- help, version, messages -------------------------------------------------------------------


def _walk(p: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                yield from _walk(sub, f"{path} {name}")


def test_every_option_has_help_and_every_command_its_own_description() -> None:
    descriptions: dict[str, str] = {}
    for path, p in _walk(build_parser(), "writ"):
        assert p.description, f"{path} has no description"
        assert p.description not in descriptions.values() or path == "writ", (path, p.description)
        descriptions[path] = p.description
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                continue  # each command: its help is checked as its description
            assert a.help and a.help != argparse.SUPPRESS, f"{path} {a.option_strings or a.dest} has no help"
            if (
                a.option_strings
                and a.nargs != 0
                and "dir" in a.dest.split("_") + a.option_strings[-1].split("-")
            ):
                assert a.metavar in (None, "DIR"), (path, a.option_strings)
            if a.option_strings and a.option_strings[-1] in ("--data", "--mirror", "--shares-out"):
                assert a.metavar == "DIR", (path, a.option_strings)
        text = p.format_help()
        for a in p._actions:
            if a.option_strings and a.default not in (None, False, "", argparse.SUPPRESS) and a.help:
                assert "(default:" in text, (path, a.option_strings)


def test_serve_help_shows_the_defaults(tmp_path: Path) -> None:
    proc = subprocess.run([*writ_command(), "serve", "--help"], capture_output=True, check=False)
    text = proc.stdout.decode()
    assert proc.returncode == 0 and "(default: 8000)" in text and "(default: 127.0.0.1)" in text


def test_usage_errors_name_the_command_once(tmp_path: Path) -> None:
    r = run(base_env(tmp_path), "grant", "--server", "http://127.0.0.1:9", "--role")
    assert (r.code, r.doc["error"]) == (2, "usage")
    assert r.err.startswith("writ grant: ") and "writ: writ" not in r.err
    assert r.doc["message"].startswith("writ grant: ")


def test_version_is_plain_text(tmp_path: Path) -> None:
    from importlib.metadata import version

    proc = subprocess.run([*writ_command(), "--version"], capture_output=True, check=False)
    assert proc.returncode == 0 and proc.stdout.decode() == f"writ {version('writ')}\n"


# --- progress ---------------------------------------------------------------------------------


def test_progress_is_one_line_per_stage_when_piped_and_silent_when_short() -> None:
    out = io.StringIO()
    with stage("verifying the ledger", 5000, unit="new records", stream=out) as s:
        s.advance(1000)
        s.advance(4000)
    with stage("posting receipts", None, prefix="fleet: ", stream=out) as s:
        s.advance()
    with stage("quick", 10, quiet_below=2000, stream=out):
        pass
    assert out.getvalue().splitlines() == [
        "writ: verifying the ledger (5000 new records)…",
        "fleet: posting receipts…",
    ]


def test_progress_draws_a_bar_at_a_terminal() -> None:
    master, slave = os.openpty()
    try:
        with open(slave, "w", closefd=False) as tty:
            with stage("auditing", 3, unit="records", stream=tty) as s:
                for _ in range(3):
                    s.advance()
                    time.sleep(0.05)
            tty.flush()
        os.set_blocking(master, False)
        shown = os.read(master, 65536).decode(errors="replace")
    finally:
        os.close(master)
        os.close(slave)
    assert "auditing" in shown


def test_plain_words_describe_a_genesis_a_grant_and_a_key_revoke() -> None:
    from ledger.cli.common import describe
    from ledger.crypto import SeedSigner
    from ledger.state import LedgerState
    from tests.helpers.server import Mirror

    root = SeedSigner.generate()
    m = Mirror(root, ORIGIN)
    genesis = m.genesis(next_root_digest=b"\x07" * 32)
    grant = m.grant(b"\x05" * 32, "device", "plc-5", scope="plant-7", not_after=2_000_000_000)
    text = "\n".join(describe(LedgerState(root.public_key), [genesis, grant]))
    assert f"genesis #0 of the ledger {ORIGIN!r}: root (anchor) {root.public_key.hex()[:16]}…" in text
    assert "committed successor digest: " + "07" * 8 + "…" in text
    assert "grant #1: role 'device' to the key " + "05" * 8 + "…" in text
    assert "name 'plc-5', scope 'plant-7', valid from now until 2033-05-18T03:33:20Z" in text
    assert f"signed by {root.public_key.hex()[:16]}…" in text
    before = m.state.copy()
    revoke = m.revoke(b"\x05" * 32, reason=2)
    text = "\n".join(describe(before, [revoke]))
    assert "revoke #2: the key " + "05" * 8 + "… (every grant of it, now and later); reason lost" in text
