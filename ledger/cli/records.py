"""Record commands: ``writ genesis|grant|revoke|push|status|sign``, ``writ bundle export``,
``writ mirror import|status``.

Every signing command syncs and verifies the whole ledger from the server
with only the anchor (the local mirror, :mod:`ledger.mirror`), builds its
record on top of that verified head (seq, prev, time = max(now, last time)),
applies it to a copy of the verified state so that nothing invalid is ever
pushed, pushes, and on a ``409 stale-head`` re-syncs and re-signs once (the
intent is resolved again: a revoke by name finds its grant again, or reports
that someone else revoked it meanwhile).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import messages
from .. import records as rec
from ..crypto import Signer
from ..errors import BadValidity, UnknownRole, UsageError, WritError
from ..records import EMPTY_HASH, Genesis, Grant, Reason, Revoke
from ..state import GrantInfo, LedgerState
from ..views import credential
from . import common, keys, witnessed
from .common import (
    Builder,
    Client,
    add_key_source,
    build_body,
    check_on_copy,
    parse_hex,
    refuse,
    say,
)
from .main import EXIT_FAILED, EXIT_USAGE, hold_interrupts

# --- helpers --------------------------------------------------------------------


def _last_seq(raws: list[bytes]) -> int:
    return rec.decode_unverified(raws[-1]).body.seq


def _root_only(state: LedgerState, signer: Signer, what: str) -> None:
    root = state.root_key
    if root is None:
        refuse("misplaced-genesis", "the ledger is empty: run writ genesis first")
    if signer.public_key != root:
        refuse(
            "unauthorized-signer",
            f"this key ({signer.public_key.hex()[:16]}…) is not the root in force ({root.hex()[:16]}…):"
            f" only the root signs a {what}",
        )


def credential_json(state: LedgerState, g: GrantInfo, now: int) -> dict[str, Any]:
    return credential(state, g, now, None)


def _is_active(state: LedgerState, g: GrantInfo) -> bool:
    return not state.is_withdrawn(g.seq)


# --- what a grant may say (refused before anything is signed) ------------------------

#: the furthest ahead a validity bound may be: more is a millisecond timestamp, or a typo
MAX_VALIDITY_AHEAD = 100 * 366 * 86400


def check_role(role: str, custom: bool) -> None:
    """A role outside the protocol's list is a misspelling unless ``--custom-role`` says otherwise."""
    if custom or role in rec.PROTOCOL_ROLES or not rec.ROLE_PATTERN.fullmatch(role):
        return  # a malformed role is the rules' invalid-field, when the record is built
    import difflib

    close = difflib.get_close_matches(role, sorted(rec.PROTOCOL_ROLES), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UnknownRole(
        f"unknown role {role!r}{hint}: the protocol's roles are {', '.join(sorted(rec.PROTOCOL_ROLES))};"
        " give --custom-role to grant a role of your own; nothing was signed",
        role=role,
    )


def check_validity(not_before: int, not_after: int, now: int) -> None:
    """Refuse a validity window nobody means: a not_after in the past, a bound more than 100
    years ahead (a millisecond timestamp), not_after at or before not_before."""
    iso = common.utc_iso
    for flag, t in (("--not-before", not_before), ("--not-after", not_after)):
        if t > now + MAX_VALIDITY_AHEAD:
            raise BadValidity(
                f"{flag} {t} is more than 100 years ahead: a UNIX time in seconds is wanted"
                f" ({t // 1000} if that was milliseconds); nothing was signed"
            )
    if not_after and not_after <= now:
        raise BadValidity(
            f"--not-after {not_after} ({iso(not_after)}) is in the past: the grant would never be valid;"
            " nothing was signed"
        )
    if not_after and not_after <= not_before:
        raise BadValidity(
            f"--not-after {iso(not_after)} is not after --not-before {iso(not_before)}: the grant would"
            " never be valid; nothing was signed"
        )


def _check_grant_fields(args: argparse.Namespace) -> None:
    check_role(args.role, args.custom_role)
    check_validity(args.not_before or 0, args.not_after or 0, int(time.time()))


def existing_grant(
    state: LedgerState, subject: bytes, role: str, scope: str, name: str, nb: int, na: int, now: int
) -> GrantInfo | None:
    """The unexpired, unwithdrawn grant saying exactly this, if one is in the ledger (a retry)."""
    for g in sorted(state.grants_of(subject), key=lambda g: g.seq):
        if (g.role, g.scope, g.name, g.not_before, g.not_after) != (role, scope, name, nb, na):
            continue
        if not state.is_withdrawn(g.seq) and (g.not_after == 0 or now < g.not_after):
            return g
    return None


# --- intents (builders) -----------------------------------------------------------


def grant_builder(args: argparse.Namespace, signer: Signer, found: list[int] | None = None) -> Builder:
    """The grant; when the very same grant is already in force, no record (its seq goes to
    ``found``): a retried grant appends nothing."""
    subject, name = _grant_subject(args)
    role, scope = args.role, args.scope or ""
    nb, na = args.not_before or 0, args.not_after or 0
    warned: list[bool] = []

    def build(state: LedgerState, now: int) -> list[bytes]:
        _root_only(state, signer, "grant")
        check_role(role, args.custom_role)
        check_validity(nb, na, now)
        retry = existing_grant(state, subject, role, scope, name, nb, na, now)
        if retry is not None:
            if found is not None:
                found.append(retry.seq)
            return []
        if not warned:
            same = [g for g in state.grants_named(name) if _is_active(state, g)]
            if same:
                say(
                    f"writ: warning: {len(same)} unrevoked grant(s) already named {name!r}"
                    f" (seq {', '.join(str(g.seq) for g in same)}); revoke --name will need a seq"
                )
            warned.append(True)
        body = build_body(lambda: Grant(state.size, state.root, now, subject, role, scope, name, nb, na))
        return [rec.sign(body, signer)]

    return build


def _grant_subject(args: argparse.Namespace) -> tuple[bytes, str]:
    """The subject key and name of a grant, from whichever subject source the arguments give."""
    given = [x for x in (args.subject, args.request, getattr(args, "ssh_public_key", None)) if x is not None]
    if len(given) != 1:
        raise UsageError(
            "give exactly one of --subject HEX32, --request ENROLL_FILE and --ssh-public-key FILE"
        )
    if getattr(args, "ssh_public_key", None) is not None:
        return _ssh_subject(args)
    if args.request is not None:
        data = common.read_file(args.request, "enrollment request", messages.MAX_MESSAGE)
        enroll = messages.parse_enroll(data)  # verifies the proof of possession
        name = args.name if args.name is not None else enroll.name
        if args.name is not None and args.name != enroll.name:
            say(f"writ: note: the request asks for the name {enroll.name!r}; granting it as {args.name!r}")
        return enroll.subject, name
    if args.name is None:
        raise UsageError("--name NAME is required with --subject")
    return parse_hex(args.subject, 32, "--subject"), args.name


def _ssh_subject(args: argparse.Namespace) -> tuple[bytes, str]:
    """``--ssh-public-key FILE``: an OpenSSH ``ssh-ed25519`` key (a ``.pub`` file,
    or one line of ``ssh-add -L``) is the subject; its comment is the default name."""
    from .. import sshkey

    key = sshkey.parse_public_key_file(
        common.read_file(args.ssh_public_key, "SSH public key", sshkey.MAX_LINE)
    )
    name = args.name if args.name is not None else key.comment
    try:
        rec.check_text("name", name, rec.MAX_NAME, min_bytes=1)
    except WritError:
        raise UsageError(
            "give --name NAME: the key's comment is not a usable name (1..64 bytes, no control characters)"
        ) from None
    say(f"writ: granting the SSH key {sshkey.fingerprint(key.public_key)} as {name!r}")
    return key.public_key, name


def revoke_builder(args: argparse.Namespace, signer: Signer, *, revoker: bool) -> Builder:
    try:
        reason = int(Reason.parse(args.reason))
    except WritError as exc:
        raise UsageError(exc.message) from None
    given = [x for x in (args.target, args.name, args.subject) if x is not None]
    if len(given) != 1:
        raise UsageError("give exactly one target: SEQ, --name NAME or --subject HEX32")
    subject = parse_hex(args.subject, 32, "--subject") if args.subject is not None else None
    seq: int | None = None
    if args.target is not None:
        if not args.target.isdigit():
            raise UsageError(f"the target {args.target!r} is not a seq (use --name NAME for a name)")
        seq = int(args.target)

    def build(state: LedgerState, now: int) -> list[bytes]:
        target: int | bytes
        if subject is not None:
            target = subject
        elif seq is not None:
            target = seq
        else:
            target = _resolve_name(state, args.name)
        signer_seq = _revoke_signer(state, signer, now, revoker=revoker)
        body = build_body(lambda: Revoke(state.size, state.root, now, signer_seq, target, reason))
        return [rec.sign(body, signer)]

    return build


def _resolve_name(state: LedgerState, name: str) -> int:
    """The one unrevoked grant named ``name``; refuses unknown and ambiguous names."""
    named = state.grants_named(name)
    if not named:
        refuse("unknown-name", f"no grant is named {name!r}", EXIT_USAGE, name=name)
    active = [g for g in named if _is_active(state, g)]
    if not active:
        refuse(
            "already-revoked",
            f"every grant named {name!r} is already revoked (seq {', '.join(str(g.seq) for g in named)})",
            EXIT_FAILED,
            name=name,
            seqs=[g.seq for g in named],
        )
    if len(active) > 1:
        now = int(time.time())
        cands = [credential_json(state, g, now) for g in active]
        for c in cands:
            say(
                f"writ:   seq {c['seq']}: role {c['role']}, subject {c['subject'][:16]}…,"
                f" granted at {c['granted_at']}"
            )
        refuse(
            "ambiguous-name",
            f"{len(active)} unrevoked grants are named {name!r}: revoke one by its SEQ",
            EXIT_USAGE,
            name=name,
            candidates=cands,
        )
    return active[0].seq


def _revoke_signer(state: LedgerState, signer: Signer, now: int, *, revoker: bool) -> int:
    pub = signer.public_key
    if not revoker and pub == state.root_key:
        return 0
    mine = [
        g.seq
        for g in state.grants.values()
        if g.role == rec.ROLE_REVOKER and g.subject == pub and state.grant_active(g.seq, now) is not None
    ]
    if not mine:
        refuse(
            "unauthorized-signer",
            f"this key ({pub.hex()[:16]}…) is "
            + (
                "not an active revoker in the ledger"
                if revoker
                else "neither the root in force nor an active revoker"
            ),
        )
    return max(mine)


# --- online signing -------------------------------------------------------------------


def _online(
    args: argparse.Namespace, make: Callable[[Signer], Builder], *, revoker: bool = False
) -> common.Pushed:
    """Open the key and the verified mirror, then sign, confirm and push the intent."""
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(Client(args.server))
        signer = stack.enter_context(common.open_key(args))
        anchor = common.default_anchor(args)
        mirror, note = common.open_mirror(
            args, client, anchor, fallback=None if revoker else signer.public_key
        )
        stack.enter_context(mirror)
        common.sync_mirror(mirror, client, note)
        return common.push_intent(mirror, client, make(signer), sync_first=False, ask=not args.yes)
    raise AssertionError("unreachable")  # pragma: no cover


def cmd_grant(args: argparse.Namespace) -> dict[str, Any]:
    subject, name = _grant_subject(args)  # usage errors before any prompt or network
    _check_grant_fields(args)
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


def _revoker_args(args: argparse.Namespace) -> bool:
    if args.revoker_key is None:
        return False
    if common.has_key_source(args):
        raise UsageError("--revoker-key is a key source: give no other (--key, --pkcs11, --ssh-agent)")
    args.key = args.revoker_key
    return True


def cmd_revoke(args: argparse.Namespace) -> dict[str, Any]:
    revoker = _revoker_args(args)
    revoke_builder(args, _NoSigner(), revoker=revoker)  # usage errors first
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


class _NoSigner:
    public_key = b"\x00" * 32

    def sign(self, message: bytes) -> bytes:
        raise AssertionError("not for signing")


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
        digest = _genesis_digest(args)
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
            "seq": _last_seq(pushed.records),
            "log_public_key": log_key.hex(),
            "anchor": anchor.hex(),
            "origin": origin,
            "next_root_digest": digest.hex() if digest else None,
        }
    raise AssertionError("unreachable")  # pragma: no cover


