"""``writ status NAME|SEQ|KEY``: a credential, its revocation, and how far it has spread.

Read from the verified mirror (synced first) and, for the devices, from the
server's fleet report (``GET /v1/fleet``); a server without one still gets
the credential, with a warning.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from typing import Any

from .. import records as rec
from ..errors import WritError
from . import common
from .common import Client, refuse, say
from .intents import add_server, credential_json
from .main import EXIT_USAGE

__all__ = ["cmd_status", "register"]


def cmd_status(args: argparse.Namespace) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(Client(args.server))
        mirror = common.synced_mirror(stack, args, client)
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


def register(sub: Any) -> None:
    """``writ status``."""
    p = sub.add_parser("status", help="a credential, its revocation, and how far it has spread")
    p.add_argument("query", metavar="NAME|SEQ", help="a grant's name, seq or subject key (hex)")
    add_server(p)
    p.set_defaults(handler=cmd_status)
