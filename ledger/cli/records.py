"""Record commands: ``writ genesis|grant|revoke|push``.

Every signing command syncs and verifies the whole ledger from the server
with only the anchor (the local mirror, :mod:`ledger.mirror`), builds its
record on top of that verified head (seq, prev, time = max(now, last time)),
applies it to a copy of the verified state so that nothing invalid is ever
pushed, pushes, and on a ``409 stale-head`` re-syncs and re-signs once (the
intent is resolved again: a revoke by name finds its grant again, or reports
that someone else revoked it meanwhile). The intents and the checks are
:mod:`ledger.cli.intents`; ``writ status`` is :mod:`ledger.cli.status`;
``writ sign``, ``writ bundle`` and ``writ mirror`` are :mod:`ledger.cli.offline`.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import records as rec
from ..crypto import Signer
from ..errors import UsageError, WritError
from ..records import Genesis, Grant, Reason, Revoke
from . import common, witnessed
from .common import Builder, Client, add_key_source, check_on_copy, parse_hex, refuse, say
from .intents import (
    NoSigner,
    add_grant_args,
    add_revoke_args,
    add_server,
    check_grant_fields,
    genesis_builder,
    genesis_digest,
    grant_builder,
    grant_subject,
    last_seq,
    revoke_builder,
    revoker_args,
)
from .main import hold_interrupts

# --- online signing ----------------------------------------------------------------------


def _online(
    args: argparse.Namespace, make: Callable[[Signer], Builder], *, revoker: bool = False
) -> common.Pushed:
    """Open the key and the verified mirror, then sign, confirm and push the intent."""
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(Client(args.server))
        signer = stack.enter_context(common.open_key(args))
        mirror = common.synced_mirror(stack, args, client, fallback=None if revoker else signer.public_key)
        return common.push_intent(mirror, client, make(signer), sync_first=False, ask=not args.yes)
    raise AssertionError("unreachable")  # pragma: no cover


def cmd_grant(args: argparse.Namespace) -> dict[str, Any]:
    subject, name = grant_subject(args)  # usage errors before any prompt or network
    check_grant_fields(args)
    found: list[int] = []
    pushed = _online(args, lambda s: grant_builder(args, s, found))
    if not pushed.records:
        say(f"writ: this grant is already in force (seq {found[-1]}): nothing appended")
        return {
            "seq": found[-1],
            "name": name,
            "role": args.role,
            "subject": subject.hex(),
            "size": pushed.state.size,
            "existing": True,
        }
    body = rec.decode_unverified(pushed.records[-1]).body
    assert isinstance(body, Grant)
    out = {
        "seq": body.seq,
        "name": body.name,
        "role": body.role,
        "subject": body.subject.hex(),
        "size": pushed.state.size,
    }
    return _with_witnessed(args, pushed, body.seq, out)


def _with_witnessed(
    args: argparse.Namespace, pushed: common.Pushed, seq: int, out: dict[str, Any]
) -> dict[str, Any]:
    """(witness) ``"witnessed"``: is the record cosigned by the witnesses (ledger/cli/witnessed.py)."""
    w = witnessed.report(args, pushed.state, seq)
    return out if w is None else {**out, "witnessed": w}


def cmd_revoke(args: argparse.Namespace) -> dict[str, Any]:
    revoker = revoker_args(args)
    revoke_builder(args, NoSigner(), revoker=revoker)  # usage errors first
    pushed = _online(args, lambda s: revoke_builder(args, s, revoker=revoker), revoker=revoker)
    body = rec.decode_unverified(pushed.records[-1]).body
    assert isinstance(body, Revoke)
    out = {
        "seq": body.seq,
        "target": body.target if isinstance(body.target, int) else body.target.hex(),
        "reason": Reason.label(body.reason),
        "signer": body.signer,
        "size": pushed.state.size,
    }
    return _with_witnessed(args, pushed, body.seq, out)


def cmd_genesis(args: argparse.Namespace) -> dict[str, Any]:
    try:
        origin = rec.check_origin(args.origin)
    except WritError as exc:
        raise UsageError(f"--origin: {exc.message}") from None
    log_key_arg = parse_hex(args.log_key, 32, "--log-key") if args.log_key else None
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(Client(args.server))
        signer = stack.enter_context(common.open_key(args))
        anchor = signer.public_key
        if args.anchor is not None and parse_hex(args.anchor, 32, "--anchor") != anchor:
            raise UsageError(
                "--anchor is not this key's public key: a genesis is signed by the anchor itself"
            )
        digest = genesis_digest(args)
        info = client.ledger()
        if info.get("origin") not in (None, origin):
            refuse(
                "wrong-origin", f"the server is configured for origin {info.get('origin')!r}, not {origin!r}"
            )
        if info.get("anchor") not in (None, anchor.hex()):
            refuse("invalid-field", "the server is configured for another anchor than this key's public key")
        if log_key_arg is not None:
            log_key = log_key_arg
            if info.get("log_public_key") not in (None, log_key.hex()):
                say("writ: warning: --log-key differs from the log key the server reports")
        else:
            lk = info.get("log_public_key")
            if not isinstance(lk, str):
                raise UsageError("the server reports no log key: give --log-key HEX32")
            log_key = parse_hex(lk, 32, "the server's log_public_key")
        note = client.checkpoint()
        from ..mirror import Mirror, default_dir

        path = Path(args.mirror) if args.mirror else default_dir(origin)
        mirror = stack.enter_context(Mirror.open(path, anchor))
        common.sync_mirror(mirror, client, note)
        if mirror.state.size:
            refuse(
                "misplaced-genesis",
                f"the ledger already holds {mirror.state.size} records (its genesis is in place)",
                size=mirror.state.size,
            )
        build = genesis_builder(origin, digest, log_key, signer)
        pushed = common.push_intent(mirror, client, build, sync_first=False, ask=not args.yes)
        say(f"writ: log key granted: {log_key.hex()} (compare it with what `writ server init` printed)")
        return {
            "seq": last_seq(pushed.records),
            "log_public_key": log_key.hex(),
            "anchor": anchor.hex(),
            "origin": origin,
            "next_root_digest": digest.hex() if digest else None,
        }
    raise AssertionError("unreachable")  # pragma: no cover


# --- push --------------------------------------------------------------------------------


def cmd_push(args: argparse.Namespace) -> dict[str, Any]:
    raws = common.read_records_file(args.file)
    first = rec.decode_unverified(raws[0]).body if _decodes(raws[0]) else None
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(Client(args.server))
        fallback = first.root if isinstance(first, Genesis) else None
        mirror = common.synced_mirror(stack, args, client, fallback=fallback)
        state = mirror.state
        start = first.seq if first is not None else state.size
        if (
            first is not None
            and start + len(raws) <= state.size
            and mirror.read_records(start, start + len(raws)) == raws
        ):
            say("writ: these records are already in the ledger")
            return {"seq": last_seq(raws), "appended": 0, "already_published": True, "size": state.size}
        if first is not None and start != state.size:
            refuse(
                "stale-head",
                f"these records were signed for a ledger of {start} records, but it now has {state.size}:"
                " sign them again on an up-to-date mirror (nothing was appended)",
                size=state.size,
                root=state.root.hex(),
            )
        new = check_on_copy(state, raws)
        try:
            answer = client.post_records(raws)
            hold_interrupts()  # landed: Ctrl-C from here on cannot turn it into a failure
        except WritError as exc:
            if exc.type == "stale-head":
                refuse(
                    "stale-head",
                    "the ledger moved on before these records arrived: sign them again"
                    " (nothing was appended)",
                )
            raise
        common.writer_for(mirror, client).after_push()
        return {
            "seq": last_seq(raws),
            "appended": answer.get("appended", len(raws)),
            "size": answer.get("size", new.size),
            "root": answer.get("root", new.root.hex()),
        }
    raise AssertionError("unreachable")  # pragma: no cover


def _decodes(raw: bytes) -> bool:
    try:
        rec.decode_unverified(raw)
    except WritError:
        return False
    return True


# --- registration ------------------------------------------------------------------------


def register(sub: Any) -> None:
    """``writ genesis``, ``grant``, ``revoke``, ``push``."""
    p = sub.add_parser("genesis", help="open the ledger: the genesis and the grant of the log key")
    p.add_argument("--origin", required=True, metavar="ORIGIN", help="the ledger's origin (as the server's)")
    p.add_argument(
        "--log-key", metavar="HEX32", help="the log's public key (default: what the server reports)"
    )
    p.add_argument("--next-root-digest", metavar="HEX32", help="override FILE.pub.json's successor digest")
    add_server(p)
    add_key_source(p)
    p.set_defaults(handler=cmd_genesis)

    p = sub.add_parser("grant", help="grant a role to a key")
    add_server(p)
    add_grant_args(p)
    add_key_source(p)
    witnessed.add_flag(p)  # (witness)
    p.set_defaults(handler=cmd_grant)

    p = sub.add_parser("revoke", help="revoke a grant (by seq or name) or a key")
    add_server(p)
    add_revoke_args(p)
    add_key_source(p)
    witnessed.add_flag(p)  # (witness)
    p.set_defaults(handler=cmd_revoke)

    p = sub.add_parser("push", help="push pre-signed records (a MessagePack array file)")
    p.add_argument("file", metavar="FILE", help="the records file (from writ sign)")
    add_server(p)
    p.set_defaults(handler=cmd_push)