def genesis_builder(origin: str, digest: bytes | None, log_key: bytes, signer: Signer) -> Builder:
    """The genesis (root = the signer's key = the anchor) and the grant of the log key."""

    def build(state: LedgerState, now: int) -> list[bytes]:
        if state.size:
            refuse("misplaced-genesis", "the ledger already has a genesis")
        anchor = signer.public_key
        g = rec.sign(build_body(lambda: Genesis(0, EMPTY_HASH, now, origin, anchor, digest)), signer)
        tmp = check_on_copy(state, [g])
        lg = rec.sign(
            build_body(lambda: Grant(1, tmp.root, now, log_key, rec.ROLE_LOG, "", "log", 0, 0)), signer
        )
        return [g, lg]

    return build


def _carry_hint(out: str) -> None:
    say(f"writ: signed; carry {out} to a connected machine and run: writ push --server URL {out}")


def _sign_genesis_offline(args: argparse.Namespace) -> dict[str, Any]:
    """``writ sign --offline --out FILE genesis --origin O --log-key HEX``: no mirror needed."""
    if not args.offline:
        raise UsageError("online, open the ledger with writ genesis")
    try:
        origin = rec.check_origin(args.origin)
    except WritError as exc:
        raise UsageError(f"--origin: {exc.message}") from None
    log_key = parse_hex(args.log_key, 32, "--log-key")
    if os.path.exists(args.out):
        raise UsageError(f"refusing to add a genesis to the existing records file {args.out}")
    with common.open_key(args) as signer:
        digest = _genesis_digest(args)
        state = LedgerState(signer.public_key, origin=origin)
        raws = genesis_builder(origin, digest, log_key, signer)(state, common.now_for(state))
        check_on_copy(state, raws)
        common.confirm(state, raws, f"write to {args.out}", ask=not args.yes)
        common.write_records_file(args.out, raws)
        _carry_hint(args.out)
        return {
            "seq": _last_seq(raws),
            "out": args.out,
            "records": len(raws),
            "anchor": signer.public_key.hex(),
            "log_public_key": log_key.hex(),
            "next_root_digest": digest.hex() if digest else None,
        }


