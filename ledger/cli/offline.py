"""Commands for offline machines and sites: ``writ sign``, ``writ bundle export``,
``writ mirror import|status``.

``writ sign`` signs on top of a verified mirror (``--offline``: one built from
a bundle, no network; ``--server``: synced first) and only writes a records
file, which ``writ push`` carries to the server later. A bundle is the
verified records and a checkpoint, for a mirror on an air-gapped machine or
for the devices of a site.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path
from typing import Any

from .. import messages
from .. import records as rec
from ..errors import UsageError, WritError
from ..fileio import read_capped, write_atomic
from ..state import LedgerState
from . import common, keys, root
from .common import Client, add_key_source, check_on_copy, parse_hex, refuse, say
from .intents import (
    ANCHOR_HELP,
    MIRROR_HELP,
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

__all__ = ["cmd_bundle_export", "cmd_mirror_import", "cmd_mirror_status", "cmd_sign", "register"]


# --- bundles and offline mirrors ------------------------------------------------------


def cmd_bundle_export(args: argparse.Namespace) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(Client(args.server))
        mirror = common.synced_mirror(stack, args, client)
        if mirror.view is None:
            refuse("untrusted-checkpoint", "the ledger has no verified checkpoint yet (no log key granted)")
        start = args.start or 0
        if start > mirror.state.size:
            raise UsageError(f"--start {start} is beyond the ledger's {mirror.state.size} records")
        raws = mirror.read_records(start)
        data = messages.make_bundle(start, raws, mirror.view.note)
        write_atomic(Path(args.out), data, mode=0o644)
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

    data = read_capped(args.bundle, messages.MAX_BUNDLE_RECORDS * 700 + 65536, what="bundle")
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


# --- sign (offline, or online without pushing) -------------------------------------------


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
        grant_subject(args)
        check_grant_fields(args)
    elif kind == "revoke":
        revoker = revoker_args(args)
        revoke_builder(args, NoSigner(), revoker=revoker)
    else:
        root.check_rotate_source(args)
    with contextlib.ExitStack() as stack:
        client = None if args.offline else stack.enter_context(Client(args.server))
        if args.offline:
            from ..mirror import Mirror

            anchor = common.default_anchor(args)
            mirror = stack.enter_context(Mirror.open(Path(args.mirror), anchor, create=False))
        else:
            assert client is not None
            mirror = common.synced_mirror(stack, args, client)
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
            succ = root.RotateSigner(args, stack)
            pending = state.pending_digest
            if pending is None:
                refuse(
                    "unauthorized-signer", "the ledger commits to no successor root: no rotation is possible"
                )
            succ.get(pending)
            with root.new_successor(args, mirror.anchor.hex()) as (digest, sheets):
                if args.successor_shares:
                    root.save_recovered(args, succ, mirror.anchor, digest)
                raws = root.rotate_builder(args, succ, digest)(state, common.now_for(state))
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
        return {"seq": last_seq(raws), "out": args.out, "records": len(batch) + len(raws), **extra}
    raise AssertionError("unreachable")  # pragma: no cover


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
        digest = genesis_digest(args)
        state = LedgerState(signer.public_key, origin=origin)
        raws = genesis_builder(origin, digest, log_key, signer)(state, common.now_for(state))
        check_on_copy(state, raws)
        common.confirm(state, raws, f"write to {args.out}", ask=not args.yes)
        common.write_records_file(args.out, raws)
        _carry_hint(args.out)
        return {
            "seq": last_seq(raws),
            "out": args.out,
            "records": len(raws),
            "anchor": signer.public_key.hex(),
            "log_public_key": log_key.hex(),
            "next_root_digest": digest.hex() if digest else None,
        }


def _carry_hint(out: str) -> None:
    say(f"writ: signed; carry {out} to a connected machine and run: writ push --server URL {out}")


# --- registration -------------------------------------------------------------------


def register(sub: Any) -> None:
    """``writ bundle export``, ``writ mirror import|status``, ``writ sign``."""
    p = sub.add_parser("bundle", help="sync bundles for offline machines and device sites")
    bs = p.add_subparsers(dest="bundle_command", metavar="COMMAND")
    common.needs_subcommand(p, "export")
    e = bs.add_parser("export", help="write a verified bundle (records + checkpoint)")
    add_server(e)
    e.add_argument(
        "--start", type=common.uint_arg, default=0, metavar="N", help="the first record to include"
    )
    e.add_argument("--out", required=True, metavar="FILE", help="the bundle file to write")
    e.set_defaults(handler=cmd_bundle_export)

    p = sub.add_parser("mirror", help="offline mirrors")
    ms = p.add_subparsers(dest="mirror_command", metavar="COMMAND")
    common.needs_subcommand(p, "import, status")
    i = ms.add_parser("import", help="build or extend an offline mirror from a bundle, fully verified")
    i.add_argument("bundle", metavar="BUNDLE", help="the bundle file (from writ bundle export)")
    i.add_argument("--anchor", metavar="HEX32", help=ANCHOR_HELP)
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
    p.add_argument("--anchor", metavar="HEX32", help=ANCHOR_HELP)
    p.add_argument("--mirror", metavar="DIR", help=MIRROR_HELP)
    p.add_argument("--out", metavar="FILE", help="the records file (extended if it exists)")
    ss = p.add_subparsers(dest="sign_kind", metavar="KIND")
    late = argparse.ArgumentParser(add_help=False)
    late.add_argument(
        "--out", default=argparse.SUPPRESS, metavar="FILE", help="the records file (extended if it exists)"
    )
    late.add_argument("--mirror", default=argparse.SUPPRESS, metavar="DIR", help=MIRROR_HELP)
    late.add_argument("--anchor", default=argparse.SUPPRESS, metavar="HEX32", help=ANCHOR_HELP)
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
    add_grant_args(g)
    add_key_source(g)
    r = ss.add_parser("revoke", parents=[late], help="sign a revoke")
    add_revoke_args(r)
    add_key_source(r)
    t = ss.add_parser("rotate", parents=[late], help="sign a rotate with the successor")
    root.add_successor_source(t)
    t.add_argument("--cost", choices=keys.KDF_COSTS, help=keys.KDF_COST_HELP)
    t.add_argument(
        "--new-key-out",
        dest="out_key",
        metavar="FILE",
        help="with --successor-shares: keep the new root here",
    )
    root.add_shares_out(t)
    p.set_defaults(handler=cmd_sign)
