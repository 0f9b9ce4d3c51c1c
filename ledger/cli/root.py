"""Root key commands: ``writ root init|recover``, ``writ rotate``.

Root custody follows the pre-rotation of docs/protocol.md, "Keys and roles": ``root init`` makes
the root *and* its successor; only SHA-256 of the successor's public key goes
into the genesis (``next_root_digest``), and the successor's private half
exists only as k-of-n SLIP-39 share sheets, never whole on disk. ``root
recover`` rebuilds it from k sheets and checks it against the committed
digest before anything else; ``rotate`` signs the rotate record with it and
commits, in the same record, to a fresh successor (new sheets). The offline
signer (``writ sign rotate``, :mod:`ledger.cli.offline`) reuses the successor
and rotate helpers here.

Public data about a key file lives next to it in ``FILE.pub.json``
(anchor, public key, pending successor digest): never a secret.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .. import records as rec
from ..crypto import SeedSigner, Signer, sha256
from ..errors import Declined, MissingSuccessor, UsageError, WritError
from ..fileio import create_private, read_capped
from ..records import Rotate
from ..redact import redact
from ..state import LedgerState
from . import common
from .common import (
    Client,
    add_key_source,
    has_key_source,
    kdf_cost,
    parse_hex,
    read_new_passphrase,
    read_secret,
    refuse,
    say,
    write_pub_json,
)
from .keys import KDF_COST_HELP, KDF_COSTS, add_new_passphrase

_CELL = re.compile(r"(\d{1,2})\.\s+([a-z]+)")


# --- shares -------------------------------------------------------------------


def read_share_file(path: str) -> str:
    """The mnemonic of a share sheet (``root init`` output) or of a file of bare words."""
    text = read_capped(path, 64 * 1024, what="share file").decode("utf-8", errors="replace")
    _head, sep, words_part = text.partition("\nWords")
    if sep:
        cells = sorted((int(n), w) for n, w in _CELL.findall(words_part.split("\n", 1)[-1]))
        if not cells or [n for n, _ in cells] != list(range(1, len(cells) + 1)):
            raise UsageError(f"the share sheet {path} has no complete numbered word list")
        return " ".join(w for _, w in cells)
    words = [w for w in re.split(r"\s+", text.strip().lower()) if w]
    if not words or not all(w.isalpha() for w in words):
        raise UsageError(f"{path} is neither a share sheet nor a list of share words")
    return " ".join(words)


@contextlib.contextmanager
def new_successor(
    args: argparse.Namespace,
    anchor_hex: str | None,
    *,
    may_be_committed: Callable[[], str | None] | None = None,
) -> Iterator[tuple[bytes | None, list[str]]]:
    """Make a successor key and write its share sheets (deleted again if the block fails).

    Yields (digest or None, sheet paths). The successor's seed is never written whole.
    ``may_be_committed`` is asked when the block fails: a text (how to confirm)
    means a record committing to this successor may be in the ledger, so the
    sheets are kept and the error says where they are."""
    from .. import signers

    _check_successor_flags(args)
    if args.shares is None:
        say(
            "writ: --no-successor: the next_root_digest is null, so a lost or stolen root can never be"
            " rotated away"
        )
        yield None, []
        return
    k, n = signers.parse_threshold(args.shares)
    if args.shares_out is None:
        raise UsageError("--shares K-of-N needs --shares-out DIR (one sheet per custodian)")
    out_dir = Path(args.shares_out)
    share_pass = b""
    if getattr(args, "share_passphrase_env", None):
        share_pass = read_secret(args.share_passphrase_env, "", what="share passphrase")
    paths = [out_dir / f"share-{i}-of-{n}.txt" for i in range(1, n + 1)]
    for p in paths:
        if p.exists():
            raise UsageError(f"refusing to overwrite the existing share sheet {p}")
    successor = SeedSigner.generate()
    digest = sha256(successor.public_key)
    mnemonics = signers.split_secret(successor.seed(), k, n, share_pass)
    del successor
    written: list[Path] = []
    try:
        try:
            out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise UsageError(f"cannot create the share directory {out_dir}: {exc.strerror}") from None
        for i, (p, m) in enumerate(zip(paths, mnemonics, strict=True), start=1):
            sheet = signers.share_sheet(m, i, k, n, anchor_hex or "0" * 64, digest.hex())
            create_private(p, sheet.encode("utf-8"), mode=0o600)
            written.append(p)
        yield digest, [str(p) for p in written]
    except BaseException as exc:
        confirm = may_be_committed() if may_be_committed is not None and written else None
        if confirm is None:
            for p in written:  # the ledger is known not to hold the digest: nothing depends on them
                with contextlib.suppress(OSError):
                    p.unlink()
            raise
        kept = (
            f"the new successor's {len(written)} share sheets are KEPT in {out_dir}"
            f" (the ledger may already commit to them): {confirm}"
        )
        say(f"writ: {kept}")
        if isinstance(exc, WritError):
            exc.message = f"{exc.message}; {kept}"
            exc.detail["shares_kept"] = [str(p) for p in written]
            exc.detail["next_root_digest"] = digest.hex()
        raise


def add_shares_out(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--shares",
        metavar="K-of-N",
        help="split the new successor key into K-of-N SLIP-39 shares (this or --no-successor is required)",
    )
    p.add_argument("--shares-out", metavar="DIR", help="where to write one share sheet per custodian (0600)")
    p.add_argument("--share-passphrase-env", metavar="VAR", help="optional SLIP-39 passphrase for the shares")
    p.add_argument(
        "--no-successor",
        action="store_true",
        help="commit to no successor (next_root_digest null): the root can then never be rotated",
    )


def _check_successor_flags(args: argparse.Namespace) -> None:
    """The successor choice is explicit, and its share directory usable, before anything is written."""
    from .. import signers

    if args.no_successor and args.shares is not None:
        raise UsageError("--no-successor and --shares exclude each other")
    if not args.no_successor and args.shares is None:
        raise MissingSuccessor(
            "choose the successor root: --shares K-of-N --shares-out DIR (SLIP-39 sheets, advised) or"
            " --no-successor (a root that can never be rotated); nothing was written"
        )
    if args.shares is None:
        if args.shares_out is not None:
            raise UsageError("--shares-out goes with --shares K-of-N")
        return
    signers.parse_threshold(args.shares)
    if args.shares_out is None:
        raise UsageError("--shares K-of-N needs --shares-out DIR (one sheet per custodian)")
    _check_directory(Path(args.shares_out), "--shares-out")


def _check_directory(path: Path, flag: str) -> None:
    """``path`` is, or can become, a writable directory (checked before any key is made)."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        what = "a directory" if probe == path else f"a directory ({probe} is a file)"
        raise UsageError(f"{flag} {path} is not {what}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: {probe} is not writable")