def _genesis_digest(args: argparse.Namespace) -> bytes | None:
    if args.next_root_digest is not None:
        return parse_hex(args.next_root_digest, 32, "--next-root-digest")
    doc = common.read_pub_json(args.key)
    if doc is not None and "next_root_digest" in doc:
        digest = common.pub_hex(doc, "next_root_digest")
    else:
        digest = None
    if digest is None:
        say(
            "writ: WARNING: the genesis commits to no successor root (next_root_digest null): a lost"
            " or stolen root can never be rotated away (writ root init --shares K-of-N)"
        )
    return digest


# --- push ---------------------------------------------------------------------------


def cmd_push(args: argparse.Namespace) -> dict[str, Any]:
    raws = common.read_records_file(args.file)
    first = rec.decode_unverified(raws[0]).body if _decodes(raws[0]) else None
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(Client(args.server))
        anchor = common.default_anchor(args)
        fallback = first.root if isinstance(first, Genesis) else None
        mirror, note = common.open_mirror(args, client, anchor, fallback=fallback)
        stack.enter_context(mirror)
        common.sync_mirror(mirror, client, note)
        state = mirror.state
        start = first.seq if first is not None else state.size
        if (
            first is not None
            and start + len(raws) <= state.size
            and mirror.read_records(start, start + len(raws)) == raws
        ):
            say("writ: these records are already in the ledger")
            return {"seq": _last_seq(raws), "appended": 0, "already_published": True, "size": state.size}
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
            "seq": _last_seq(raws),
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


