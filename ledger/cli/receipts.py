"""``writ receipts import --server URL FILE...``: receipts carried from sites without a network.

A device at a USB-only site syncs from a bundle and writes its signed receipt
(the exact receipt message bytes of docs/protocol.md, section "HTTP") beside
the bundle. Carried back, those files are posted here to ``POST /v1/receipts``
one by one, so the fleet view counts those devices as having applied the
revocations they did apply, instead of listing them as stragglers forever.

The server checks each receipt (an unrevoked device grant's signature, a head
of this ledger); this command only refuses a file that is not a receipt at
all. It prints one JSON summary; a file that fails is reported with its error
and the others go on; the exit status is non-zero when any failed.
"""

from __future__ import annotations

import argparse
from typing import Any

from .. import messages
from ..errors import TransportError, WritError
from ..fileio import read_capped
from . import common
from .common import Client, say
from .main import CommandFailed, exit_code


def _post(client: Client, raw: bytes) -> dict[str, Any]:
    _, _, body = client.request(
        "POST",
        "/v1/receipts",
        content=raw,
        headers={"Content-Type": "application/msgpack", "Accept": "application/json"},
        cap=65536,
    )
    doc = common.parse_json(body, "/v1/receipts")
    return doc if isinstance(doc, dict) else {}


def cmd_receipts_import(args: argparse.Namespace) -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    first_error: WritError | None = None
    with Client(args.server) as client:
        for path in args.files:
            if isinstance(first_error, TransportError):  # the server is gone: do not wait for each file
                results.append(
                    {"file": path, "accepted": False, "error": first_error.type, "message": "not sent"}
                )
                continue
            try:
                raw = read_capped(path, messages.MAX_MESSAGE, what="receipt")
                receipt = messages.parse_receipt(raw)  # a file that is not a receipt is not sent
                answer = _post(client, raw)
            except WritError as exc:
                if first_error is None or isinstance(exc, TransportError):
                    first_error = exc
                say(f"writ: {path}: {exc.message}")
                results.append({"file": path, "accepted": False, "error": exc.type, "message": exc.message})
                continue
            results.append(
                {
                    "file": path,
                    "accepted": True,
                    "device_grant_seq": receipt.device_grant_seq,
                    "size": answer.get("size", receipt.size),
                }
            )
    imported = sum(1 for r in results if r["accepted"])
    summary: dict[str, Any] = {"imported": imported, "failed": len(results) - imported, "receipts": results}
    if first_error is not None:
        message = (
            f"{len(results) - imported} of {len(results)} receipts were not imported: {first_error.message}"
        )
        say(f"writ: {message}")
        raise CommandFailed(
            {"error": first_error.type, "message": message, **summary}, exit_code(first_error)
        )
    say(f"writ: {imported} receipts imported")
    return summary


def register(sub: Any) -> None:
    p = sub.add_parser(
        "receipts",
        help="device receipts carried from offline sites: import",
        description="Carry the signed receipts of devices synced from a bundle (USB) to the server.",
    )
    rs = p.add_subparsers(dest="receipts_command", metavar="COMMAND")
    common.needs_subcommand(p, "import")
    i = rs.add_parser(
        "import",
        help="post receipt files (written by devices synced from a bundle)",
        description="Post each receipt file (written beside a bundle by `device sync --bundle`) to "
        "POST /v1/receipts, so the integrator sees how far a revocation spread at USB-only sites.",
    )
    i.add_argument("--server", required=True, metavar="URL", help="the ledger server's base URL")
    i.add_argument(
        "files", nargs="+", metavar="FILE", help="receipt files (the signed receipt message bytes)"
    )
    i.set_defaults(handler=cmd_receipts_import)