# --- root init ------------------------------------------------------------------


def cmd_root_init(args: argparse.Namespace) -> dict[str, Any]:
    from .. import signers

    _check_successor_flags(args)
    out = Path(args.out)
    cost = kdf_cost(args.cost)
    for p in (out, common.pub_json_path(out)):
        if p.exists():
            raise UsageError(f"refusing to overwrite the existing file {p}")
    passphrase = read_new_passphrase(args, out)
    root = SeedSigner.generate()
    anchor = root.public_key
    signers.write_key_file(out, root, passphrase, cost=cost, label="writ root")
    try:
        with new_successor(args, anchor.hex()) as (digest, sheets):
            write_pub_json(
                out,
                {
                    "format": "writ-key-public/v1",
                    "role": "root",
                    "anchor": anchor.hex(),
                    "public_key": anchor.hex(),
                    "next_root_digest": digest.hex() if digest else None,
                    "shares": args.shares,
                },
            )
    except BaseException:
        with contextlib.suppress(OSError):
            out.unlink()
        raise
    if sheets:
        say(f"writ: root key written to {out}; {len(sheets)} successor share sheets in {args.shares_out}")
        say("writ: hand each sheet to its custodian, then delete the files from this machine")
    return {
        "anchor": anchor.hex(),
        "next_root_digest": digest.hex() if digest else None,
        "key_file": str(out),
        "shares": sheets,
    }