# --- status -------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(Client(args.server))
        anchor = common.default_anchor(args)
        mirror, note = common.open_mirror(args, client, anchor)
        stack.enter_context(mirror)
        common.sync_mirror(mirror, client, note)
        state = mirror.state
        now = int(time.time())
        q = args.query
        if q.isdigit():
            g = state.grants.get(int(q))
            if g is None:
                refuse("unknown-target", f"seq {q} is not a grant", EXIT_USAGE)
            found = [g]
        elif len(q) == 64 and all(c in "0123456789abcdefABCDEF" for c in q):
            found = sorted(state.grants_of(bytes.fromhex(q)), key=lambda g: g.seq)
        else:
            found = sorted(state.grants_named(q), key=lambda g: g.seq)
        if not found:
            refuse("unknown-name", f"no grant is named {q!r}", EXIT_USAGE, name=q)
        try:
            fleet: dict[str, Any] | None = client.fleet()
        except WritError as exc:
            say(f"writ: warning: no fleet information ({exc.message})")
            fleet = None
        creds = [_with_fleet(credential_json(state, g, now), fleet) for g in found]
        _print_status(creds)
        out: dict[str, Any] = {"query": q, "size": state.size, "credentials": creds}
        if len(creds) == 1:
            out.update(creds[0])
        return out
    raise AssertionError("unreachable")  # pragma: no cover


