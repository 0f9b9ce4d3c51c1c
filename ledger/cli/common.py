"""What every integrator command shares: argument glue (key sources, secrets,
hex, files), the verified mirror sync, and the hooks of the writer engine.

Nothing here decides whether a record is valid: that is
:meth:`ledger.state.LedgerState.apply`, run on a copy of the verified mirror
before anything is pushed. The HTTP client is :mod:`ledger.client` (the one
fetch layer) and the sign-push-confirm loop :mod:`ledger.writer` (the one
writer engine); this module passes them the CLI's hooks (the terminal
prompt, Ctrl-C, messages, exit codes).

Tests point the HTTP client at an in-process app by setting
:data:`client_factory` (a callable ``base_url -> httpx.Client``, for example a
Starlette ``TestClient``); the CLI then never closes that client.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NoReturn, cast

import httpx

from .. import records as rec
from .. import writer
from ..client import PAGE as PAGE
from ..client import Client as HttpClient
from ..client import normalise_server as normalise_server
from ..client import parse_json as parse_json
from ..crypto import Signer
from ..describe import describe as describe
from ..describe import utc_iso as utc_iso
from ..encoding import MAX_RECORD, pack_records, unpack_records
from ..errors import BadMessage, Declined, RecordRejected, UsageError, WeakPassphrase, WritError
from ..fileio import read_capped, write_atomic
from ..progress import stage
from ..redact import redact
from ..signers.file import MIN_PASSPHRASE
from ..state import LedgerState
from ..writer import Builder as Builder
from ..writer import Pushed as Pushed
from ..writer import Writer
from ..writer import now_for as now_for
from .main import EXIT_FAILED, EXIT_USAGE, CommandFailed, hold_interrupts

if TYPE_CHECKING:
    from ..mirror import Mirror, SyncResult

Cost = Literal["interactive", "moderate", "sensitive"]

#: a hook for tests: ``base_url -> httpx.Client``; the CLI never closes what it returns.
client_factory: Callable[[str], httpx.Client] | None = None

#: a sync of fewer new records than this is quick: no progress line
SYNC_QUIET = 2 * PAGE

_HEX = re.compile(r"[0-9a-fA-F]*")


# --- human output -----------------------------------------------------------


def stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def say(message: str) -> None:
    """One plain line of explanation on stderr (always: warnings matter; never a secret of a URI)."""
    sys.stderr.write(redact(message.rstrip("\n")) + "\n")
    sys.stderr.flush()


def console() -> Any:
    """A rich console on stderr when stderr is a terminal, else None."""
    if not stderr_is_tty():
        return None
    from rich.console import Console

    return Console(stderr=True)


def refuse(error: str, message: str, code: int = EXIT_FAILED, **detail: Any) -> NoReturn:
    """Print one line on stderr and exit ``code`` with ``{"error", "message", ...}``."""
    say(f"writ: {message}")
    payload: dict[str, Any] = {"error": error, "message": message}
    payload.update(detail)
    raise CommandFailed(payload, code)


def refuse_from(exc: WritError, code: int = EXIT_FAILED, prefix: str = "") -> NoReturn:
    """Re-raise a rule's rejection of *our own* record as a refusal (not a verification failure)."""
    out = exc.to_json()
    message = (prefix + exc.message) if prefix else exc.message
    out["message"] = message
    say(f"writ: {message}")
    raise CommandFailed(out, code)


def needs_subcommand(parser: argparse.ArgumentParser, choices: str) -> None:
    """Make ``writ GROUP`` without a subcommand a usage error naming the choices."""

    def handler(args: argparse.Namespace) -> dict[str, Any]:
        raise UsageError(f"{parser.prog} needs a command: {choices}")

    parser.set_defaults(handler=handler)


# --- hex and secrets --------------------------------------------------------


def uint_arg(text: str) -> int:
    """An argparse ``type``: an unsigned decimal integer (ASCII digits only)."""
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not an unsigned integer")
    return int(text)


