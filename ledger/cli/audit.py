"""Audit commands: ``writ audit``, ``writ show SEQ``, ``writ log``.

``audit`` verifies a whole ledger from genesis with nothing but the anchor,
through :func:`ledger.audit.audit` (the same rules as the server and the
devices), from a server (``--server``: the checkpoint, then every record up
to its size, in pages) or straight from a server's database (``--data``:
``DIR/ledger.db`` opened read-only, checked by the same routine ``writ serve``
runs before it serves, so a backup that passes is one the server will serve).
Exit 0 with a summary, or exit 3 with ``{"error": TYPE, "seq": FIRST_BAD_SEQ}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .. import acceptance, verifier
from .. import audit as core_audit
from .. import records as rec
from ..errors import (
    BadMessage,
    CorruptLedger,
    Rollback,
    UsageError,
    VerificationError,
    WritError,
)
from ..progress import stage
from ..records import Genesis, Grant, Reason, Revoke, Rotate
from ..redact import redact
from ..state import LedgerState
from ..storage.load import load_ledger
from ..storage.sqlite import SqliteStorage
from . import common
from .common import PAGE, Client, parse_hex, say
from .main import EXIT_VERIFY, CommandFailed

# --- sources -------------------------------------------------------------------------


class Source:
    """Record bytes in order, and the latest checkpoint note (or None)."""

    def checkpoint(self) -> str | None:
        raise NotImplementedError

    def pages(self, start: int, end: int | None) -> Iterator[list[bytes]]:
        raise NotImplementedError

    def count(self) -> int | None:
        return None

    def close(self) -> None:
        pass


class ServerSource(Source):
    def __init__(self, client: Client) -> None:
        self.client = client

    def checkpoint(self) -> str | None:
        return self.client.checkpoint()

    def pages(self, start: int, end: int | None) -> Iterator[list[bytes]]:
        """Pages of up to 1000 records; the next page is fetched while this one is verified."""
        if end is None:
            end = acceptance.checkpoint_size(self.client.checkpoint())

        def fetch(s: int) -> list[bytes]:
            want = min(PAGE, end - s)
            return self.client.records(s, want)[:want]

        with ThreadPoolExecutor(1) as pool:
            pos = start
            fut: Future[list[bytes]] | None = pool.submit(fetch, pos) if pos < end else None
            while fut is not None:
                page = fut.result()
                if not page:
                    return
                pos += len(page)
                fut = pool.submit(fetch, pos) if pos < end else None
                yield page


class DatabaseSource(Source):
    """``DIR/ledger.db`` through the server's own storage code, opened read-only
    (:meth:`SqliteStorage.open <ledger.storage.sqlite.SqliteStorage.open>` with
    ``read_only``: no write, no ``-wal``/``-shm`` file created, and it works
    while ``writ serve`` runs on the same directory). The audit of a database
    is :func:`~ledger.storage.load.load_ledger`, the very check ``writ serve``
    runs before it serves: a backup that passes is one the server will serve."""

    def __init__(self, directory: str) -> None:
        path = Path(directory) / "ledger.db"
        if not path.is_file():
            raise UsageError(f"no ledger database at {path}")
        self.path = path
        self._runner = asyncio.Runner()
        try:
            self.store = self._runner.run(SqliteStorage.open(path, read_only=True))
        except BaseException:
            self._runner.close()
            raise

    def checkpoint(self) -> str | None:
        return self._runner.run(self.store.latest_checkpoint())

    def count(self) -> int | None:
        return self._runner.run(self.store.head()).size

    def pages(self, start: int, end: int | None) -> Iterator[list[bytes]]:
        stop = self.count() if end is None else end
        assert stop is not None
        for lo in range(start, stop, PAGE):
            page = self._runner.run(self.store.read(lo, min(stop, lo + PAGE)))
            if not page:
                return
            yield page

    def load(
        self, anchor: bytes, executor: ThreadPoolExecutor, progress: Callable[[int], None] | None
    ) -> LedgerState:
        loaded = self._runner.run(load_ledger(self.store, anchor=anchor, origin=None, executor=executor))
        if progress is not None:
            progress(loaded.state.size)
        return loaded.state

    def close(self) -> None:
        try:
            self._runner.run(self.store.close())
        finally:
            self._runner.close()


@contextlib.contextmanager
def open_source(args: argparse.Namespace) -> Iterator[Source]:
    if (args.server is None) == (args.data is None):
        raise UsageError("give exactly one of --server URL and --data DIR")
    if args.server is not None:
        with Client(args.server) as client:
            yield ServerSource(client)
    else:
        src = DatabaseSource(args.data)
        try:
            yield src
        finally:
            src.close()


def _anchor(args: argparse.Namespace, required: bool) -> bytes | None:
    if args.anchor is not None:
        return parse_hex(args.anchor, 32, "--anchor")
    env = os.environ.get("WRIT_ANCHOR")
    if env:
        return parse_hex(env, 32, "$WRIT_ANCHOR")
    if required:
        raise UsageError("--anchor HEX32 is required (the root public key the ledger started from)")
    return None


# --- audit -----------------------------------------------------------------------------


def _fail(exc: WritError) -> CommandFailed:
    """``{"error", "seq": FIRST_BAD_SEQ or null, "message", ...detail}``, exit 3.

    A stored ledger that fails is reported by what failed (the rejection type of
    its first bad record, or leaf-hash-mismatch, missing-record, ...), as from a server."""
    seq = exc.detail.get("seq")
    seq = seq if type(seq) is int else None
    cause = exc.detail.get("cause") if isinstance(exc, CorruptLedger) else None
    kind = cause if isinstance(cause, str) else exc.type
    say(f"writ: AUDIT FAILED: {kind}" + (f" at seq {seq}" if seq is not None else "") + f": {exc.message}")
    out = {"error": kind, "seq": seq, "message": exc.message}
    for k, v in exc.detail.items():
        out.setdefault(k, v)
    return CommandFailed(out, EXIT_VERIFY)


def run_audit(
    source: Source,
    anchor: bytes,
    *,
    progress: Callable[[int], None] | None = None,
    keep: list[bytes] | None = None,
) -> tuple[LedgerState, core_audit.AuditReport, dict[str, Any] | None]:
    """Verify every record, the tree and the checkpoint. Raises a WritError on the first failure.

    ``keep`` collects the record bytes as they are verified."""
    note = source.checkpoint()
    cp_size = acceptance.checkpoint_size(note) if note is not None else None
    if cp_size is not None and cp_size >= verifier.PROCESS_MIN:
        verifier.shared()  # the workers start while the first records are read

    def pages(start: int, end: int | None) -> Iterator[list[bytes]]:
        for page in source.pages(start, end):
            if keep is not None:
                keep.extend(page)
            yield page

    checked: dict[str, Any] | None = None
    with ThreadPoolExecutor(2) as executor:
        vc = None
        if isinstance(source, DatabaseSource):
            # everything `writ serve` checks before serving, by the same routine
            st = source.load(anchor, executor, progress)
            if note is not None and cp_size is not None and cp_size > st.size:
                raise CorruptLedger(
                    f"the stored checkpoint names {cp_size} records but the database holds {st.size}",
                    seq=st.size,
                    cause="missing-record",
                )
            if note is not None and st.origin is not None:
                vc = core_audit.check_checkpoint(st, note, now=int(time.time()))
        else:
            st, _ = core_audit.audit(pages(0, cp_size), anchor=anchor, executor=executor, progress=progress)
            if note is not None and st.origin is None and cp_size:
                raise Rollback(f"the checkpoint names {cp_size} records but no genesis was served", seq=0)
            if note is not None and st.origin is not None:
                vc = core_audit.check_checkpoint(st, note, now=int(time.time()))
        if vc is not None:
            checked = {
                "size": vc.checkpoint.size,
                "root": vc.checkpoint.root.hex(),
                "timestamp": vc.timestamp,
                "log_key": vc.log_key.hex(),
                "cosigners": list(vc.cosigners),
            }
    return st, core_audit.report(st), checked


def cmd_audit(args: argparse.Namespace) -> dict[str, Any]:
    anchor = _anchor(args, required=True)
    assert anchor is not None
    t0 = time.monotonic()
    with open_source(args) as source:
        total = source.count() if isinstance(source, DatabaseSource) else None
        con = None if args.json else common.console()
        try:
            if args.json:
                _st, report, checked = run_audit(source, anchor)
            else:
                with stage("verifying the ledger", total, unit="records") as s:
                    _st, report, checked = run_audit(source, anchor, progress=s.advance)
        except (VerificationError, CorruptLedger) as exc:
            raise _fail(exc) from None
    seconds = time.monotonic() - t0
    if report.size and report.origin is None:
        raise _fail(BadMessage("the ledger does not open with a genesis"))
    if not args.data and checked is None and report.size:
        raise _fail(BadMessage("no checkpoint could be verified"))
    out = report.to_json()
    out["checkpoint"] = checked
    out["source"] = redact(args.server) if args.server else args.data
    out["seconds"] = round(seconds, 3)
    if con is not None:
        _print_report(con, out)
    else:
        say(
            f"writ: audit OK: {report.size} records from genesis verify under anchor {anchor.hex()[:16]}…"
            + (f"; checkpoint at {checked['size']} verifies" if checked else "; no checkpoint")
        )
    return out


def _print_report(con: Any, out: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=f"audit OK: {escape(str(out['origin']))}", show_header=False)
    t.add_column("what")
    t.add_column("value")
    t.add_row("records", str(out["size"]))
    t.add_row("root", out["root"])
    for k, v in out["records_by_kind"].items():
        t.add_row(f"  {k}", str(v))
    t.add_row("active grants", str(out["active_grants"]))
    for role, n in sorted(out["grants_by_role"].items()):
        t.add_row(f"  {escape(role)}", str(n))
    t.add_row("revoked grants", str(out["revoked_grants"]))
    t.add_row("revoked keys", str(out["revoked_keys"]))
    t.add_row("roots", ", ".join(f"{r['key'][:16]}… from {r['from_seq']}" for r in out["roots"]))
    cp = out.get("checkpoint")
    t.add_row("checkpoint", f"size {cp['size']}, time {_iso(cp['timestamp'])}" if cp else "none")
    t.add_row("seconds", str(out["seconds"]))
    con.print(t)


# --- show / log -------------------------------------------------------------------------


def _iso(t: int | None) -> str:
    if t is None:
        return "-"
    try:
        return datetime.datetime.fromtimestamp(t, tz=datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    except (OverflowError, ValueError, OSError):
        return str(t)


class History:
    """Decoded records with the cross references a human wants (who revoked what)."""

    def __init__(self, raws: list[bytes], state: LedgerState | None) -> None:
        self.raws = raws
        self.state = state
        self.bodies: list[rec.Body | None] = []
        self.grants: dict[int, Grant] = {}
        self.revoked_by: dict[int | bytes, Revoke] = {}
        for raw in raws:
            try:
                body = rec.decode_unverified(raw).body
            except WritError:
                body = None
            self.bodies.append(body)
            if isinstance(body, Grant):
                self.grants[body.seq] = body
            elif isinstance(body, Revoke):
                self.revoked_by.setdefault(body.target, body)

    def _who(self, seq: int) -> str:
        g = self.grants.get(seq)
        return f"{g.name or '(unnamed)'} (seq {seq}, {g.role})" if g else f"seq {seq}"

    def entry(self, i: int) -> dict[str, Any]:
        raw, body = self.raws[i], self.bodies[i]
        if body is None:
            return {"seq": i, "kind": "undecodable", "raw": raw.hex(), "summary": "not a valid record"}
        out = rec.describe(body)
        out["time_iso"] = _iso(body.time)
        out["leaf_hash"] = rec.SignedRecord(raw, body, b"").leaf_hash.hex()
        out["raw"] = raw.hex()
        if isinstance(body, Genesis):
            succ = "a successor root is committed" if body.next_root_digest else "NO successor root committed"
            out["summary"] = f"genesis of {body.origin}, root {body.root.hex()[:16]}…; {succ}"
        elif isinstance(body, Grant):
            window = ""
            if body.not_before:
                window += f" from {_iso(body.not_before)}"
            if body.not_after:
                window += f" until {_iso(body.not_after)}"
            scope = f" in scope {body.scope!r}" if body.scope else ""
            out["summary"] = (
                f"root granted {body.role} to {body.name or '(unnamed)'}"
                f" (key {body.subject.hex()[:16]}…){scope}{window}"
            )
            r = self.revoked_by.get(body.seq) or self.revoked_by.get(body.subject)
            out["revoked"] = (
                {"seq": r.seq, "reason": Reason.label(r.reason), "time": r.time, "signer": r.signer}
                if r
                else None
            )
        elif isinstance(body, Revoke):
            who = "the root" if body.signer == 0 else f"revoker {self._who(body.signer)}"
            if isinstance(body.target, int):
                what = self._who(body.target)
                tg = self.grants.get(body.target)
                if tg is not None:
                    out["target_name"] = tg.name
                    out["target_role"] = tg.role
            else:
                what = f"the key {body.target.hex()[:16]}… (every grant of it)"
            out["summary"] = f"{who} revoked {what}: {Reason.label(body.reason)}"
        elif isinstance(body, Rotate):
            succ = "a new successor is committed" if body.next_root_digest else "NO successor committed"
            out["summary"] = f"root rotated to {body.new_root.hex()[:16]}…; {succ}"
        return out

    def matches(self, i: int, name: str | None, role: str | None, kind: str | None) -> bool:
        body = self.bodies[i]
        if body is None:
            return name is None and role is None and kind is None
        if kind is not None and body.KIND.name.lower() != kind:
            return False
        if name is None and role is None:
            return True
        g: Grant | None = None
        if isinstance(body, Grant):
            g = body
        elif isinstance(body, Revoke) and isinstance(body.target, int):
            g = self.grants.get(body.target)
        elif isinstance(body, Revoke):
            subject = body.target
            return any(
                (name is None or x.name == name) and (role is None or x.role == role)
                for x in self.grants.values()
                if x.subject == subject
            )
        if g is None:
            return False
        return (name is None or g.name == name) and (role is None or g.role == role)


def _load_history(args: argparse.Namespace) -> tuple[History, bool]:
    anchor = _anchor(args, required=False)
    with open_source(args) as source:
        if anchor is not None:
            raws: list[bytes] = []
            try:
                st, _, _ = run_audit(source, anchor, keep=raws)
            except (VerificationError, CorruptLedger) as exc:
                raise _fail(exc) from None
            return History(raws, st), True
        raws = [r for page in source.pages(0, None) for r in page]
    say("writ: note: not verified (give --anchor HEX32 to verify every record from genesis)")
    return History(raws, None), False


def cmd_show(args: argparse.Namespace) -> dict[str, Any]:
    history, verified = _load_history(args)
    if args.seq >= len(history.raws):
        raise UsageError(f"seq {args.seq} is beyond the ledger's {len(history.raws)} records")
    entry = history.entry(args.seq)
    _print_entries([entry])
    return {"records": [entry], "size": len(history.raws), "verified": verified}


def cmd_log(args: argparse.Namespace) -> dict[str, Any]:
    if args.kind is not None and args.kind not in ("genesis", "grant", "revoke", "rotate"):
        raise UsageError("--kind is one of genesis, grant, revoke, rotate")
    history, verified = _load_history(args)
    picked = [i for i in range(len(history.raws)) if history.matches(i, args.name, args.role, args.kind)]
    if args.limit is not None:
        picked = picked[-args.limit :] if args.limit else []
    entries = [history.entry(i) for i in picked]
    _print_entries(entries)
    return {"records": entries, "size": len(history.raws), "verified": verified}


def _print_entries(entries: list[dict[str, Any]]) -> None:
    con = common.console()
    if con is None:
        return
    from rich.markup import escape
    from rich.table import Table

    t = Table()
    for col in ("seq", "time", "kind", "what"):
        t.add_column(col)
    for e in entries:
        what = escape(e["summary"])  # names come from enrollment requests: never markup
        if e.get("revoked"):
            what += f"  [red](revoked at seq {e['revoked']['seq']}: {e['revoked']['reason']})[/red]"
        t.add_row(str(e["seq"]), e.get("time_iso", "-"), e["kind"], what)
    con.print(t)


# --- registration --------------------------------------------------------------------------


def _source_args(p: argparse.ArgumentParser, *, anchor_required: bool) -> None:
    p.add_argument("--server", metavar="URL", help="read the ledger this server serves")
    p.add_argument("--data", metavar="DIR", help="read a server's data directory (DIR/ledger.db, read-only)")
    p.add_argument(
        "--anchor",
        metavar="HEX32",
        help="the root public key the ledger started from"
        + ("" if anchor_required else " (verifies when given)"),
    )


def register(sub: Any) -> None:
    p = sub.add_parser("audit", help="verify a whole ledger from genesis with only the anchor")
    _source_args(p, anchor_required=True)
    p.add_argument("--json", action="store_true", help="no table or progress bar on stderr")
    p.set_defaults(handler=cmd_audit)

    p = sub.add_parser("show", help="one record, decoded for humans")
    p.add_argument("seq", type=common.uint_arg, metavar="SEQ", help="the record's seq")
    _source_args(p, anchor_required=False)
    p.set_defaults(handler=cmd_show)

    p = sub.add_parser("log", help="the history, decoded for humans")
    _source_args(p, anchor_required=False)
    p.add_argument("--name", metavar="NAME", help="only records about grants of this name")
    p.add_argument("--role", metavar="ROLE", help="only records about grants of this role")
    p.add_argument("--kind", metavar="KIND", help="genesis, grant, revoke or rotate")
    p.add_argument("--limit", type=common.uint_arg, metavar="N", help="only the last N matching records")
    p.set_defaults(handler=cmd_log)