def _with_fleet(cred: dict[str, Any], fleet: dict[str, Any] | None) -> dict[str, Any]:
    cred["devices"] = None
    if fleet is None:
        return cred
    revocation = cred.get("revocation")
    if revocation is not None:
        for r in fleet.get("revocations", []) or []:
            if isinstance(r, dict) and r.get("seq") == revocation["seq"]:
                cred["devices"] = {
                    "applied": r.get("applied"),
                    "total": r.get("total"),
                    "stragglers": r.get("stragglers", []),
                }
                break
        else:
            devices = [
                d for d in fleet.get("devices", []) or [] if isinstance(d, dict) and not d.get("revoked")
            ]
            applied = sum(
                1 for d in devices if isinstance(d.get("size"), int) and d["size"] > revocation["seq"]
            )
            cred["devices"] = {"applied": applied, "total": len(devices), "stragglers": []}
    if cred["role"] == rec.ROLE_DEVICE:
        for d in fleet.get("devices", []) or []:
            if isinstance(d, dict) and d.get("grant_seq") == cred["seq"]:
                cred["receipt"] = {k: d.get(k) for k in ("size", "root", "time", "received_at")}
    return cred


def _print_status(creds: list[dict[str, Any]]) -> None:
    con = common.console()
    if con is None:
        return
    from rich.markup import escape
    from rich.table import Table

    t = Table(title="credentials")
    for col in ("seq", "name", "role", "status", "revoked by", "devices applied"):
        t.add_column(col)
    for c in creds:
        r = c["revocation"]
        d = c.get("devices")
        t.add_row(
            str(c["seq"]),
            escape(c["name"]),
            escape(c["role"]),
            c["status"],
            f"seq {r['seq']} ({r['reason']})" if r else "-",
            f"{d['applied']}/{d['total']}" if d else "-",
        )
    con.print(t)


# --- bundles and offline mirrors ------------------------------------------------------


def cmd_bundle_export(args: argparse.Namespace) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(Client(args.server))
        anchor = common.default_anchor(args)
        mirror, note = common.open_mirror(args, client, anchor)
        stack.enter_context(mirror)
        common.sync_mirror(mirror, client, note)
        if mirror.view is None:
            refuse("untrusted-checkpoint", "the ledger has no verified checkpoint yet (no log key granted)")
        start = args.start or 0
        if start > mirror.state.size:
            raise UsageError(f"--start {start} is beyond the ledger's {mirror.state.size} records")
        raws = mirror.read_records(start)
        data = messages.make_bundle(start, raws, mirror.view.note)
        common.write_atomic(Path(args.out), data, mode=0o644)
        return {
            "out": args.out,
            "start": start,
            "records": len(raws),
            "size": mirror.view.size,
            "root": mirror.view.root.hex(),
            "checkpoint_time": mirror.view.timestamp,
            "bytes": len(data),
        }
    raise AssertionError("unreachable")  # pragma: no cover