def parse_hex(text: str | None, size: int, what: str) -> bytes:
    """``size`` bytes of hex, or a :class:`UsageError` naming ``what``."""
    if text is None:
        raise UsageError(f"{what} is required ({size * 2} hex digits)")
    t = text.strip()
    if t.startswith(("0x", "0X")):
        t = t[2:]
    if not _HEX.fullmatch(t) or len(t) % 2:
        raise UsageError(f"{what} is not hex")
    if len(t) != 2 * size:
        raise UsageError(f"{what} must be {size} bytes ({size * 2} hex digits), not {len(t) // 2}")
    return bytes.fromhex(t)


def read_secret(
    env_var: str | None, prompt: str, *, what: str = "passphrase", confirm: bool = False
) -> bytes:
    """A secret from the environment variable named ``env_var``, or a no-echo
    prompt when stdin is a terminal. Never echoed, never in an error."""
    if env_var is not None:
        value = os.environ.get(env_var)
        if value is None:
            raise UsageError(f"the environment variable {env_var} (the {what}) is not set")
        if not value:
            raise UsageError(f"the environment variable {env_var} (the {what}) is empty")
        return value.encode("utf-8")
    try:
        interactive = sys.stdin.isatty()
    except (AttributeError, ValueError):
        interactive = False
    if not interactive:
        raise UsageError(f"no {what}: give it through an environment variable (--{_flag(what)}-env VAR)")
    try:
        first = getpass.getpass(prompt)
        if confirm and getpass.getpass("Again: ") != first:
            raise UsageError(f"the two {what}s differ")
    except EOFError:
        raise UsageError(f"no {what} was typed") from None
    if not first:
        raise UsageError(f"an empty {what} is refused")
    return first.encode("utf-8")


def read_new_passphrase(args: argparse.Namespace, out: object) -> bytes:
    """The passphrase of a NEW key file: from --passphrase-env / a prompt (typed twice), or
    generated (--generate-passphrase) and shown once on the terminal. At least
    :data:`~ledger.signers.file.MIN_PASSPHRASE` characters."""
    if getattr(args, "generate_passphrase", False):
        if getattr(args, "passphrase_env", None) is not None:
            raise UsageError("--generate-passphrase and --passphrase-env exclude each other")
        return _generated_passphrase(out)
    passphrase = read_secret(args.passphrase_env, f"New passphrase for {out}: ", confirm=True)
    if len(passphrase.decode("utf-8", errors="replace")) < MIN_PASSPHRASE:
        raise WeakPassphrase(
            f"a key file's passphrase needs at least {MIN_PASSPHRASE} characters; or let writ make one:"
            " --generate-passphrase (six words, shown once on the terminal)"
        )
    return passphrase


#: words of a generated passphrase (from the 1024-word SLIP-39 list: 10 bits each, 60 bits in all)
PASSPHRASE_WORDS = 6


def generate_passphrase(words: int = PASSPHRASE_WORDS) -> str:
    """A diceware-style passphrase: ``words`` words drawn with :mod:`secrets` from the SLIP-39
    word list (1024 distinct words, none a prefix of another's first four letters)."""
    import secrets

    from shamir_mnemonic.wordlist import WORDLIST

    return " ".join(secrets.choice(WORDLIST) for _ in range(words))


def _generated_passphrase(out: object) -> bytes:
    """Generate a passphrase and show it once, on the terminal only (never piped, never logged)."""
    if not (_interactive() and stderr_is_tty()):
        raise UsageError(
            "--generate-passphrase shows the new passphrase once on the terminal, and there is none"
            " here: give a passphrase through --passphrase-env VAR instead"
        )
    words = generate_passphrase()
    sys.stderr.write(
        f"The passphrase of {out} (write it down now; it is not shown again, nor stored):\n\n    {words}\n\n"
    )
    sys.stderr.flush()
    try:
        again = getpass.getpass("Type it once to confirm: ")
    except EOFError:
        raise UsageError("no confirmation was typed: nothing was written") from None
    if " ".join(again.split()) != words:
        raise UsageError("that is not the generated passphrase: nothing was written")
    return words.encode("utf-8")


