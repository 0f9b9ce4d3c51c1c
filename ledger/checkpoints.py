"""tlog-checkpoint v1 notes as a Writ log signs them (docs/protocol.md, "Checkpoints").

Pure code on top of :mod:`ledger.notes` (the signed-note syntax, verifier
keys and the cosignature format):

- :class:`Checkpoint`: the note text ``<origin>\\n<size>\\n<base64 root>\\n``
  followed by optional non-empty extension lines, parsed strictly
  (:func:`parse_checkpoint_body`: a size without leading zeros, a 32-byte root);
- :func:`sign_checkpoint`: the log's two signatures under the key name
  ``<origin>``, 0x01 for standard tools and 0x04 for the time that makes a
  device's view fresh; :func:`cosign`: a witness's 0x04 line;
- :func:`verify_checkpoint`: the log's signature, its timestamp and the
  witnesses' cosignatures, counted by key. Every failure is in the
  :class:`~ledger.errors.CheckpointRejected` family (syntax: ``BadNote``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from .crypto import Signer, sign
from .errors import BadNote, MissingCosignatures, UntrustedCheckpoint, WrongOrigin
from .notes import (
    _BAD_CONTROL,
    HASH_SIZE,
    KEPT_NOTE_SIZE,
    MAX_TIMESTAMP,
    SIG_ED25519,
    SIG_ED25519_COSIGNATURE,
    TIMESTAMP_SIZE,
    Note,
    NoteSignature,
    Verifier,
    _b64decode,
    _b64encode,
    _check_body,
    _encode_text,
    _finish,
    _is_uint,
    _name_problem,
    _short,
    _signature_line,
    _verifier_map,
    cosignature_message,
    parse_note,
)

__all__ = [
    "MAX_TREE_SIZE",
    "Checkpoint",
    "VerifiedCheckpoint",
    "checkpoint_verifiers",
    "checkpoint_vkeys",
    "cosign",
    "parse_checkpoint_body",
    "sign_checkpoint",
    "verify_checkpoint",
]

#: largest tree size accepted in a checkpoint (the int64 range of Go's tlog).
MAX_TREE_SIZE = (1 << 63) - 1
_DECIMAL = re.compile("0|[1-9][0-9]*")
_MAX_SIZE_DIGITS = len(str(MAX_TREE_SIZE))


def checkpoint_verifiers(origin: str, log_public_key: bytes) -> tuple[Verifier, Verifier]:
    """The log's type 0x01 and type 0x04 verifiers, both under key name ``origin``
    (immutable values, kept for the last few (origin, key) pairs)."""
    return _checkpoint_verifiers(origin, bytes(log_public_key))


@lru_cache(maxsize=64)
def _checkpoint_verifiers(origin: str, log_public_key: bytes) -> tuple[Verifier, Verifier]:
    return (
        Verifier.create(origin, SIG_ED25519, log_public_key),
        Verifier.create(origin, SIG_ED25519_COSIGNATURE, log_public_key),
    )


def checkpoint_vkeys(origin: str, log_public_key: bytes) -> tuple[str, str]:
    """``(log_vkey, cosig_vkey)``: the log's 0x01 and 0x04 vkeys (``GET /v1/ledger``)."""
    plain, cosig = checkpoint_verifiers(origin, log_public_key)
    return plain.vkey(), cosig.vkey()


@dataclass(frozen=True)
class Checkpoint:
    """A tlog-checkpoint note text: origin, tree size, root hash, extension lines."""

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for what, line in (("origin", self.origin), *(("extension line", e) for e in self.extensions)):
            if not isinstance(line, str) or not line:
                raise BadNote(f"checkpoint {what} is empty")
            if "\n" in line or _BAD_CONTROL.search(line):
                raise BadNote(f"checkpoint {what} contains a control character")
            _encode_text(line, f"checkpoint {what}")
        if not _is_uint(self.size, MAX_TREE_SIZE):
            raise BadNote("checkpoint size is an integer in 0..2^63-1")
        if not isinstance(self.root, bytes) or len(self.root) != HASH_SIZE:
            raise BadNote("checkpoint root hash is 32 bytes")

    def body(self) -> str:
        lines = [self.origin, str(self.size), _b64encode(self.root), *self.extensions]
        return "".join(line + "\n" for line in lines)


def parse_checkpoint_body(text: str) -> Checkpoint:
    """Parse a checkpoint note text strictly (size without leading zeros, 32-byte root).

    Kept, like :func:`ledger.notes.parse_note`, for the last few distinct
    texts (a :class:`Checkpoint` is immutable; a refused text is refused again)."""
    if not isinstance(text, str):
        raise BadNote("a checkpoint body is text")
    if type(text) is str and len(text) <= KEPT_NOTE_SIZE:
        return _parse_checkpoint_body(text)
    return _parse_checkpoint_body.__wrapped__(text)


@lru_cache(maxsize=16)
def _parse_checkpoint_body(text: str) -> Checkpoint:
    _check_body(text)
    lines = text[:-1].split("\n")
    if len(lines) < 3:
        raise BadNote("a checkpoint has an origin, a size and a root hash line")
    origin, size_line, root_line, *extensions = lines
    if len(size_line) > _MAX_SIZE_DIGITS or not _DECIMAL.fullmatch(size_line):
        raise BadNote("checkpoint size is a decimal number without leading zeros")
    root = _b64decode(root_line, "checkpoint root hash")
    return Checkpoint(origin, int(size_line), root, tuple(extensions))


