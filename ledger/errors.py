"""The one exception tree of Writ.

Every failure that a user can cause or observe is an instance of
:class:`WritError`, and every class carries a stable ``type`` name. That name is
the same everywhere: the ``expect`` strings of the protocol vectors, the last
path segment of the HTTP problem+json ``type``, and the ``error`` field of the
CLI's JSON output. Verification code raises one of these, never returns a
bare bool.

    WritError                              (type "error")
    ├── VerificationError                  bytes failed a protocol rule
    │   ├── RecordRejected                 a rule of docs/protocol.md, "Validity rules" (carries .seq)
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
    │   │   ├── WrongAnchor                wrong-anchor (a genesis whose root is not the anchor: a
    │   │   │                              configuration mistake, reported before the signature rule)
    │   │   ├── UnknownTarget              unknown-target
    │   │   ├── AlreadyRevoked             already-revoked
    │   │   └── TimeInFuture               time-in-future
    │   ├── BadMessage                     bad-message (auth, receipt, enroll, bundle)
    │   ├── BadProof                       bad-proof (inclusion / consistency)
    │   ├── BadNote                        bad-note (signed note / verifier key syntax)
    │   ├── BadTilePath                    bad-tile-path (no such tlog-tiles path; HTTP 404)
    │   ├── UnknownDevice                  unknown-device (a receipt not from an unrevoked device grant)
    │   ├── UnknownHead                    unknown-head (a receipt's size/root is not a head of the ledger)
    │   ├── WrongLedger                    wrong-ledger (a fresh device given another ledger's bundle)
    │   └── CheckpointRejected             a checkpoint the verifier must not accept
    │       ├── UntrustedCheckpoint        untrusted-checkpoint (no valid granted log signature)
    │       ├── WrongOrigin                wrong-origin
    │       ├── Rollback                   rollback (size went back)
    │       ├── Fork                       fork (same size, other root; or root != computed tree)
    │       ├── TimestampRegression        timestamp-regression
    │       ├── FutureCheckpoint           future-checkpoint (timestamp > 300 s ahead of the verifier)
    │       ├── MissingCosignatures        missing-cosignatures (fewer than k witnesses)
    │       ├── UnknownLog                 unknown-log (witness: an origin it does not witness; 404)
    │       └── WitnessConflict            witness-conflict (witness: old size not its latest; 409, .size)
    ├── StorageError                       storage-error
    │   ├── HeadConflict                   stale-head (compare-and-swap lost; also a StaleHead)
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
    ├── Declined                           declined (the operator answered no: nothing signed or sent)
    ├── UsageError                         usage (bad flags, bad hex)
    │   ├── UnknownName                    unknown-name (no grant of that name)
    │   ├── AmbiguousName                  ambiguous-name (several unrevoked grants of that name)
    │   ├── UnknownRole                    unknown-role (a role outside the protocol's list, no --custom-role)
    │   ├── BadValidity                    bad-validity (not_after past, > 100 years, <= not_before)
    │   ├── WeakPassphrase                 weak-passphrase (a new key file's passphrase under 8 characters)
    │   └── MissingSuccessor               no-successor-choice (neither --shares nor --no-successor)
    ├── IOFailure                          io-error (a local file could not be read or written)
    ├── NotWitnessed                       not-witnessed (appended, but not cosigned in time)
    └── Interrupted                        interrupted (Ctrl-C)

Names that are not exceptions are members of a ``StrEnum`` here, so that
every name a program emits is declared once: :class:`CredentialRefusal` (why
a device refuses a credential, in precedence order) and :class:`HttpProblem`
(the HTTP-level problem types of the server and of nginx in front of it).
:func:`registered_names` is the set of all of them.

Messages never contain secret material: constructors take descriptions, not
keys.
"""

from __future__ import annotations

from enum import StrEnum
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
    """A record failed a rule of docs/protocol.md, "Validity rules"."""

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


class WrongAnchor(RecordRejected):
    """A genesis whose ``root`` is not the verifier's anchor: the wrong anchor was
    configured or the wrong server was asked, which is not tampering. Checked
    before the signature rule (which would otherwise report ``bad-signature``)."""

    type = "wrong-anchor"


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


class WrongLedger(VerificationError):
    """A device with no records given the bundle of another ledger (a genesis
    of another root or origin): a stick made for another site, not tampering.
    The message names both ledgers."""

    type = "wrong-ledger"


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


class FutureCheckpoint(CheckpointRejected):
    """A checkpoint timestamp more than 300 s ahead of the verifier's clock (protocol revision
    1.1, docs/protocol.md, "Checkpoints")."""

    type = "future-checkpoint"


