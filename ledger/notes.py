"""C2SP signed notes and Ed25519 cosignatures (docs/protocol.md, "Checkpoints").

The note layer, pure code, no I/O (checkpoints, the note text a log signs,
are in :mod:`ledger.checkpoints`):

- signed-note v1: a UTF-8 text ending in a newline, a blank line, then one or
  more lines ``— <key name> base64(key ID || signature)``. Verifier keys
  ("vkeys") are ``<name>+<8 hex key ID>+base64(type || public key)``.
- tlog-cosignature v1, Ed25519 (signature type 0x04): the signature is
  ``u64 big-endian timestamp || Ed25519(key, "cosignature/v1\\ntime <T>\\n" || body)``.

Only two signature types are supported: 0x01 (plain Ed25519 over the note
text) and 0x04 (timestamped cosignature). A Writ log signs every checkpoint
twice under the key name ``<origin>``: 0x01 for standard tools, 0x04 for the
time that makes a device's view fresh.

Parsing is stricter than the specifications require, never looser, so that one
note has exactly one reading:

- at most :data:`MAX_NOTE_SIZE` bytes and :data:`MAX_SIGNATURES` signature lines
  (the spec asks verifiers to accept at least 16);
- base64 must be canonical (standard alphabet, padding, zero trailing bits), so
  :meth:`Note.serialize` gives back exactly the bytes that were parsed;
- two signature lines with the same (key name, key ID) are refused (a second
  0x04 line of one key would carry a second, competing timestamp);
- a signature payload is at least one byte after the key ID.

Verification follows the spec's safer options: signatures by unknown keys are
ignored, a signature by a known key that does not verify rejects the whole
note, and a note no known key verified is rejected. Every failure is a
:class:`~ledger.errors.WritError`: :class:`~ledger.errors.BadNote` for syntax
and for generic notes, the :class:`~ledger.errors.CheckpointRejected` family
for checkpoints.
"""

from __future__ import annotations

import base64
import binascii
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from .crypto import PUBLIC_KEY_SIZE, SIGNATURE_SIZE, Signer, check, sha256, sign
from .errors import BadNote

__all__ = [
    "COSIGNATURE_V1",
    "MAX_NOTE_SIZE",
    "MAX_SIGNATURES",
    "MAX_TIMESTAMP",
    "SIG_ED25519",
    "SIG_ED25519_COSIGNATURE",
    "Note",
    "NoteSignature",
    "VerifiedSignature",
    "Verifier",
    "add_signatures",
    "cosignature_message",
    "key_id",
    "parse_note",
    "parse_signature_line",
    "parse_vkey",
    "sign_note",
    "verify_note",
    "vkey",
]

#: signature type 0x01: Ed25519 over the note text (signed-note v1).
SIG_ED25519 = 0x01
#: signature type 0x04: timestamped Ed25519 cosignature (tlog-cosignature v1).
SIG_ED25519_COSIGNATURE = 0x04
SUPPORTED_TYPES = frozenset({SIG_ED25519, SIG_ED25519_COSIGNATURE})

#: largest note accepted, in UTF-8 bytes.
MAX_NOTE_SIZE = 1 << 20
#: most signature lines accepted in one note (Go's sumdb/note uses 100 too).
MAX_SIGNATURES = 100
#: a cosignature timestamp MUST NOT exceed 2^63 - 1.
MAX_TIMESTAMP = (1 << 63) - 1

COSIGNATURE_V1 = b"cosignature/v1\n"
KEY_ID_SIZE = 4
HASH_SIZE = 32
TIMESTAMP_SIZE = 8
COSIGNATURE_SIZE = TIMESTAMP_SIZE + SIGNATURE_SIZE

SIG_PREFIX = "\u2014 "  # em dash, space
_BAD_CONTROL = re.compile("[\x00-\x09\x0b-\x1f]")
_HEX8 = re.compile("[0-9a-fA-F]{8}")


def _short(text: str, limit: int = 48) -> str:
    """A bounded, printable rendering of attacker-supplied text for messages."""
    r = repr(text)
    return r if len(r) <= limit else r[: limit - 1] + "…"


