"""The one exception tree of Writ.

Every failure that a user can cause or observe is an instance of
:class:`WritError`, and every class carries a stable ``type`` name. That name is
the same everywhere: the ``expect`` strings of the protocol vectors, the last
path segment of the HTTP problem+json ``type``, and the ``error`` field of the
CLI's JSON output. Verification code raises one of these, never returns a
bare bool.

    WritError                              (type "error")
    ├── VerificationError                  bytes failed a protocol rule
    │   ├── RecordRejected                 a rule of PROTOCOL section 3 (carries .seq)
    │   │   ├── TooLarge                   too-large
    │   │   ├── NotCanonical               not-canonical
    │   │   ├── UnsupportedVersion         unsupported-version
    │   │   ├── UnknownKind                unknown-kind
    │   │   ├── InvalidField               invalid-field
    │   │   ├── MisplacedGenesis           misplaced-genesis
    │   │   ├── StaleHead                  stale-head
    │   │   ├── TimeRegression             time-regression
    │   │   ├── UnauthorizedSigner         unauthorized-signer
    │   │   ├── BadSignature               bad-signature
    │   │   ├── UnknownTarget              unknown-target
    │   │   ├── AlreadyRevoked             already-revoked
    │   │   └── TimeInFuture               time-in-future
    │   ├── BadMessage                     bad-message (auth, receipt, enroll, bundle)
    │   ├── BadProof                       bad-proof (inclusion / consistency)
    │   ├── BadNote                        bad-note (signed note / verifier key syntax)
    │   ├── BadTilePath                    bad-tile-path (no such tlog-tiles path; HTTP 404)
    │   ├── UnknownDevice                  unknown-device (a receipt not from an unrevoked device grant)
    │   ├── UnknownHead                    unknown-head (a receipt's size/root is not a head of the ledger)
    │   └── CheckpointRejected             a checkpoint the verifier must not accept
    │       ├── UntrustedCheckpoint        untrusted-checkpoint (no valid granted log signature)
    │       ├── WrongOrigin                wrong-origin
    │       ├── Rollback                   rollback (size went back)
    │       ├── Fork                       fork (same size, other root; or root != computed tree)
    │       ├── TimestampRegression        timestamp-regression
    │       └── MissingCosignatures        missing-cosignatures (fewer than k witnesses)
    ├── StorageError                       storage-error
    │   ├── HeadConflict                   stale-head (compare-and-swap lost)
    │   ├── CorruptLedger                  corrupt-ledger (carries .seq and the cause)
    │   └── LedgerExists / LedgerMissing   ledger-exists / no-ledger
    ├── KeyMaterialError                   key-error
    │   ├── WrongPassphrase                wrong-passphrase
    │   ├── BadKeyFile                     bad-key-file
    │   ├── TokenError                     token-error (PKCS#11)
    │   ├── AgentError                     agent-error (ssh-agent)
    │   ├── BadSshKey                      bad-ssh-key (not one well-formed ssh-ed25519 key)
    │   └── ShareError                     bad-shares (SLIP-39 recovery)
    ├── TransportError                     unreachable / http-error / response-too-large
    └── UsageError                         usage (bad flags, unknown name, ambiguous name, bad hex)

Messages never contain secret material: constructors take descriptions, not
keys.
"""

from __future__ import annotations

from typing import Any, ClassVar


class WritError(Exception):
    """Root of every Writ error. ``type`` is the stable rejection name."""

    type: ClassVar[str] = "error"
    http_status: ClassVar[int] = 400

    def __init__(self, message: str = "", **detail: Any) -> None:
        super().__init__(message or self.type)
        self.message = message or self.type
        self.detail: dict[str, Any] = detail

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.type, "message": self.message}
        out.update(self.detail)
        return out


# --- verification -----------------------------------------------------------


class VerificationError(WritError):
    type = "verification-error"
    http_status = 422


class RecordRejected(VerificationError):
    """A record failed a rule of PROTOCOL section 3."""

    type = "record-rejected"

    def __init__(self, message: str = "", *, seq: int | None = None, **detail: Any) -> None:
        if seq is not None:
            detail["seq"] = seq
        super().__init__(message, **detail)
        self.seq = seq


class TooLarge(RecordRejected):
    type = "too-large"
    http_status = 413


class NotCanonical(RecordRejected):
    type = "not-canonical"


class UnsupportedVersion(RecordRejected):
    type = "unsupported-version"


class UnknownKind(RecordRejected):
    type = "unknown-kind"


class InvalidField(RecordRejected):
    type = "invalid-field"


class MisplacedGenesis(RecordRejected):
    type = "misplaced-genesis"
    http_status = 409