class MissingCosignatures(CheckpointRejected):
    type = "missing-cosignatures"


class UnknownLog(CheckpointRejected):
    """A witness was sent a checkpoint of an origin it does not witness."""

    type = "unknown-log"
    http_status = 404


class WitnessConflict(CheckpointRejected):
    """tlog-witness: the old size is not the size the witness last cosigned (``detail["size"]``)."""

    type = "witness-conflict"
    http_status = 409

    @property
    def size(self) -> int:
        size = self.detail.get("size")
        return size if type(size) is int else 0


# --- storage ----------------------------------------------------------------


class StorageError(WritError):
    type = "storage-error"
    http_status = 503


class HeadConflict(StaleHead, StorageError):
    """The compare-and-swap on the head lost: someone appended meanwhile. On
    the wire it is the protocol's ``409 stale-head``."""

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


class Declined(WritError):
    """The operator was shown what would be signed and answered no."""

    type = "declined"


class UsageError(WritError):
    type = "usage"


class UnknownName(UsageError):
    """No grant has the name given (``--name``)."""

    type = "unknown-name"


class AmbiguousName(UsageError):
    """Several unrevoked grants have the name given: name one by seq."""

    type = "ambiguous-name"


class IOFailure(WritError):
    """A local file could not be read or written (``OSError`` at the edge)."""

    type = "io-error"


class NotWitnessed(WritError):
    """``--wait-witnessed``: the record is appended, but the ledger's witnesses did not
    cosign it in time (or the ledger grants no witness to wait for)."""

    type = "not-witnessed"


class Interrupted(WritError):
    """The user interrupted the command (SIGINT)."""

    type = "interrupted"


class UnknownRole(UsageError):
    """A grant of a role outside the protocol's list, without ``--custom-role`` (a misspelling)."""

    type = "unknown-role"


class BadValidity(UsageError):
    """A validity window nobody means: not_after in the past, more than 100 years ahead (a
    millisecond timestamp), or not after not_before."""

    type = "bad-validity"


class WeakPassphrase(UsageError):
    """A new key file's passphrase shorter than the minimum."""

    type = "weak-passphrase"


class MissingSuccessor(UsageError):
    """A new root without an explicit successor choice (``--shares K-of-N`` or ``--no-successor``)."""

    type = "no-successor-choice"


# --- names that are not exceptions ------------------------------------------------


class CredentialRefusal(StrEnum):
    """Why a device refuses a credential (``device check``'s ``reason``), in the
    order of precedence when several apply."""

    BAD_CHALLENGE = "bad-challenge"
    CLOCK_SKEW = "clock-skew"
    BAD_SIGNATURE = "bad-signature"
    UNPUBLISHED = "unpublished"
    REVOKED = "revoked"
    REVOKED_KEY = "revoked-key"
    EXPIRED = "expired"
    NOT_YET_VALID = "not-yet-valid"
    WRONG_ROLE = "wrong-role"
    OUT_OF_SCOPE = "out-of-scope"
    STALE = "stale"


class HttpProblem(StrEnum):
    """HTTP-level problem types (not protocol rejections): the server's and nginx's."""

    BAD_REQUEST = "bad-request"
    NOT_FOUND = "not-found"
    METHOD_NOT_ALLOWED = "method-not-allowed"
    REQUEST_TIMEOUT = "request-timeout"
    PAYLOAD_TOO_LARGE = "payload-too-large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported-media-type"
    RATE_LIMITED = "rate-limited"
    OVERLOADED = "overloaded"
    SHUTTING_DOWN = "shutting-down"
    UNAVAILABLE = "unavailable"  # nginx: the server does not answer
    INTERNAL = "internal"


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

    A record rejection wins over a same-named subclass elsewhere in the tree
    (``stale-head`` is :class:`StaleHead`, not its storage-level subtype
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


def error_classes() -> list[type[WritError]]:
    """Every class of the tree (those defined by importers included), root first."""
    out: list[type[WritError]] = []
    stack: list[type[WritError]] = [WritError]
    while stack:
        cls = stack.pop(0)
        if cls not in out:
            out.append(cls)
            stack.extend(cls.__subclasses__())
    return out


def registered_names() -> frozenset[str]:
    """Every error name a program may emit: the classes' ``type`` names and the
    members of :class:`CredentialRefusal` and :class:`HttpProblem`."""
    names = {cls.type for cls in error_classes()}
    names.update(CredentialRefusal)
    names.update(HttpProblem)
    return frozenset(names)
