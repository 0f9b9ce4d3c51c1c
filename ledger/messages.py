"""The other signed messages (docs/protocol.md, "Credentials on a device", "Receipts",
"Enrollment requests", "Sync bundles").

Each has a body, a distinct domain prefix, and a strict decoder that raises
:class:`~ledger.errors.BadMessage`. Bytes come in, frozen values go out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import crypto, encoding
from .errors import BadMessage, BadSignature

MAX_MESSAGE = 2048
MAX_BUNDLE_RECORDS = 100_000


def _outer(data: bytes, what: str) -> tuple[bytes, bytes, list[Any]]:
    if type(data) is not bytes or len(data) > MAX_MESSAGE:
        raise BadMessage(f"{what} is not bytes of at most {MAX_MESSAGE}")
    outer = encoding.unpack_array(data, min_len=2, max_len=2, error=BadMessage)
    body, sig = outer
    if type(body) is not bytes or type(sig) is not bytes or len(sig) != 64:
        raise BadMessage(f"{what} is [body: bin, signature: bin(64)]")
    fields = encoding.unpack_array(body, min_len=1, error=BadMessage)
    if fields[0] != 1 or type(fields[0]) is not int:
        raise BadMessage(f"{what} version must be 1")
    return body, sig, fields


def _key(what: str, v: object) -> bytes:
    if type(v) is not bytes or len(v) != 32:
        raise BadMessage(f"{what} must be 32 bytes")
    return v


def _uint(what: str, v: object) -> int:
    if type(v) is not int:
        raise BadMessage(f"{what} must be an unsigned integer")
    return v


# --- auth (section 4) -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Auth:
    grant_record: bytes
    body: bytes
    verifier_key: bytes
    challenge: bytes
    time: int
    signature: bytes

    def verify(self, subject: bytes) -> None:
        crypto.verify(subject, crypto.AUTH_DOMAIN, self.body, self.signature, what="auth signature")


def make_auth(
    grant_record: bytes, signer: crypto.Signer, verifier_key: bytes, challenge: bytes, time: int
) -> bytes:
    body = encoding.pack([1, verifier_key, challenge, time])
    sig = crypto.sign(signer, crypto.AUTH_DOMAIN, body)
    return encoding.pack([grant_record, body, sig])


def parse_auth(data: bytes) -> Auth:
    if type(data) is not bytes or len(data) > MAX_MESSAGE:
        raise BadMessage("auth message too large")
    outer = encoding.unpack_array(data, min_len=3, max_len=3, error=BadMessage)
    grant, body, sig = outer
    if type(grant) is not bytes or type(body) is not bytes or type(sig) is not bytes or len(sig) != 64:
        raise BadMessage("auth is [grant_record: bin, auth_body: bin, sig: bin(64)]")
    f = encoding.unpack_array(body, min_len=4, max_len=4, error=BadMessage)
    if f[0] != 1:
        raise BadMessage("auth version must be 1")
    return Auth(grant, body, _key("verifier_key", f[1]), _key("challenge", f[2]), _uint("time", f[3]), sig)


# --- receipt (section 6) ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Receipt:
    raw: bytes
    device_grant_seq: int
    size: int
    root: bytes
    time: int
    body: bytes
    signature: bytes

    def verify(self, device_key: bytes) -> None:
        crypto.verify(device_key, crypto.RECEIPT_DOMAIN, self.body, self.signature, what="receipt signature")


def make_receipt(signer: crypto.Signer, grant_seq: int, size: int, root: bytes, time: int) -> bytes:
    body = encoding.pack([1, grant_seq, size, root, time])
    return encoding.pack([body, crypto.sign(signer, crypto.RECEIPT_DOMAIN, body)])


def parse_receipt(data: bytes) -> Receipt:
    body, sig, f = _outer(data, "receipt")
    if len(f) != 5:
        raise BadMessage("receipt body has 5 elements")
    return Receipt(
        data,
        _uint("device_grant_seq", f[1]),
        _uint("size", f[2]),
        _key("root", f[3]),
        _uint("time", f[4]),
        body,
        sig,
    )


# --- enrollment (section 7) -------------------------------------------------


@dataclass(frozen=True, slots=True)
class Enroll:
    subject: bytes
    name: str
    time: int


def make_enroll(signer: crypto.Signer, name: str, time: int) -> bytes:
    body = encoding.pack([1, signer.public_key, name, time])
    return encoding.pack([body, crypto.sign(signer, crypto.ENROLL_DOMAIN, body)])


def parse_enroll(data: bytes) -> Enroll:
    """Decode and verify an enrollment request: the signature is the proof of
    possession of the subject key."""

    body, sig, f = _outer(data, "enrollment request")
    if len(f) != 4 or type(f[2]) is not str:
        raise BadMessage("enrollment body is [1, subject, name, time]")
    subject = _key("subject", f[1])
    try:
        crypto.verify(subject, crypto.ENROLL_DOMAIN, body, sig, what="enrollment signature")
    except BadSignature:
        raise BadMessage("the enrollment request is not signed by its subject key") from None
    return Enroll(subject, f[2], _uint("time", f[3]))


# --- sync bundle (section 7) ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Bundle:
    start: int
    records: tuple[bytes, ...]
    checkpoint: str


def make_bundle(start: int, records: list[bytes], checkpoint: str) -> bytes:
    return encoding.pack([1, start, records, checkpoint])


def parse_bundle(data: bytes, *, max_records: int = MAX_BUNDLE_RECORDS) -> Bundle:
    if type(data) is not bytes or len(data) > max_records * 700 + 65536:
        raise BadMessage("bundle too large")
    f = encoding.unpack_array(data, min_len=4, max_len=4, max_depth=2, error=BadMessage)
    if f[0] != 1:
        raise BadMessage("bundle version must be 1")
    start = _uint("start", f[1])
    recs = f[2]
    if type(recs) is not list or len(recs) > max_records or any(type(r) is not bytes for r in recs):
        raise BadMessage("bundle records must be an array of bin")
    if type(f[3]) is not str:
        raise BadMessage("bundle checkpoint must be text")
    return Bundle(start, tuple(recs), f[3])