class StaleHead(RecordRejected):
    type = "stale-head"
    http_status = 409


class TimeRegression(RecordRejected):
    type = "time-regression"


class UnauthorizedSigner(RecordRejected):
    type = "unauthorized-signer"
    http_status = 403


class BadSignature(RecordRejected):
    type = "bad-signature"
    http_status = 403


class UnknownTarget(RecordRejected):
    type = "unknown-target"


class AlreadyRevoked(RecordRejected):
    type = "already-revoked"
    http_status = 409


class TimeInFuture(RecordRejected):
    type = "time-in-future"


class BadMessage(VerificationError):
    """An auth, receipt, enrollment or bundle message is malformed or badly signed."""

    type = "bad-message"


class BadProof(VerificationError):
    type = "bad-proof"


class BadNote(VerificationError):
    type = "bad-note"


class BadTilePath(VerificationError):
    """A tlog-tiles path that is not canonical, or names a tile the tree does not have."""

    type = "bad-tile-path"
    http_status = 404


class UnknownDevice(VerificationError):
    """A receipt whose ``device_grant_seq`` is not an unrevoked ``device`` grant."""

    type = "unknown-device"
    http_status = 403


class UnknownHead(VerificationError):
    """A receipt for a (size, root) that is not a head of this ledger."""

    type = "unknown-head"


class CheckpointRejected(VerificationError):
    type = "checkpoint-rejected"


class UntrustedCheckpoint(CheckpointRejected):
    type = "untrusted-checkpoint"


class WrongOrigin(CheckpointRejected):
    type = "wrong-origin"


class Rollback(CheckpointRejected):
    type = "rollback"


class Fork(CheckpointRejected):
    type = "fork"


class TimestampRegression(CheckpointRejected):
    type = "timestamp-regression"


class MissingCosignatures(CheckpointRejected):
    type = "missing-cosignatures"


# --- storage ----------------------------------------------------------------


class StorageError(WritError):
    type = "storage-error"
    http_status = 503


class HeadConflict(StorageError):
    """The compare-and-swap on the head lost: someone appended meanwhile."""

    type = "stale-head"
    http_status = 409


class CorruptLedger(StorageError):
    type = "corrupt-ledger"

    def __init__(self, message: str = "", *, seq: int | None = None, cause: str | None = None) -> None:
        detail: dict[str, Any] = {}
        if seq is not None:
            detail["seq"] = seq
        if cause is not None:
            detail["cause"] = cause
        super().__init__(message, **detail)
        self.seq = seq
        self.cause = cause


class LedgerExists(StorageError):
    type = "ledger-exists"


class LedgerMissing(StorageError):
    type = "no-ledger"


# --- keys -------------------------------------------------------------------


class KeyMaterialError(WritError):
    type = "key-error"


class WrongPassphrase(KeyMaterialError):
    type = "wrong-passphrase"


class BadKeyFile(KeyMaterialError):
    type = "bad-key-file"


class TokenError(KeyMaterialError):
    type = "token-error"


class AgentError(KeyMaterialError):
    type = "agent-error"


class ShareError(KeyMaterialError):
    type = "bad-shares"


class BadSshKey(KeyMaterialError):
    """An OpenSSH key that is malformed or not ``ssh-ed25519`` (Writ grants Ed25519 keys only)."""

    type = "bad-ssh-key"


# --- transport and usage ----------------------------------------------------


class TransportError(WritError):
    type = "unreachable"
    http_status = 502


class HTTPStatusError(TransportError):
    type = "http-error"


class ResponseTooLarge(TransportError):
    type = "response-too-large"


class UsageError(WritError):
    type = "usage"


#: every rejection type name a record can be refused with, in table order.
RECORD_REJECTIONS: tuple[type[RecordRejected], ...] = (
    TooLarge,
    NotCanonical,
    UnsupportedVersion,
    UnknownKind,
    InvalidField,
    MisplacedGenesis,
    StaleHead,
    TimeRegression,
    UnauthorizedSigner,
    BadSignature,
    UnknownTarget,
    AlreadyRevoked,
    TimeInFuture,
)


def by_type(name: str) -> type[WritError] | None:
    """The error class whose stable ``type`` is ``name``.

    A record rejection wins over a same-named error elsewhere in the tree
    (``stale-head`` is :class:`StaleHead`, not the storage-level
    :class:`HeadConflict`)."""

    for cls in RECORD_REJECTIONS:
        if cls.type == name:
            return cls
    stack: list[type[WritError]] = [WritError]
    while stack:
        cls_ = stack.pop(0)
        if cls_.type == name:
            return cls_
        stack.extend(cls_.__subclasses__())
    return None