def _is_uint(value: object, limit: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= limit


def _b64decode(text: str, what: str) -> bytes:
    """Strict standard base64: alphabet, padding and canonical trailing bits."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        raise BadNote(f"{what} is not valid base64") from None
    if base64.b64encode(raw).decode("ascii") != text:
        raise BadNote(f"{what} is not canonical base64")
    return raw


def _b64encode(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _check_name(name: str, what: str = "key name") -> None:
    """signed-note key names: non-empty, no '+', no Unicode space, no control character."""
    if not name:
        raise BadNote(f"{what} is empty")
    problem = _name_problem(name)
    if problem is not None:
        raise BadNote(
            f"{what} {problem}" if problem.startswith("is ") else f"{what} {_short(name)} {problem}"
        )


@lru_cache(maxsize=1024)
def _name_problem(name: str) -> str | None:
    """Why ``name`` is not a valid key name (cached: a verifier sees the same few names)."""
    for ch in name:
        if ch == "+" or ch.isspace() or unicodedata.category(ch) == "Cc":
            return "contains a space, '+' or a control character"
        if 0xD800 <= ord(ch) <= 0xDFFF:
            return "is not valid UTF-8"
    return None


def _encode_text(text: str, what: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadNote(f"{what} is not valid UTF-8") from None


# --- keys -------------------------------------------------------------------


def key_id(name: str, sig_type: int, public_key: bytes) -> bytes:
    """``SHA-256(name || "\\n" || sig_type || public_key)[:4]`` (signed-note key ID)."""
    if not 0 <= sig_type <= 0xFF:
        raise BadNote("a signature type is one byte")
    return sha256(_encode_text(name, "key name") + b"\n" + bytes([sig_type]) + public_key)[:KEY_ID_SIZE]


@dataclass(frozen=True)
class Verifier:
    """A verifier key: a name, a signature type and an Ed25519 public key.

    Construction validates everything (the key ID must be the computed one), so a
    ``Verifier`` value is always usable. Build one with :meth:`create` or
    :func:`parse_vkey`.
    """

    name: str
    key_id: bytes
    sig_type: int
    public_key: bytes

    def __post_init__(self) -> None:
        _check_name(self.name)
        if self.sig_type not in SUPPORTED_TYPES:
            raise BadNote(f"unsupported signature type 0x{self.sig_type:02x} (only 0x01 and 0x04)")
        if len(self.public_key) != PUBLIC_KEY_SIZE:
            raise BadNote("an Ed25519 verifier key is 32 bytes")
        if self.key_id != key_id(self.name, self.sig_type, self.public_key):
            raise BadNote(f"key ID of {_short(self.name)} does not match its public key")

    @classmethod
    def create(cls, name: str, sig_type: int, public_key: bytes) -> Verifier:
        return cls(name, key_id(name, sig_type, public_key), sig_type, bytes(public_key))

    def vkey(self) -> str:
        return f"{self.name}+{self.key_id.hex()}+{_b64encode(bytes([self.sig_type]) + self.public_key)}"

    def verify(self, body: bytes, payload: bytes) -> int | None:
        """Verify one signature payload (key ID stripped) over the note text.

        Returns the cosignature timestamp for type 0x04, ``None`` for 0x01.
        Raises :class:`BadNote` when the signature does not verify.
        """
        if self.sig_type == SIG_ED25519:
            if not check(self.public_key, b"", body, payload):
                raise BadNote(f"signature by {_short(self.name)}+{self.key_id.hex()} does not verify")
            return None
        if len(payload) != COSIGNATURE_SIZE:
            raise BadNote(f"cosignature by {_short(self.name)}+{self.key_id.hex()} is not 72 bytes")
        timestamp = int.from_bytes(payload[:TIMESTAMP_SIZE], "big")
        if timestamp > MAX_TIMESTAMP:
            raise BadNote("cosignature timestamp exceeds 2^63 - 1")
        if not check(self.public_key, cosignature_message(timestamp), body, payload[TIMESTAMP_SIZE:]):
            raise BadNote(f"cosignature by {_short(self.name)}+{self.key_id.hex()} does not verify")
        return timestamp


def vkey(name: str, sig_type: int, public_key: bytes) -> str:
    """The verifier key string ``<name>+<8 hex key ID>+<base64(type || public key)>``."""
    return Verifier.create(name, sig_type, public_key).vkey()


def parse_vkey(text: str) -> Verifier:
    """Parse a vkey strictly: valid name, the computed key ID, type 0x01 or 0x04, 32-byte key."""
    if not isinstance(text, str) or len(text) > 1024:
        raise BadNote("a verifier key is a short string")
    name, sep1, rest = text.partition("+")
    hex_id, sep2, key64 = rest.partition("+")
    if not sep1 or not sep2:
        raise BadNote("a verifier key is <name>+<key ID>+<key>")
    _check_name(name)
    if not _HEX8.fullmatch(hex_id):
        raise BadNote("a verifier key ID is 8 hex digits")
    raw = _b64decode(key64, "verifier key")
    if not raw:
        raise BadNote("verifier key is empty")
    # Verifier() checks the type, the key length and the key ID.
    return Verifier(name, bytes.fromhex(hex_id), raw[0], raw[1:])


# --- notes ------------------------------------------------------------------


@dataclass(frozen=True)
class NoteSignature:
    """One signature line: key name, 4-byte key ID, and the signature payload after it."""

    name: str
    key_id: bytes
    payload: bytes

    def line(self) -> str:
        """The signature line, newline included."""
        return f"{SIG_PREFIX}{self.name} {_b64encode(self.key_id + self.payload)}\n"


@dataclass(frozen=True)
class Note:
    """A parsed, not yet verified, signed note. ``body`` ends with a newline."""

    body: str
    signatures: tuple[NoteSignature, ...]

    def serialize(self) -> str:
        """The note text; for a parsed note, exactly the text that was parsed."""
        return self.body + "\n" + "".join(s.line() for s in self.signatures)


@dataclass(frozen=True)
class VerifiedSignature:
    """A signature that verified: the verifier, the line, and a 0x04 timestamp."""

    verifier: Verifier
    signature: NoteSignature
    timestamp: int | None


def _decode_note(text: str | bytes) -> str:
    if isinstance(text, bytes | bytearray | memoryview):
        raw = bytes(text)
        if len(raw) > MAX_NOTE_SIZE:
            raise BadNote(f"note is larger than {MAX_NOTE_SIZE} bytes")
        try:
            out = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BadNote("note is not valid UTF-8") from None
    elif isinstance(text, str):
        if len(text) > MAX_NOTE_SIZE or len(_encode_text(text, "note")) > MAX_NOTE_SIZE:
            raise BadNote(f"note is larger than {MAX_NOTE_SIZE} bytes")
        out = text
    else:
        raise BadNote("a note is text or bytes")
    if _BAD_CONTROL.search(out):
        raise BadNote("note contains a control character other than newline")
    return out


def parse_signature_line(line: str) -> NoteSignature:
    """Parse one ``— <name> <base64>`` line (without its newline)."""
    if not line.startswith(SIG_PREFIX):
        raise BadNote("a signature line starts with an em dash and a space")
    name, sep, b64 = line[len(SIG_PREFIX) :].partition(" ")
    if not sep:
        raise BadNote("a signature line is '— <name> <signature>'")
    _check_name(name)
    raw = _b64decode(b64, "signature")
    if len(raw) <= KEY_ID_SIZE:
        raise BadNote("a signature is a key ID and at least one byte")
    return NoteSignature(name, raw[:KEY_ID_SIZE], raw[KEY_ID_SIZE:])


#: notes whose parse is kept (exact text -> :class:`Note`): a verifier meets the
#: same checkpoint note several times (its size, its signatures, its freshness),
#: and a simulated fleet meets it once per device. Only notes up to
#: :data:`KEPT_NOTE_SIZE` characters or bytes are kept (a checkpoint is < 1 KiB).
PARSED_NOTES = 16
KEPT_NOTE_SIZE = 16 * 1024


def parse_note(text: str | bytes) -> Note:
    """Parse a signed note strictly (see the module docstring). Raises :class:`BadNote`.

    The parse of the last :data:`PARSED_NOTES` distinct short texts is kept, keyed
    by the exact text (``str`` and ``bytes`` apart): a :class:`Note` is
    immutable, so the same text always gives an equal note, and a refused
    text is parsed (and refused) again each time. Nothing is verified here,
    so nothing a caller verifies is skipped."""
    if (type(text) is str or type(text) is bytes) and len(text) <= KEPT_NOTE_SIZE:
        return _parse_note_kept(text)
    return _parse_note(text)


@lru_cache(maxsize=PARSED_NOTES, typed=True)
def _parse_note_kept(text: str | bytes) -> Note:
    return _parse_note(text)


def _parse_note(text: str | bytes) -> Note:
    msg = _decode_note(text)
    split = msg.rfind("\n\n")
    if split < 0:
        raise BadNote("note has no blank line before its signatures")
    body, block = msg[: split + 1], msg[split + 2 :]
    if not block or not block.endswith("\n"):
        raise BadNote("note does not end with a newline-terminated signature line")
    lines = block[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise BadNote(f"note has more than {MAX_SIGNATURES} signatures")
    sigs: list[NoteSignature] = []
    seen: set[tuple[str, bytes]] = set()
    for line in lines:
        sig = parse_signature_line(line)
        ident = (sig.name, sig.key_id)
        if ident in seen:
            raise BadNote(f"note has two signatures by {_short(sig.name)}+{sig.key_id.hex()}")
        seen.add(ident)
        sigs.append(sig)
    return Note(body, tuple(sigs))


def _verifier_map(verifiers: Sequence[Verifier]) -> dict[tuple[str, bytes], Verifier]:
    known: dict[tuple[str, bytes], Verifier] = {}
    for v in verifiers:
        ident = (v.name, v.key_id)
        other = known.get(ident)
        if other is not None and other != v:
            raise BadNote(f"two verifier keys share the name and key ID {_short(v.name)}+{v.key_id.hex()}")
        known[ident] = v
    return known


def verify_note(note: Note, verifiers: Sequence[Verifier]) -> list[VerifiedSignature]:
    """Verify ``note`` against known verifiers; returns the verified signatures in note order.

    Signatures by unknown (name, key ID) pairs are ignored. A signature by a known
    key that does not verify rejects the whole note; so does a note that no known
    key signed. Both raise :class:`BadNote`.
    """
    known = _verifier_map(verifiers)
    body = _encode_text(note.body, "note")
    out: list[VerifiedSignature] = []
    for sig in note.signatures:
        v = known.get((sig.name, sig.key_id))
        if v is None:
            continue
        out.append(VerifiedSignature(v, sig, v.verify(body, sig.payload)))
    if not out:
        raise BadNote("no known key signed the note")
    return out


def _signature_line(name: str, sig_type: int, public_key: bytes, payload: bytes) -> NoteSignature:
    return NoteSignature(name, Verifier.create(name, sig_type, public_key).key_id, payload)


def sign_note(body: str, signers: Sequence[tuple[str, Signer]]) -> str:
    """A note of ``body`` with one type 0x01 (plain Ed25519) signature per ``(name, signer)``."""
    if not signers:
        raise BadNote("a note needs at least one signature")
    _check_body(body)
    message = _encode_text(body, "note")
    sigs = tuple(
        _signature_line(name, SIG_ED25519, signer.public_key, sign(signer, b"", message))
        for name, signer in signers
    )
    return _finish(Note(body, sigs))


def _check_body(body: str) -> None:
    if not body.endswith("\n"):
        raise BadNote("note text must end with a newline")
    if _BAD_CONTROL.search(body):
        raise BadNote("note text contains a control character other than newline")


def _finish(note: Note) -> str:
    """Serialize and re-parse: whatever we emit, we (and the spec) accept."""
    text = note.serialize()
    if parse_note(text) != note:
        raise BadNote("note does not round-trip")
    return text


def add_signatures(note_text: str | bytes, lines: Sequence[str]) -> str:
    """Append signature lines (each with or without its newline) to a note.

    A new line replaces an existing signature with the same (name, key ID), as
    Go's ``note.Sign`` does. Nothing is verified here.
    """
    note = parse_note(note_text)
    new: list[NoteSignature] = []
    for line in lines:
        sig = parse_signature_line(line.removesuffix("\n"))
        if any((s.name, s.key_id) == (sig.name, sig.key_id) for s in new):
            raise BadNote(f"two new signatures by {_short(sig.name)}+{sig.key_id.hex()}")
        new.append(sig)
    replaced = {(s.name, s.key_id) for s in new}
    kept = tuple(s for s in note.signatures if (s.name, s.key_id) not in replaced)
    return _finish(Note(note.body, kept + tuple(new)))


# --- cosignatures ---------------------------------------------------------


def cosignature_message(timestamp: int) -> bytes:
    """The tlog-cosignature v1 prefix ``"cosignature/v1\\ntime <T>\\n"`` (the body follows)."""
    return COSIGNATURE_V1 + b"time %d\n" % timestamp