# --- root recover ------------------------------------------------------------------


def cmd_root_recover(args: argparse.Namespace) -> dict[str, Any]:
    from .. import signers

    expected = parse_hex(args.expect_digest, 32, "--expect-digest")
    anchor = parse_hex(args.anchor, 32, "--anchor") if args.anchor else None
    to_token = args.pkcs11 is not None
    if to_token:
        if args.out is not None:
            raise UsageError("--out and --pkcs11 exclude each other (the key goes to one place)")
        if not args.label:
            raise UsageError("--pkcs11 needs --label NAME for the key object on the token")
    else:
        if args.out is None:
            raise UsageError("--out FILE is required (or --pkcs11 URI --label NAME)")
        for p in (Path(args.out), common.pub_json_path(args.out)):
            if p.exists():
                raise UsageError(f"refusing to overwrite the existing file {p}")
    mnemonics = [read_share_file(p) for p in args.shares]
    share_pass = b""
    if args.share_passphrase_env:
        share_pass = read_secret(args.share_passphrase_env, "", what="share passphrase")
    new_pass = None if to_token else read_new_passphrase(args, args.out)  # a weak one: refused first
    signer = signers.recover_successor(mnemonics, share_pass, expected)  # checks the digest first
    public = signer.public_key
    if to_token:
        pin = read_secret(args.pin_env, "Token PIN: ", what="PIN").decode("utf-8") if args.pin_env else None
        signers.import_to_token(args.pkcs11, pin, signer.seed(), args.label, pkcs11_module=args.pkcs11_module)
        where = {"pkcs11": redact(args.pkcs11), "label": args.label}  # never the PIN of a pin-value
    else:
        out = str(args.out)
        assert new_pass is not None
        signers.write_key_file(out, signer, new_pass, cost=kdf_cost(args.cost), label="writ root successor")
        write_pub_json(
            out,
            {
                "format": "writ-key-public/v1",
                "role": "root-successor",
                "anchor": anchor.hex() if anchor else None,
                "public_key": public.hex(),
                "next_root_digest": None,
                "shares": None,
            },
        )
        where = {"key_file": args.out}
    say(
        "writ: the successor key matches the committed digest;"
        " next: writ rotate --server URL --successor-key ..."
    )
    return {"public_key": public.hex(), "digest": expected.hex(), **where}


# --- rotate ---------------------------------------------------------------------


class RotateSigner:
    """The successor, from a key source or from shares; checked against the pending digest."""

    def __init__(self, args: argparse.Namespace, stack: contextlib.ExitStack) -> None:
        self.args = args
        self.stack = stack
        self._signer: Signer | None = None

    def get(self, pending: bytes) -> Signer:
        from .. import signers

        if self._signer is None:
            a = self.args
            if a.successor_shares:
                mnemonics = [read_share_file(p) for p in a.successor_shares]
                share_pass = b""
                if a.share_passphrase_env_old:
                    share_pass = read_secret(a.share_passphrase_env_old, "", what="share passphrase")
                self._signer = signers.recover_successor(mnemonics, share_pass, pending)
            else:
                self._signer = self.stack.enter_context(common.open_key(a))
        if sha256(self._signer.public_key) != pending:
            refuse(
                "unauthorized-signer",
                "this key is not the committed successor root (SHA-256 of its public key is not the"
                f" ledger's next_root_digest {pending.hex()[:16]}…)",
            )
        return self._signer


def rotate_builder(args: argparse.Namespace, succ: RotateSigner, new_digest: bytes | None) -> common.Builder:
    def build(state: LedgerState, now: int) -> list[bytes]:
        pending = state.pending_digest
        if pending is None:
            refuse(
                "unauthorized-signer",
                "the ledger commits to no successor root (next_root_digest is null): no rotation is possible",
            )
        signer = succ.get(pending)
        body = common.build_body(lambda: Rotate(state.size, state.root, now, signer.public_key, new_digest))
        return [rec.sign(body, signer)]

    return build


