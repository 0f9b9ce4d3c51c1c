"""What a record command may sign, and the builders that sign it on a verified head.

Shared by the online commands (:mod:`ledger.cli.records`) and the offline
ones (:mod:`ledger.cli.offline`): the checks that refuse nonsense before
anything is signed (roles, validity windows, a grant already in force), the
intents (a builder signs its record on top of the verified state it is given,
so a re-sync after ``409 stale-head`` resolves the intent again), and the
arguments that describe a grant or a revoke.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from .. import messages
from .. import records as rec
from ..credential_status import credential
from ..crypto import Signer
from ..errors import BadValidity, UnknownRole, UsageError, WritError
from ..fileio import read_capped
from ..records import EMPTY_HASH, Genesis, Grant, Reason, Revoke
from ..state import GrantInfo, LedgerState
from . import common
from .common import Builder, build_body, check_on_copy, parse_hex, refuse, say
from .main import EXIT_FAILED, EXIT_USAGE

# --- helpers -----------------------------------------------------------------------------


def last_seq(raws: list[bytes]) -> int:
    """The seq of the last of ``raws`` (records this command signed or read)."""
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


# --- what a grant may say (refused before anything is signed) ----------------------------


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


def check_grant_fields(args: argparse.Namespace) -> None:
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


# --- intents (builders) ------------------------------------------------------------------


def grant_builder(args: argparse.Namespace, signer: Signer, found: list[int] | None = None) -> Builder:
    """The grant; when the very same grant is already in force, no record (its seq goes to
    ``found``): a retried grant appends nothing."""
    subject, name = grant_subject(args)
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
            same = [g for g in state.grants_named(name) if not state.is_withdrawn(g.seq)]
            if same:
                say(
                    f"writ: warning: {len(same)} unrevoked grant(s) already named {name!r}"
                    f" (seq {', '.join(str(g.seq) for g in same)}); revoke --name will need a seq"
                )
            warned.append(True)
        body = build_body(lambda: Grant(state.size, state.root, now, subject, role, scope, name, nb, na))
        return [rec.sign(body, signer)]

    return build


def grant_subject(args: argparse.Namespace) -> tuple[bytes, str]:
    """The subject key and name of a grant, from whichever subject source the arguments give."""
    given = [x for x in (args.subject, args.request, getattr(args, "ssh_public_key", None)) if x is not None]
    if len(given) != 1:
        raise UsageError(
            "give exactly one of --subject HEX32, --request ENROLL_FILE and --ssh-public-key FILE"
        )
    if getattr(args, "ssh_public_key", None) is not None:
        return _ssh_subject(args)
    if args.request is not None:
        data = read_capped(args.request, messages.MAX_MESSAGE, what="enrollment request")
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
        read_capped(args.ssh_public_key, sshkey.MAX_LINE, what="SSH public key")
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
    active = [g for g in named if not state.is_withdrawn(g.seq)]
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


def revoker_args(args: argparse.Namespace) -> bool:
    if args.revoker_key is None:
        return False
    if common.has_key_source(args):
        raise UsageError("--revoker-key is a key source: give no other (--key, --pkcs11, --ssh-agent)")
    args.key = args.revoker_key
    return True


class NoSigner:
    """A stand-in key: building an intent with it checks the arguments (usage errors
    before any prompt or network) and never signs."""

    public_key = b"\x00" * 32

    def sign(self, message: bytes) -> bytes:
        raise AssertionError("not for signing")


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


def genesis_digest(args: argparse.Namespace) -> bytes | None:
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


# --- arguments ---------------------------------------------------------------------------


def add_grant_args(p: argparse.ArgumentParser) -> None:
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
        type=common.uint_arg,
        metavar="UNIX",
        help="valid from this UNIX time in seconds (0 or absent: at once)",
    )
    p.add_argument(
        "--not-after",
        type=common.uint_arg,
        metavar="UNIX",
        help="valid until this UNIX time in seconds, in the future (0 or absent: no expiry)",
    )


def add_revoke_args(p: argparse.ArgumentParser) -> None:
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


ANCHOR_HELP = "the ledger's anchor (default: $WRIT_ANCHOR, FILE.pub.json)"
MIRROR_HELP = "the verified mirror directory (default under $WRIT_HOME)"


def add_server(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument("--server", required=required, metavar="URL", help="the ledger server")
    p.add_argument("--anchor", metavar="HEX32", help=ANCHOR_HELP)
    p.add_argument("--mirror", metavar="DIR", help=MIRROR_HELP)