def _flag(what: str) -> str:
    return {"passphrase": "passphrase", "PIN": "pin"}.get(what, what.split()[0])


def kdf_cost(arg: str | None) -> Cost:
    """The argon2id cost of a new key file: --cost, else $WRIT_KDF_COST, else moderate."""
    cost = arg or os.environ.get("WRIT_KDF_COST") or "moderate"
    if cost not in ("interactive", "moderate", "sensitive"):
        raise UsageError(f"unknown key file cost {cost!r}: one of interactive, moderate, sensitive")
    return cast(Cost, cost)


# --- key sources --------------------------------------------------------------


def add_key_source(parser: argparse.ArgumentParser, *, key_flags: Sequence[str] = ("--key",)) -> None:
    g = parser.add_argument_group("key source (exactly one)")
    g.add_argument(*key_flags, dest="key", metavar="FILE", help="a passphrase-protected key file")
    g.add_argument(
        "--passphrase-env", metavar="VAR", help="environment variable holding the key file passphrase"
    )
    g.add_argument("--pkcs11", metavar="URI", help="an RFC 7512 PKCS#11 URI of the key")
    g.add_argument("--pin-env", metavar="VAR", help="environment variable holding the token PIN")
    g.add_argument("--pkcs11-module", metavar="PATH", help="the PKCS#11 module (default: SoftHSM2)")
    g.add_argument("--ssh-agent", metavar="FINGERPRINT", help="a key held by ssh-agent (SHA256:... or hex)")
    add_yes(parser)


def add_yes(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-y",
        "--yes",
        action="store_true",
        help="sign without asking (at a terminal, a signing command shows what it will sign and asks;"
        " without a terminal it never asks)",
    )


def has_key_source(args: argparse.Namespace) -> bool:
    return any(getattr(args, n, None) is not None for n in ("key", "pkcs11", "ssh_agent"))


@contextlib.contextmanager
def open_key(args: argparse.Namespace) -> Iterator[Signer]:
    """The one key source the arguments name, as a Signer (closed afterwards)."""
    from .. import signers

    key_file = getattr(args, "key", None)
    uri = getattr(args, "pkcs11", None)
    agent = getattr(args, "ssh_agent", None)
    given = [n for n, v in (("--key", key_file), ("--pkcs11", uri), ("--ssh-agent", agent)) if v is not None]
    if len(given) != 1:
        raise UsageError(
            "give exactly one key source (--key FILE, --pkcs11 URI or --ssh-agent FINGERPRINT); got "
            + (", ".join(given) if given else "none")
        )
    passphrase = pin = None
    if key_file is not None:
        signers.read_public_key(key_file)  # a missing or bad file fails before any prompt
        passphrase = read_secret(getattr(args, "passphrase_env", None), f"Passphrase for {key_file}: ")
    elif uri is not None:
        pin_env = getattr(args, "pin_env", None)
        if pin_env is not None or ("pin-value" not in uri and _interactive()):
            pin = read_secret(pin_env, "Token PIN: ", what="PIN").decode("utf-8")
    signer = signers.open_signer(
        key_file=key_file,
        passphrase=passphrase,
        pkcs11_uri=uri,
        pin=pin,
        pkcs11_module=getattr(args, "pkcs11_module", None) if uri is not None else None,
        ssh_agent=agent,
    )
    try:
        yield signer
    finally:
        close = getattr(signer, "close", None)
        if callable(close):
            close()


def _interactive() -> bool:
    try:
        return sys.stdin.isatty()
    except (AttributeError, ValueError):
        return False


# --- public companion file (FILE.pub.json) ------------------------------------


def pub_json_path(key_file: str | os.PathLike[str]) -> Path:
    return Path(os.fspath(key_file) + ".pub.json")