def check_rotate_source(args: argparse.Namespace) -> None:
    _check_successor_flags(args)
    if args.successor_shares and has_key_source(args):
        raise UsageError("give the successor as shares (--successor-shares) or as a key, not both")
    if not args.successor_shares and not has_key_source(args):
        raise UsageError(
            "give the successor: --successor-key FILE, --successor-shares FILE..., --pkcs11 or --ssh-agent"
        )
    if args.successor_shares and args.out_key is None:
        raise UsageError(
            "rotating from shares needs --out FILE to keep the new root key (sealed by a passphrase)"
        )


def save_recovered(args: argparse.Namespace, succ: RotateSigner, anchor: bytes, digest: bytes | None) -> None:
    from .. import signers

    s = succ._signer
    if not isinstance(s, SeedSigner) or args.out_key is None:
        return
    passphrase = read_new_passphrase(args, args.out_key)
    signers.write_key_file(args.out_key, s, passphrase, cost=kdf_cost(args.cost), label="writ root")
    _write_root_pub(args.out_key, anchor, s.public_key, digest, args.shares)


def _write_root_pub(
    key_file: str, anchor: bytes, public: bytes, digest: bytes | None, shares: str | None
) -> None:
    write_pub_json(
        key_file,
        {
            "format": "writ-key-public/v1",
            "role": "root",
            "anchor": anchor.hex(),
            "public_key": public.hex(),
            "next_root_digest": digest.hex() if digest else None,
            "shares": shares,
        },
    )


class _WatchedClient(Client):
    """The rotate's client: remembers whether a POST may have appended its records.

    A POST that the server refused with a 4xx answer appended nothing (batches
    are all or nothing); any other failure (no answer, a 5xx, an unreadable
    answer) may have come after the commit."""

    def __init__(self, server: str) -> None:
        super().__init__(server)
        self.uncertain: list[bytes] | None = None

    def post_records(self, raws: list[bytes]) -> dict[str, Any]:
        try:
            return super().post_records(raws)
        except WritError as exc:
            status = exc.detail.get("http_status")
            if not (type(status) is int and 400 <= status < 500):
                self.uncertain = raws
            raise
        except BaseException:
            self.uncertain = raws
            raise


def _confirm_rotate(client: _WatchedClient, anchor: bytes) -> Callable[[], str | None]:
    """How to confirm an uncertain rotate, or None when no POST may have appended it."""

    def confirm() -> str | None:
        if client.uncertain is None:
            return None
        body = rec.decode_unverified(client.uncertain[-1]).body
        to = f" to {body.new_root.hex()[:16]}…" if isinstance(body, Rotate) else ""
        return (
            f"confirm with `writ log --server {client.shown} --anchor {anchor.hex()} --kind rotate`:"
            f" if seq {body.seq} is a rotate{to}, the rotate was appended and"
            " these sheets are the only copy of the next successor (hand them to the custodians);"
            " if it is not, delete them and run `writ rotate` again"
        )

    return confirm


def cmd_rotate(args: argparse.Namespace) -> dict[str, Any]:
    check_rotate_source(args)
    if args.out_key is not None:
        for p in (Path(args.out_key), common.pub_json_path(args.out_key)):
            if p.exists():
                raise UsageError(f"refusing to overwrite the existing file {p}")
    with contextlib.ExitStack() as stack:
        client = _WatchedClient(args.server)
        stack.enter_context(client)
        mirror = common.synced_mirror(stack, args, client)
        anchor = mirror.anchor
        succ = RotateSigner(args, stack)
        pending = mirror.state.pending_digest
        if pending is None:
            refuse(
                "unauthorized-signer",
                "the ledger commits to no successor root (next_root_digest is null): no rotation is possible",
            )
        succ.get(pending)  # open and check the successor before writing any new sheet
        with new_successor(args, anchor.hex(), may_be_committed=_confirm_rotate(client, anchor)) as (
            digest,
            sheets,
        ):
            if args.successor_shares:
                save_recovered(args, succ, anchor, digest)
            try:
                pushed = common.push_intent(
                    mirror, client, rotate_builder(args, succ, digest), sync_first=False, ask=not args.yes
                )
            except Declined:  # known not signed: the new key file of this run goes with the sheets
                if args.successor_shares and args.out_key is not None:
                    for p in (Path(args.out_key), common.pub_json_path(args.out_key)):
                        with contextlib.suppress(OSError):
                            p.unlink()
                raise
        signer = succ.get(pending)
        if args.key is not None:
            _write_root_pub(args.key, anchor, signer.public_key, digest, args.shares)
        body = rec.decode_unverified(pushed.records[-1]).body
        return {
            "seq": body.seq,
            "new_root": signer.public_key.hex(),
            "next_root_digest": digest.hex() if digest else None,
            "shares": sheets,
            "size": pushed.answer.get("size"),
        }
    raise AssertionError("unreachable")  # pragma: no cover


