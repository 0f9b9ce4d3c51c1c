"""SLIP-39 shares of a root successor seed (``writ root init --shares k-of-n``).

One group, ``k``-of-``n`` member shares, each a mnemonic of 33 words for a
32-byte seed. SLIP-39 with a wrong passphrase silently yields a *different*
secret, so :func:`recover_successor` checks the recovered public key against
the committed ``next_root_digest`` (SHA-256 of the successor public key)
before handing back a signer.

Error messages never quote share words: they name shares by their position
in the list the caller gave.
"""

from __future__ import annotations

import hmac
import re
import textwrap
from collections.abc import Sequence
from typing import Final

import shamir_mnemonic
from shamir_mnemonic import MnemonicError, Share

from ..crypto import SEED_SIZE, SeedSigner, sha256
from ..errors import ShareError, UsageError

MAX_SHARES: Final = 16
#: PBKDF2 iteration exponent of SLIP-39's Feistel cipher (10000 * 2**e rounds of work).
ITERATION_EXPONENT: Final = 1

_THRESHOLD = re.compile(r"([1-9][0-9]?)-of-([1-9][0-9]?)")


def parse_threshold(text: str) -> tuple[int, int]:
    """``"2-of-3"`` -> ``(2, 3)``. Strict: ``1 <= k <= n <= 16``, and ``k == 1`` only for 1-of-1
    (SLIP-39 forbids several shares that each alone recover the secret)."""

    m = _THRESHOLD.fullmatch(text)
    if m is None:
        raise UsageError(f"threshold must look like 2-of-3, not {text!r}")
    k, n = int(m.group(1)), int(m.group(2))
    if n > MAX_SHARES:
        raise UsageError(f"at most {MAX_SHARES} shares")
    if k > n:
        raise UsageError(f"threshold {k} is more than the {n} shares")
    if k == 1 and n > 1:
        raise UsageError("1-of-n would make every share a full copy of the key: use k >= 2 or 1-of-1")
    return k, n


def _check_passphrase(passphrase: bytes) -> None:
    if not all(32 <= c <= 126 for c in passphrase):
        raise UsageError("a SLIP-39 passphrase must be printable ASCII")


def split_secret(seed: bytes, threshold: int, count: int, passphrase: bytes = b"") -> list[str]:
    """Split ``seed`` into ``count`` mnemonics, any ``threshold`` of which recover it."""

    if not isinstance(seed, bytes) or len(seed) != SEED_SIZE:
        raise UsageError("the secret to split is a 32-byte seed")
    parse_threshold(f"{threshold}-of-{count}")
    _check_passphrase(passphrase)
    groups = shamir_mnemonic.generate_mnemonics(
        1, [(threshold, count)], seed, passphrase, extendable=True, iteration_exponent=ITERATION_EXPONENT
    )
    shares: list[str] = groups[0]
    return shares


def _normalise(mnemonic: str) -> str:
    return " ".join(mnemonic.lower().split())


def _decode(mnemonics: Sequence[str]) -> list[Share]:
    if isinstance(mnemonics, str):
        raise ShareError("give a list of share mnemonics, not one string")
    if not mnemonics:
        raise ShareError("no shares given")
    decoded: list[Share] = []
    seen: dict[int, Share] = {}
    for position, mnemonic in enumerate(mnemonics, start=1):
        if not isinstance(mnemonic, str):
            raise ShareError(f"share {position} is not text")
        try:
            share = Share.from_mnemonic(_normalise(mnemonic))
        except (MnemonicError, ValueError, KeyError, IndexError):
            raise ShareError(
                f"share {position} is not a valid SLIP-39 share (unknown word, wrong length "
                "or checksum mismatch: check the words against the sheet)"
            ) from None
        if decoded and share.common_parameters() != decoded[0].common_parameters():
            raise ShareError(
                f"share {position} belongs to a different set of shares than share 1 (mixed sets)"
            )
        if share.group_threshold != 1 or share.group_count != 1:
            raise ShareError(f"share {position} is from a multi-group SLIP-39 backup, not a Writ share set")
        previous = seen.get(share.index)
        if previous is not None:
            if previous != share:
                raise ShareError(f"share {position} has the same member number as another, different share")
            continue  # the same share twice: count it once
        seen[share.index] = share
        decoded.append(share)
    return decoded


