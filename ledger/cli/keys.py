"""Non-root key commands: ``writ key init|public|import-token``, and the flags
of every command that makes a new key file (its passphrase and argon2id cost).

The root key, its successor and ``writ rotate`` are in :mod:`ledger.cli.root`.
Public data about a key file lives next to it in ``FILE.pub.json``
(anchor, public key, pending successor digest): never a secret.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .. import records as rec
from ..crypto import SeedSigner
from ..errors import UsageError
from ..redact import redact
from . import common
from .common import kdf_cost, parse_hex, read_new_passphrase, read_pub_json, read_secret, write_pub_json

__all__ = ["KDF_COSTS", "KDF_COST_HELP", "add_new_passphrase", "register"]


KDF_COSTS = ("interactive", "moderate", "sensitive")
KDF_COST_HELP = "argon2id cost of the new key file (default: $WRIT_KDF_COST, else moderate)"


def add_new_passphrase(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--passphrase-env",
        metavar="VAR",
        help="environment variable holding the new key file's passphrase (at least 8 characters;"
        " default: ask twice at the terminal)",
    )
    p.add_argument(
        "--generate-passphrase",
        action="store_true",
        help="make a six-word passphrase and show it once on the terminal (never stored or logged)",
    )
    p.add_argument("--cost", choices=KDF_COSTS, help=KDF_COST_HELP)


# --- key commands -------------------------------------------------------------------


def cmd_key_init(args: argparse.Namespace) -> dict[str, Any]:
    from .. import signers

    out = Path(args.out)
    if out.exists():
        raise UsageError(f"refusing to overwrite the existing file {out}")
    if args.role is not None and not rec.ROLE_PATTERN.fullmatch(args.role):
        raise UsageError("--role must match ^[a-z][a-z0-9-]{0,31}$")
    passphrase = read_new_passphrase(args, out)
    signer = SeedSigner.generate()
    label = f"writ {args.role} key" if args.role else "writ key"
    signers.write_key_file(out, signer, passphrase, cost=kdf_cost(args.cost), label=label)
    anchor = parse_hex(args.anchor, 32, "--anchor").hex() if args.anchor else None
    doc = {"format": "writ-key-public/v1", "role": args.role, "public_key": signer.public_key.hex()}
    if anchor is not None:
        doc["anchor"] = anchor  # found locally by later commands (the revoker's laptop)
    write_pub_json(out, doc)
    return {"public_key": signer.public_key.hex(), "key_file": str(out), "role": args.role}


def cmd_key_public(args: argparse.Namespace) -> dict[str, Any]:
    from .. import signers

    public = signers.read_public_key(args.file)
    doc = read_pub_json(args.file) or {}
    out: dict[str, Any] = {"public_key": public.hex(), "ssh_fingerprint": signers.fingerprint(public)}
    for k in ("anchor", "next_root_digest", "role"):
        if k in doc:
            out[k] = doc[k]
    return out


def cmd_key_import_token(args: argparse.Namespace) -> dict[str, Any]:
    from .. import signers

    passphrase = read_secret(args.passphrase_env, f"Passphrase for {args.key}: ")
    signer = signers.load_key_file(args.key, passphrase)
    pin = read_secret(args.pin_env, "Token PIN: ", what="PIN").decode("utf-8") if args.pin_env else None
    public = signers.import_to_token(
        args.pkcs11, pin, signer.seed(), args.label, pkcs11_module=args.pkcs11_module
    )
    uri = args.pkcs11.split("?", 1)[0]
    obj = f"{uri};object={args.label}" if "object=" not in uri else uri
    return {"public_key": public.hex(), "pkcs11": redact(obj)}


# --- registration -------------------------------------------------------------------


def register(sub: Any) -> None:
    key = sub.add_parser("key", help="non-root keys: init, public, import-token")
    ks = key.add_subparsers(dest="key_command", metavar="COMMAND")
    common.needs_subcommand(key, "init, public, import-token")
    p = ks.add_parser("init", help="generate a key file (a revoker, an operator...)")
    p.add_argument("--out", required=True, metavar="FILE", help="the new key file (0600)")
    add_new_passphrase(p)
    p.add_argument("--role", metavar="ROLE", help="what the key is for (recorded in its label)")
    p.add_argument("--anchor", metavar="HEX32", help="the ledger's anchor, kept in FILE.pub.json for later")
    p.set_defaults(handler=cmd_key_init)
    p = ks.add_parser("public", help="print a key file's public key (no passphrase needed)")
    p.add_argument("file", metavar="FILE", help="the key file")
    p.set_defaults(handler=cmd_key_public)
    p = ks.add_parser("import-token", help="put a key file's key on a PKCS#11 token (non-extractable)")
    p.add_argument("--key", required=True, metavar="FILE", help="the key file to import")
    p.add_argument(
        "--passphrase-env", metavar="VAR", help="environment variable holding the key file's passphrase"
    )
    p.add_argument("--pkcs11", required=True, metavar="URI", help="the token, e.g. pkcs11:token=writ")
    p.add_argument("--pin-env", metavar="VAR", help="environment variable holding the token PIN")
    p.add_argument("--pkcs11-module", metavar="PATH", help="the PKCS#11 module (default: SoftHSM2)")
    p.add_argument("--label", required=True, metavar="NAME", help="the token object's label")
    p.set_defaults(handler=cmd_key_import_token)