# --- registration -------------------------------------------------------------------


def add_successor_source(p: argparse.ArgumentParser) -> None:
    """Where the committed successor comes from (rotate, sign rotate): a key source or k sheets."""
    add_key_source(p, key_flags=("--successor-key", "--key"))
    p.add_argument(
        "--successor-shares", nargs="+", metavar="FILE", help="rebuild the successor from k sheets"
    )
    p.add_argument(
        "--successor-share-passphrase-env",
        dest="share_passphrase_env_old",
        metavar="VAR",
        help="SLIP-39 passphrase of the successor's shares",
    )


def register(sub: Any) -> None:
    root = sub.add_parser("root", help="the root key: init, recover")
    rs = root.add_subparsers(dest="root_command", metavar="COMMAND")
    common.needs_subcommand(root, "init, recover")

    p = rs.add_parser("init", help="generate the root key and its successor (as SLIP-39 shares)")
    p.add_argument("--out", required=True, metavar="FILE", help="the new root key file (0600)")
    add_new_passphrase(p)
    add_shares_out(p)
    p.set_defaults(handler=cmd_root_init)

    p = rs.add_parser("recover", help="rebuild the successor root key from k share sheets")
    p.add_argument(
        "--shares", nargs="+", required=True, metavar="FILE", help="share sheets (or files of words)"
    )
    p.add_argument("--expect-digest", required=True, metavar="HEX32", help="the committed next_root_digest")
    p.add_argument("--out", metavar="FILE", help="write the recovered key to this new key file")
    add_new_passphrase(p)
    p.add_argument(
        "--share-passphrase-env", metavar="VAR", help="the SLIP-39 passphrase, if the shares have one"
    )
    p.add_argument("--anchor", metavar="HEX32", help="the ledger's anchor (recorded in FILE.pub.json)")
    p.add_argument("--pkcs11", metavar="URI", help="import the recovered key to this token instead of a file")
    p.add_argument("--pin-env", metavar="VAR", help="environment variable holding the token PIN")
    p.add_argument("--pkcs11-module", metavar="PATH", help="the PKCS#11 module (default: SoftHSM2)")
    p.add_argument("--label", metavar="NAME", help="the token object's label")
    p.set_defaults(handler=cmd_root_recover)

    p = sub.add_parser("rotate", help="hand the root to its committed successor (and commit to a new one)")
    p.add_argument("--server", required=True, metavar="URL", help="the ledger server")
    p.add_argument(
        "--anchor", metavar="HEX32", help="the ledger's anchor (default: $WRIT_ANCHOR, FILE.pub.json)"
    )
    p.add_argument("--mirror", metavar="DIR", help="the verified mirror directory (default under $WRIT_HOME)")
    add_successor_source(p)
    p.add_argument(
        "--out",
        "--new-key-out",
        dest="out_key",
        metavar="FILE",
        help="with --successor-shares: keep the new root in this new key file (its passphrase from"
        " --passphrase-env)",
    )
    p.add_argument("--cost", choices=KDF_COSTS, help=KDF_COST_HELP)
    add_shares_out(p)
    p.set_defaults(handler=cmd_rotate)