def _cosignature(name: str, signer: Signer, body: str, timestamp: int) -> NoteSignature:
    if not _is_uint(timestamp, MAX_TIMESTAMP):
        raise BadNote("a cosignature timestamp is an integer in 0..2^63-1")
    sig = sign(signer, cosignature_message(timestamp), _encode_text(body, "note"))
    payload = timestamp.to_bytes(TIMESTAMP_SIZE, "big") + sig
    return _signature_line(name, SIG_ED25519_COSIGNATURE, signer.public_key, payload)


def sign_checkpoint(cp: Checkpoint, origin_name: str, log_signer: Signer, timestamp: int) -> str:
    """The checkpoint note signed by the log: type 0x01 then type 0x04, both named ``origin_name``.

    docs/protocol.md, "Checkpoints": ``origin_name`` is the checkpoint origin.
    """
    body = cp.body()
    plain = _signature_line(
        origin_name, SIG_ED25519, log_signer.public_key, sign(log_signer, b"", body.encode("utf-8"))
    )
    cosig = _cosignature(origin_name, log_signer, body, timestamp)
    return _finish(Note(body, (plain, cosig)))


def cosign(cp: Checkpoint, name: str, signer: Signer, timestamp: int) -> str:
    """A witness's tlog-cosignature v1 (type 0x04) line for ``cp``, newline included."""
    return _cosignature(name, signer, cp.body(), timestamp).line()


@dataclass(frozen=True)
class VerifiedCheckpoint:
    """What :func:`verify_checkpoint` established.

    ``log_key`` is the log key whose 0x01 signature verified (the first in note
    order when several trusted log keys signed); ``timestamp`` the
    verified 0x04 timestamp under that same key (``None`` when the log sent no
    0x04 line); ``cosigners`` the names of witnesses whose 0x04 verified, one per
    distinct witness key; ``note`` the note text exactly as received;
    ``witness_stamps`` the verified cosignature timestamp of each of those
    witness keys, ``(public key, timestamp)`` in note order (the latest when
    one key signed twice under two names).
    """

    checkpoint: Checkpoint
    log_key: bytes
    timestamp: int | None
    cosigners: tuple[str, ...]
    note: str
    witness_stamps: tuple[tuple[bytes, int], ...] = ()


def verify_checkpoint(
    note_text: str | bytes,
    origin: str,
    log_keys: Sequence[bytes],
    witness_keys: Sequence[tuple[str, bytes]] = (),
    require_witnesses: int = 0,
) -> VerifiedCheckpoint:
    """Verify a checkpoint note signed by a Writ log (docs/protocol.md, "Checkpoints").

    - syntax (note or checkpoint text) -> :class:`BadNote`;
    - origin line other than ``origin`` -> :class:`WrongOrigin`;
    - any signature by a known key (a log key as 0x01 or 0x04, a witness as 0x04)
      that does not verify -> :class:`UntrustedCheckpoint`: the whole note is
      refused: a note whose 0x01 verifies but whose 0x04 was altered is not
      accepted minus its timestamp, it is rejected;
    - no log key's 0x01 verified -> :class:`UntrustedCheckpoint`;
    - fewer than ``require_witnesses`` distinct witness keys cosigned ->
      :class:`MissingCosignatures`.

    Witnesses are counted by public key, not name: the Ed25519 cosignature does
    not commit to the name, so one key listed under two names counts once, and a
    witness whose key is a log key never counts.
    """
    note = parse_note(note_text)
    cp = parse_checkpoint_body(note.body)
    if cp.origin != origin:
        raise WrongOrigin(f"checkpoint origin {_short(cp.origin)} is not {_short(origin)}")
    if not log_keys:
        raise UntrustedCheckpoint("no log key is trusted")
    log_set = {bytes(k) for k in log_keys}
    verifiers: list[Verifier] = []
    try:
        for k in log_set:
            verifiers.extend(checkpoint_verifiers(origin, k))
        log_ids = {(v.name, v.key_id) for v in verifiers}
        for wname, wkey in witness_keys:
            if bytes(wkey) in log_set or not wname or _name_problem(wname) is not None:
                # a witness whose grant name cannot be a note key name can sign
                # nothing verifiable: it is ignored, never a reason to refuse
                continue
            w = Verifier.create(wname, SIG_ED25519_COSIGNATURE, bytes(wkey))
            if (w.name, w.key_id) not in log_ids:
                verifiers.append(w)
        known = _verifier_map(verifiers)
    except BadNote as e:
        raise UntrustedCheckpoint(f"bad verifier configuration: {e.message}") from None

    body = note.body.encode("utf-8")
    log_key: bytes | None = None
    stamps: dict[bytes, int] = {}
    cosigners: dict[bytes, str] = {}
    wstamps: dict[bytes, int] = {}
    for sig in note.signatures:
        v = known.get((sig.name, sig.key_id))
        if v is None:
            continue
        try:
            ts = v.verify(body, sig.payload)
        except BadNote as e:
            raise UntrustedCheckpoint(f"checkpoint refused: {e.message}") from None
        if v.public_key in log_set:  # a log verifier: witnesses with a log key were skipped
            if ts is None:
                log_key = log_key if log_key is not None else v.public_key
            else:
                stamps[v.public_key] = ts
        else:
            cosigners.setdefault(v.public_key, v.name)
            if ts is not None:
                wstamps[v.public_key] = max(ts, wstamps.get(v.public_key, ts))
    if log_key is None:
        raise UntrustedCheckpoint("no trusted log key signed the checkpoint")
    if len(cosigners) < require_witnesses:
        raise MissingCosignatures(
            f"{len(cosigners)} of the {require_witnesses} required witness cosignatures",
            have=len(cosigners),
            need=require_witnesses,
        )
    text = note_text if isinstance(note_text, str) else bytes(note_text).decode("utf-8")
    return VerifiedCheckpoint(
        cp, log_key, stamps.get(log_key), tuple(cosigners.values()), text, tuple(wstamps.items())
    )