def cmd_mirror_import(args: argparse.Namespace) -> dict[str, Any]:
    from ..mirror import Mirror

    data = common.read_file(args.bundle, "bundle", messages.MAX_BUNDLE_RECORDS * 700 + 65536)
    bundle = messages.parse_bundle(data)
    anchor = parse_hex(args.anchor, 32, "--anchor") if args.anchor else common.default_anchor(args)
    with Mirror.open(Path(args.mirror), anchor) as mirror:
        before = mirror.state.size
        result = mirror.extend(bundle.start, bundle.records, bundle.checkpoint)
        return {
            "mirror": args.mirror,
            "origin": mirror.state.origin,
            "imported": mirror.state.size - before,
            "size": result.size,
            "root": result.root.hex(),
            "checkpoint_time": result.checkpoint_time,
        }


def cmd_mirror_status(args: argparse.Namespace) -> dict[str, Any]:
    from ..audit import report
    from ..mirror import Mirror

    with Mirror.open(Path(args.mirror), None, create=False) as mirror:
        out = report(mirror.state).to_json()
        out.pop("ok", None)
        out["anchor"] = mirror.anchor.hex()
        out["checkpoint"] = mirror.view.to_json() if mirror.view else None
        out["pending_digest"] = mirror.state.pending_digest.hex() if mirror.state.pending_digest else None
        return out


# --- sign (offline, or online without pushing) ----------------------------------------


def cmd_sign(args: argparse.Namespace) -> dict[str, Any]:
    kind = getattr(args, "sign_kind", None)
    if kind is None:
        raise UsageError("writ sign needs what to sign: genesis, grant, revoke or rotate")
    if args.offline == (args.server is not None):
        raise UsageError("give exactly one of --offline (with --mirror DIR) and --server URL")
    if args.offline and args.mirror is None and kind != "genesis":
        raise UsageError("--offline needs --mirror DIR (made by writ mirror import)")
    if args.out is None:
        raise UsageError("--out FILE is required (the records file to carry and push)")
    if kind == "genesis":
        return _sign_genesis_offline(args)
    revoker = False
    if kind == "grant":
        _grant_subject(args)
        _check_grant_fields(args)
    elif kind == "revoke":
        revoker = _revoker_args(args)
        revoke_builder(args, _NoSigner(), revoker=revoker)
    else:
        keys._check_rotate_source(args)
    with contextlib.ExitStack() as stack:
        client = None if args.offline else stack.enter_context(Client(args.server))
        if args.offline:
            from ..mirror import Mirror

            anchor = common.default_anchor(args)
            mirror = stack.enter_context(Mirror.open(Path(args.mirror), anchor, create=False))
        else:
            anchor = common.default_anchor(args)
            mirror, note = common.open_mirror(args, client, anchor)
            stack.enter_context(mirror)
            assert client is not None
            common.sync_mirror(mirror, client, note)
        state = mirror.state.copy()
        batch: list[bytes] = []
        if os.path.exists(args.out):
            batch = common.read_records_file(args.out)
            for raw in batch:
                try:
                    state.apply(raw)
                except WritError as exc:
                    refuse(
                        "stale-head" if exc.type == "stale-head" else exc.type,
                        f"the records already in {args.out} do not extend this mirror ({exc.message});"
                        " push them first or choose another --out",
                    )
        extra: dict[str, Any] = {}
        if kind == "rotate":
            succ = keys._RotateSigner(args, stack)
            pending = state.pending_digest
            if pending is None:
                refuse(
                    "unauthorized-signer", "the ledger commits to no successor root: no rotation is possible"
                )
            succ.get(pending)
            with keys.new_successor(args, mirror.anchor.hex()) as (digest, sheets):
                if args.successor_shares:
                    keys._save_recovered(args, succ, mirror.anchor, digest)
                raws = keys.rotate_builder(args, succ, digest)(state, common.now_for(state))
                check_on_copy(state, raws)
                common.confirm(state, raws, f"write to {args.out}", ask=not args.yes)
                common.write_records_file(args.out, batch + raws)
            extra = {"next_root_digest": digest.hex() if digest else None, "shares": sheets}
        else:
            signer = stack.enter_context(common.open_key(args))
            found: list[int] = []
            build = (
                grant_builder(args, signer, found)
                if kind == "grant"
                else revoke_builder(args, signer, revoker=revoker)
            )
            raws = build(state, common.now_for(state))
            if not raws:
                say(f"writ: this grant is already in force (seq {found[-1]}): nothing written")
                return {"seq": found[-1], "out": args.out, "records": len(batch), "existing": True}
            check_on_copy(state, raws)
            common.confirm(state, raws, f"write to {args.out}", ask=not args.yes)
            common.write_records_file(args.out, batch + raws)
        _carry_hint(args.out)
        return {"seq": _last_seq(raws), "out": args.out, "records": len(batch) + len(raws), **extra}
    raise AssertionError("unreachable")  # pragma: no cover


