"""Ed25519 with domain separation (docs/protocol.md, "Signatures and domain separation").

Every signed message in Writ starts with its own prefix, so a signature made
for one kind of message can never be replayed as another. Verification raises
:class:`~ledger.errors.BadSignature` (or the error class the caller names);
it never returns a bool. ``VerifyKey`` objects are cached because the same
few keys (the root, a revoker, the log) verify almost every message.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from functools import lru_cache
from typing import Protocol, runtime_checkable

import nacl.exceptions
import nacl.signing

from .errors import BadSignature, InvalidField, VerificationError

RECORD_DOMAIN = b"writ/record/v1\n"
AUTH_DOMAIN = b"writ/auth/v1\n"
RECEIPT_DOMAIN = b"writ/receipt/v1\n"
ENROLL_DOMAIN = b"writ/enroll/v1\n"

PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64
SEED_SIZE = 32


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


@runtime_checkable
class Signer(Protocol):
    """Anything that holds an Ed25519 private key and signs raw messages.

    Implementations: :class:`SeedSigner` (in memory), and the backends in
    :mod:`ledger.signers` (key file, PKCS#11 token, ssh-agent). ``sign``
    receives the complete message, domain prefix included.
    """

    @property
    def public_key(self) -> bytes: ...

    def sign(self, message: bytes) -> bytes: ...


class SeedSigner:
    """An in-memory Ed25519 key (a 32-byte seed). ``repr`` never shows it."""

    __slots__ = ("_key", "_public")

    def __init__(self, seed: bytes) -> None:
        if len(seed) != SEED_SIZE:
            raise InvalidField("an Ed25519 seed is 32 bytes")
        self._key = nacl.signing.SigningKey(seed)
        self._public = bytes(self._key.verify_key)

    @classmethod
    def generate(cls) -> SeedSigner:
        return cls(bytes(nacl.signing.SigningKey.generate()))

    @property
    def public_key(self) -> bytes:
        return self._public

    def seed(self) -> bytes:
        """The private seed: only for writing the key's own 0600 file."""
        return bytes(self._key)

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message).signature

    def __repr__(self) -> str:
        return f"SeedSigner(public_key={self._public.hex()})"


def sign(signer: Signer, domain: bytes, message: bytes) -> bytes:
    sig = signer.sign(domain + message)
    if len(sig) != SIGNATURE_SIZE:
        raise BadSignature("the signer returned a signature that is not 64 bytes")
    return sig


@lru_cache(maxsize=4096)
def verify_key(public_key: bytes) -> nacl.signing.VerifyKey:
    if len(public_key) != PUBLIC_KEY_SIZE:
        raise BadSignature("an Ed25519 public key is 32 bytes")
    return nacl.signing.VerifyKey(public_key)


def check(public_key: bytes, domain: bytes, message: bytes, signature: bytes) -> bool:
    """True when ``signature`` verifies. For batch pre-verification only:
    rules call :func:`verify`, which raises."""

    if len(signature) != SIGNATURE_SIZE or len(public_key) != PUBLIC_KEY_SIZE:
        return False
    try:
        verify_key(public_key).verify(domain + message, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError, TypeError):
        return False
    return True


def verify(
    public_key: bytes,
    domain: bytes,
    message: bytes,
    signature: bytes,
    *,
    error: type[VerificationError] = BadSignature,
    what: str = "signature",
) -> None:
    """Verify or raise ``error`` (BadSignature by default)."""

    if not check(public_key, domain, message, signature):
        raise error(f"{what} does not verify under key {public_key.hex()[:16]}…")


def check_batch(items: Sequence[tuple[bytes, bytes, bytes, bytes] | None]) -> list[bool]:
    """:func:`check` over a list (None: nothing to check, False). A module-level
    function, so a process pool can run it as well as a thread pool."""
    return [check(*it) if it is not None else False for it in items]


def check_many(
    items: Sequence[tuple[bytes, bytes, bytes, bytes]],
    executor: Executor | None = None,
    chunk: int = 256,
) -> list[bool]:
    """Check (public_key, domain, message, signature) tuples, in parallel threads.

    PyNaCl releases the GIL inside libsodium, so a thread pool uses every core.
    """

    if executor is None or len(items) < 2 * chunk:
        return [check(*it) for it in items]

    def run(part: Sequence[tuple[bytes, bytes, bytes, bytes]]) -> list[bool]:
        return [check(*it) for it in part]

    futures = [executor.submit(run, items[i : i + chunk]) for i in range(0, len(items), chunk)]
    out: list[bool] = []
    for f in futures:
        out.extend(f.result())
    return out


def verify_rate(items: Sequence[tuple[bytes, bytes, bytes, bytes]], threads: int = 1) -> float:
    """Verifications per second of ``items`` with ``threads`` threads: what this
    machine can do now (the fleet's lower bound and the benchmarks measure it so)."""
    if threads <= 1:
        t0 = time.perf_counter()
        for it in items:
            check(*it)
        return len(items) / (time.perf_counter() - t0)
    with ThreadPoolExecutor(threads) as pool:
        t0 = time.perf_counter()
        check_many(items, pool, chunk=512)
        return len(items) / (time.perf_counter() - t0)