def read_pub_json(key_file: str | os.PathLike[str] | None) -> dict[str, Any] | None:
    """The public companion of a key file (anchor, digests), or None."""
    if key_file is None:
        return None
    path = pub_json_path(key_file)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    try:
        doc = json.loads(data[:65536].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise UsageError(f"{path} is not JSON") from None
    if not isinstance(doc, dict):
        raise UsageError(f"{path} is not a JSON object")
    return doc


def write_pub_json(key_file: str | os.PathLike[str], doc: dict[str, Any]) -> Path:
    path = pub_json_path(key_file)
    write_atomic(path, (json.dumps(doc, indent=2) + "\n").encode("utf-8"), mode=0o644)
    return path


def pub_hex(doc: dict[str, Any] | None, field: str) -> bytes | None:
    if doc is None:
        return None
    value = doc.get(field)
    if value is None:
        return None
    if not isinstance(value, str):
        raise UsageError(f"{field} in the public key companion file is not hex")
    return parse_hex(value, 32, field)


# --- files --------------------------------------------------------------------


def read_records_file(path: str) -> list[bytes]:
    """A records file: a MessagePack array of record ``bin`` values (1..1000)."""
    data = read_capped(path, PAGE * MAX_RECORD + 16 * 1024, what="records file")
    raws = unpack_records(data, max_count=PAGE, error=BadMessage)
    if not raws:
        raise UsageError(f"the records file {path} holds no record")
    return raws


def write_records_file(path: str, raws: list[bytes]) -> None:
    write_atomic(Path(path), pack_records(raws), mode=0o644)


# --- HTTP ---------------------------------------------------------------------


class Client(HttpClient):
    """The ``writ`` commands' client: :class:`ledger.client.Client` (the one fetch layer),
    over :data:`client_factory`'s ``httpx.Client`` when a test set one."""

    def __init__(self, server: str) -> None:
        base = normalise_server(server)
        super().__init__(base, http=client_factory(base) if client_factory is not None else None)


# --- the verified mirror, shared by every signing command ----------------------


def default_anchor(args: argparse.Namespace, *, key_public: bytes | None = None) -> bytes | None:
    """--anchor, then $WRIT_ANCHOR, then the key file's companion, then a key's own public key."""
    a = getattr(args, "anchor", None)
    if a is not None:
        return parse_hex(a, 32, "--anchor")
    env = os.environ.get("WRIT_ANCHOR")
    if env:
        return parse_hex(env, 32, "$WRIT_ANCHOR")
    doc = read_pub_json(getattr(args, "key", None))
    anchor = pub_hex(doc, "anchor")
    if anchor is not None:
        return anchor
    return key_public


def open_mirror(
    args: argparse.Namespace,
    client: Client | None,
    anchor: bytes | None,
    *,
    note: str | None = None,
    fallback: bytes | None = None,
) -> tuple[Mirror, str | None]:
    """Open (creating if needed) the mirror of ``client``'s ledger; returns (mirror, checkpoint note).

    ``anchor`` is checked against an existing mirror; ``fallback`` (a root key's
    own public key) is used only to create a new mirror when no anchor was given."""
    from ..mirror import Mirror, default_dir, origin_of

    directory = getattr(args, "mirror", None)
    if directory is None:
        if client is None:
            raise UsageError("--mirror DIR is required")
        if note is None:
            note = client.checkpoint()
        directory = str(default_dir(origin_of(note)))
    path = Path(directory)
    if anchor is None and fallback is not None and not (path / "state.bin").exists():
        anchor = fallback
    return Mirror.open(path, anchor), note


def synced_mirror(
    stack: contextlib.ExitStack[Any],
    args: argparse.Namespace,
    client: Client,
    *,
    fallback: bytes | None = None,
) -> Mirror:
    """The mirror of ``client``'s ledger (anchor from the arguments or the environment,
    ``fallback`` as in :func:`open_mirror`), closed with ``stack``, synced and verified."""
    mirror, note = open_mirror(args, client, default_anchor(args), fallback=fallback)
    stack.enter_context(mirror)
    sync_mirror(mirror, client, note)
    return mirror


def sync_mirror(mirror: Mirror, client: Client, note: str | None = None) -> SyncResult:
    """Sync and verify; a failure here is exit 3 and nothing is signed."""
    fresh = mirror.new and mirror.size == 0
    if note is None:
        note = client.checkpoint()
    try:
        from ..acceptance import checkpoint_size

        missing: int | None = max(0, checkpoint_size(note) - mirror.size)
    except WritError:
        missing = None  # mirror.sync below records the evidence and raises
    try:
        with stage("verifying the ledger", missing, unit="new records", quiet_below=SYNC_QUIET) as s:
            result = mirror.sync(client, note=note, progress=s.advance)
    except RecordRejected as exc:
        if fresh and exc.seq == 0 and exc.type in ("bad-signature", "invalid-field"):
            exc.message += (
                f" (the ledger's genesis does not verify under the anchor {mirror.anchor.hex()[:16]}…:"
                " give the right one with --anchor HEX or $WRIT_ANCHOR)"
            )
        raise
    if result.warning and result.size:
        say(f"writ: warning: {result.warning}")
    return result


# --- sign, check, push (the engine is ledger/writer.py) ------------------------


def _refuse(exc: WritError) -> NoReturn:
    refuse_from(exc, EXIT_FAILED)


def check_on_copy(state: LedgerState, raws: list[bytes]) -> LedgerState:
    """Apply our records to a copy of the verified state; a rejection is a refusal (exit 1)."""
    return writer.check_on_copy(state, raws, _refuse)


def writer_for(mirror: Mirror, client: Client, *, ask: bool = True) -> Writer:
    """The writer engine with the CLI's hooks: the verified sync with its progress line,
    the confirmation at a terminal (unless ``ask`` is false), Ctrl-C held once the records
    landed, explanations on stderr, refusals as exit 1."""
    return Writer(
        mirror,
        client,
        sync=lambda: sync_mirror(mirror, client),
        confirm=(lambda state, raws: confirm(state, raws, f"publish to {client.base}")) if ask else None,
        landed=hold_interrupts,
        say=say,
        refuse=_refuse,
    )


def push_intent(
    mirror: Mirror, client: Client, build: Builder, *, sync_first: bool = True, ask: bool = True
) -> Pushed:
    """Sync and verify, build, check on a copy, confirm, push, re-sign once on a stale head,
    check back after an uncertain answer: :meth:`ledger.writer.Writer.push`."""
    return writer_for(mirror, client, ask=ask).push(build, sync_first=sync_first)


# --- show what will be signed, and ask --------------------------------------------------


def confirm(state: LedgerState, raws: list[bytes], action: str, *, ask: bool = True) -> None:
    """At a terminal (stdin and stderr), show in plain words what these records say and ask
    before they go anywhere; a "no" is :class:`~ledger.errors.Declined` and nothing is
    published or written. Without a terminal it never asks (scripts run unchanged)."""
    if not ask or not (_interactive() and stderr_is_tty()):
        return
    lines = describe(state, raws)
    sys.stderr.write(f"About to sign and {action}:\n" + "".join(f"  {line}\n" for line in lines))
    sys.stderr.write("Sign? [y/N] ")
    sys.stderr.flush()
    try:
        answer = sys.stdin.readline()
    except (EOFError, OSError):
        answer = ""
    if answer.strip().lower() not in ("y", "yes"):
        raise Declined("not confirmed: nothing was signed or sent")


def usage_from(exc: WritError) -> NoReturn:
    """A field that the rules refuse before signing (bad role, name too long...): exit 2."""
    refuse_from(exc, EXIT_USAGE)


def build_body(make: Callable[[], rec.Body]) -> rec.Body:
    try:
        return make()
    except WritError as exc:
        usage_from(exc)