# --- registration -------------------------------------------------------------------


def _add_grant_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--subject", metavar="HEX32", help="the public key to grant")
    p.add_argument(
        "--request", metavar="ENROLL_FILE", help="a device's enrollment request (proof of possession)"
    )
    p.add_argument(
        "--ssh-public-key",
        metavar="FILE",
        help="an OpenSSH ssh-ed25519 public key file (id_ed25519.pub, or a line of ssh-add -L)",
    )
    p.add_argument(
        "--role",
        required=True,
        metavar="ROLE",
        help="one of " + ", ".join(sorted(rec.PROTOCOL_ROLES)) + " (others need --custom-role)",
    )
    p.add_argument(
        "--custom-role",
        action="store_true",
        help="ROLE is deliberately outside the protocol's list (else it is refused as a misspelling)",
    )
    p.add_argument("--name", metavar="NAME", help="a label such as tablet-07 (default: the request's)")
    p.add_argument(
        "--scope", default="", metavar="S", help="'' (everywhere), or a site path like plant-7/line-3"
    )
    p.add_argument(
        "--not-before",
        type=_uint,
        metavar="UNIX",
        help="valid from this UNIX time in seconds (0 or absent: at once)",
    )
    p.add_argument(
        "--not-after",
        type=_uint,
        metavar="UNIX",
        help="valid until this UNIX time in seconds, in the future (0 or absent: no expiry)",
    )


def _add_revoke_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", nargs="?", metavar="SEQ", help="the seq of the grant to revoke")
    p.add_argument("--name", metavar="NAME", help="revoke the one unrevoked grant of this name")
    p.add_argument("--subject", metavar="HEX32", help="revoke a key: every grant of it, now and later")
    p.add_argument(
        "--reason",
        required=True,
        metavar="REASON",
        help="unspecified, key_compromise, lost, superseded, retired",
    )
    p.add_argument("--revoker-key", metavar="FILE", help="sign as the revoker whose key this file holds")