def recover_secret(mnemonics: Sequence[str], passphrase: bytes = b"") -> bytes:
    """Combine shares into the secret. A wrong passphrase yields a different secret:
    use :func:`recover_successor` when a digest to check against is known."""

    shares = _decode(mnemonics)
    need = shares[0].member_threshold
    if len(shares) < need:
        raise ShareError(
            f"too few shares: {need} distinct shares of this set are needed, {len(shares)} given"
        )
    if len(shares) > need:
        shares = shares[:need]  # any k of the set recover it; extra shares add nothing
    _check_passphrase(passphrase)
    try:
        secret: bytes = shamir_mnemonic.combine_mnemonics([s.mnemonic() for s in shares], passphrase)
    except (MnemonicError, ValueError):
        raise ShareError(
            "the shares do not combine (their shared-secret digest does not check): "
            "one of them is altered or from another split"
        ) from None
    return secret


def recover_successor(mnemonics: Sequence[str], passphrase: bytes, expected_digest: bytes) -> SeedSigner:
    """Recover the successor seed and check SHA-256 of its public key against ``expected_digest``."""

    if not isinstance(expected_digest, bytes) or len(expected_digest) != 32:
        raise UsageError("the expected digest is 32 bytes (SHA-256 of the successor public key)")
    seed = recover_secret(mnemonics, passphrase)
    if len(seed) != SEED_SIZE:
        raise ShareError(f"the shares hold a {len(seed)}-byte secret, not a 32-byte Ed25519 seed")
    signer = SeedSigner(seed)
    if not hmac.compare_digest(sha256(signer.public_key), expected_digest):
        raise ShareError(
            "the recovered key does not match the committed successor digest "
            f"{expected_digest.hex()[:16]}…: wrong passphrase, or shares of another key"
        )
    return signer


def share_sheet(share: str, index: int, k: int, n: int, anchor_hex: str, successor_digest_hex: str) -> str:
    """A plain-text sheet for the custodian of share ``index`` (1-based) of a ``k``-of-``n`` set."""

    parse_threshold(f"{k}-of-{n}")
    if not 1 <= index <= n:
        raise UsageError(f"share number {index} is not in 1..{n}")
    for name, value in (("anchor", anchor_hex), ("successor digest", successor_digest_hex)):
        if not re.fullmatch(r"[0-9a-f]{64}", value):
            raise UsageError(f"the {name} is 32 bytes of lower-case hex")
    decoded = _decode([share])[0]
    if decoded.member_threshold != k:
        raise UsageError(f"this share needs {decoded.member_threshold} shares, not {k}")
    words = _normalise(share).split()
    rows = (len(words) + 2) // 3
    cells = [f"{i + 1:2d}. {w:<10}" for i, w in enumerate(words)]
    grid = "\n".join(
        "    " + "  ".join(cells[r + c * rows] for c in range(3) if r + c * rows < len(cells)).rstrip()
        for r in range(rows)
    )

    def para(text: str) -> str:
        return textwrap.fill(text, width=72)

    return (
        f"WRIT ROOT SUCCESSOR KEY - SHARE {index} OF {n}\n"
        f"{'=' * 72}\n\n"
        + para(
            "This sheet holds one SLIP-39 share of the successor root key of a Writ "
            "revocation ledger. The key can take over the ledger's root if the current "
            "root key is lost. Keep this sheet offline and private: do not photograph, "
            "scan or type it anywhere except during a recovery."
        )
        + "\n\n"
        + f"  Shares needed to recover: {k} of {n}\n"
        + f"  This share: number {index}\n"
        + f"  Ledger anchor (the root public key the ledger started from):\n      {anchor_hex}\n"
        + f"  Successor key digest (SHA-256 of the successor public key):\n      {successor_digest_hex}\n\n"
        + para(
            f"Recovery: {k} custodians enter their words into `writ root recover`. The recovered "
            "key is accepted only if the SHA-256 digest of its public key equals the successor "
            "key digest above; any other result means a wrong word, a wrong passphrase or a "
            "share of another set."
        )
        + "\n\n"
        + f"Words ({len(words)}):\n\n{grid}\n"
    )