def _uint(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not an unsigned integer")
    return int(text)


_ANCHOR_HELP = "the ledger's anchor (default: $WRIT_ANCHOR, FILE.pub.json)"
_MIRROR_HELP = "the verified mirror directory (default under $WRIT_HOME)"


def _add_server(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument("--server", required=required, metavar="URL", help="the ledger server")
    p.add_argument("--anchor", metavar="HEX32", help=_ANCHOR_HELP)
    p.add_argument("--mirror", metavar="DIR", help=_MIRROR_HELP)


def register(sub: Any) -> None:
    p = sub.add_parser("genesis", help="open the ledger: the genesis and the grant of the log key")
    p.add_argument("--origin", required=True, metavar="ORIGIN", help="the ledger's origin (as the server's)")
    p.add_argument(
        "--log-key", metavar="HEX32", help="the log's public key (default: what the server reports)"
    )
    p.add_argument("--next-root-digest", metavar="HEX32", help="override FILE.pub.json's successor digest")
    _add_server(p)
    add_key_source(p)
    p.set_defaults(handler=cmd_genesis)

    p = sub.add_parser("grant", help="grant a role to a key")
    _add_server(p)
    _add_grant_args(p)
    add_key_source(p)
    witnessed.add_flag(p)  # (witness)
    p.set_defaults(handler=cmd_grant)

    p = sub.add_parser("revoke", help="revoke a grant (by seq or name) or a key")
    _add_server(p)
    _add_revoke_args(p)
    add_key_source(p)
    witnessed.add_flag(p)  # (witness)
    p.set_defaults(handler=cmd_revoke)

    p = sub.add_parser("push", help="push pre-signed records (a MessagePack array file)")
    p.add_argument("file", metavar="FILE", help="the records file (from writ sign)")
    _add_server(p)
    p.set_defaults(handler=cmd_push)

    p = sub.add_parser("status", help="a credential, its revocation, and how far it has spread")
    p.add_argument("query", metavar="NAME|SEQ", help="a grant's name, seq or subject key (hex)")
    _add_server(p)
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser("bundle", help="sync bundles for offline machines and device sites")
    bs = p.add_subparsers(dest="bundle_command", metavar="COMMAND")
    common.needs_subcommand(p, "export")
    e = bs.add_parser("export", help="write a verified bundle (records + checkpoint)")
    _add_server(e)
    e.add_argument("--start", type=_uint, default=0, metavar="N", help="the first record to include")
    e.add_argument("--out", required=True, metavar="FILE", help="the bundle file to write")
    e.set_defaults(handler=cmd_bundle_export)

    p = sub.add_parser("mirror", help="offline mirrors")
    ms = p.add_subparsers(dest="mirror_command", metavar="COMMAND")
    common.needs_subcommand(p, "import, status")
    i = ms.add_parser("import", help="build or extend an offline mirror from a bundle, fully verified")
    i.add_argument("bundle", metavar="BUNDLE", help="the bundle file (from writ bundle export)")
    i.add_argument("--anchor", metavar="HEX32", help=_ANCHOR_HELP)
    i.add_argument("--mirror", required=True, metavar="DIR", help="the offline mirror directory")
    i.set_defaults(handler=cmd_mirror_import)
    s = ms.add_parser("status", help="what a mirror holds")
    s.add_argument("--mirror", required=True, metavar="DIR", help="the offline mirror directory")
    s.set_defaults(handler=cmd_mirror_status)

    p = sub.add_parser("sign", help="sign records into a file without pushing (air-gapped: --offline)")
    p.add_argument("--offline", action="store_true", help="sign on top of --mirror DIR, no network")
    p.add_argument(
        "--server", metavar="URL", help="sync from this server first (and still only write the file)"
    )
    p.add_argument("--anchor", metavar="HEX32", help=_ANCHOR_HELP)
    p.add_argument("--mirror", metavar="DIR", help=_MIRROR_HELP)
    p.add_argument("--out", metavar="FILE", help="the records file (extended if it exists)")
    ss = p.add_subparsers(dest="sign_kind", metavar="KIND")
    late = argparse.ArgumentParser(add_help=False)
    late.add_argument(
        "--out", default=argparse.SUPPRESS, metavar="FILE", help="the records file (extended if it exists)"
    )
    late.add_argument("--mirror", default=argparse.SUPPRESS, metavar="DIR", help=_MIRROR_HELP)
    late.add_argument("--anchor", default=argparse.SUPPRESS, metavar="HEX32", help=_ANCHOR_HELP)
    late.add_argument(
        "--offline",
        action="store_true",
        default=argparse.SUPPRESS,
        help="sign on top of --mirror DIR, no network",
    )
    gen = ss.add_parser("genesis", parents=[late], help="sign the genesis and the log grant (offline)")
    gen.add_argument("--origin", required=True, metavar="ORIGIN", help="the ledger's origin")
    gen.add_argument("--log-key", required=True, metavar="HEX32", help="what `writ server init` printed")
    gen.add_argument("--next-root-digest", metavar="HEX32", help="override FILE.pub.json's successor digest")
    add_key_source(gen)
    g = ss.add_parser("grant", parents=[late], help="sign a grant")
    _add_grant_args(g)
    add_key_source(g)
    r = ss.add_parser("revoke", parents=[late], help="sign a revoke")
    _add_revoke_args(r)
    add_key_source(r)
    t = ss.add_parser("rotate", parents=[late], help="sign a rotate with the successor")
    keys.add_successor_source(t)
    t.add_argument("--cost", choices=keys._COSTS, help=keys._COST_HELP)
    t.add_argument(
        "--new-key-out",
        dest="out_key",
        metavar="FILE",
        help="with --successor-shares: keep the new root here",
    )
    keys._add_shares_out(t)
    p.set_defaults(handler=cmd_sign)
