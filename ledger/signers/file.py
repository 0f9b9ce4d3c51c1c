"""Passphrase-protected key files (``--key FILE``).

A key file is a small JSON document::

    {"format": "writ-key/v1", "public_key": hex, "kdf": "argon2id13",
     "opslimit": int, "memlimit": int, "salt": hex, "nonce": hex,
     "ciphertext": hex, "label": str, "checksum": hex}

The 32-byte Ed25519 seed is sealed with ``nacl.secret.SecretBox`` under a key
derived from the passphrase by Argon2id (libsodium's ``argon2id13``), whose
cost is stored in the file. ``checksum`` is the SHA-256 of the canonical JSON
of every other field: it tells a corrupted or hand-edited file
(:class:`~ledger.errors.BadKeyFile`) from a wrong passphrase
(:class:`~ledger.errors.WrongPassphrase`). It is not a MAC; authenticity comes
from the SecretBox tag and from the decrypted seed having to match
``public_key``, so no edit of the file can make it yield a different key
silently.

Loading refuses files that group or others may read or write, and cost
parameters outside ``[INTERACTIVE, SENSITIVE]`` (a tampered file can neither
make loading take hours and gigabytes nor downgrade the cost).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
from typing import Any, Final, Literal

import nacl.exceptions
import nacl.pwhash.argon2id as argon2id
import nacl.secret
import nacl.utils

from ..crypto import PUBLIC_KEY_SIZE, SEED_SIZE, SeedSigner
from ..errors import BadKeyFile, UsageError, WeakPassphrase, WrongPassphrase
from ..fileio import create_private

FORMAT: Final = "writ-key/v1"
KDF: Final = "argon2id13"
MAX_FILE_SIZE: Final = 64 * 1024
MAX_LABEL_LENGTH: Final = 256
#: the shortest passphrase a NEW key file accepts, in characters (existing files still open)
MIN_PASSPHRASE: Final = 8

Cost = Literal["interactive", "moderate", "sensitive"]

#: (opslimit, memlimit) for each named cost.
COSTS: Final[dict[str, tuple[int, int]]] = {
    "interactive": (argon2id.OPSLIMIT_INTERACTIVE, argon2id.MEMLIMIT_INTERACTIVE),
    "moderate": (argon2id.OPSLIMIT_MODERATE, argon2id.MEMLIMIT_MODERATE),
    "sensitive": (argon2id.OPSLIMIT_SENSITIVE, argon2id.MEMLIMIT_SENSITIVE),
}
OPSLIMIT_RANGE: Final = (argon2id.OPSLIMIT_INTERACTIVE, argon2id.OPSLIMIT_SENSITIVE)
MEMLIMIT_RANGE: Final = (argon2id.MEMLIMIT_INTERACTIVE, argon2id.MEMLIMIT_SENSITIVE)

_SALT_SIZE: Final = argon2id.SALTBYTES
_NONCE_SIZE: Final = nacl.secret.SecretBox.NONCE_SIZE
_CIPHERTEXT_SIZE: Final = SEED_SIZE + nacl.secret.SecretBox.MACBYTES
_FIELDS: Final = frozenset(
    {
        "format",
        "public_key",
        "kdf",
        "opslimit",
        "memlimit",
        "salt",
        "nonce",
        "ciphertext",
        "label",
        "checksum",
    }
)


class FileSigner(SeedSigner):
    """A key loaded from a key file. ``repr`` shows the path and public key only."""

    __slots__ = ("_label", "_path")

    def __init__(self, seed: bytes, *, path: str, label: str = "") -> None:
        super().__init__(seed)
        self._path = path
        self._label = label

    @property
    def path(self) -> str:
        return self._path

    @property
    def label(self) -> str:
        return self._label

    def __repr__(self) -> str:
        return f"FileSigner(path={self._path!r}, public_key={self.public_key.hex()})"


def _canonical(fields: dict[str, Any]) -> bytes:
    body = {k: v for k, v in fields.items() if k != "checksum"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _checksum(fields: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical(fields)).hexdigest()


def _check_label(label: object) -> str:
    if not isinstance(label, str) or len(label) > MAX_LABEL_LENGTH:
        raise BadKeyFile(f"label must be a string of at most {MAX_LABEL_LENGTH} characters")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in label):
        raise BadKeyFile("label must not contain control characters")
    return label


def write_key_file(
    path: str | os.PathLike[str],
    signer_or_seed: SeedSigner | bytes,
    passphrase: bytes,
    *,
    cost: Cost = "moderate",
    label: str = "",
) -> bytes:
    """Seal a key under ``passphrase`` into a new 0600 file at ``path``; return its public key.

    Refuses an existing path (:class:`UsageError`), an empty passphrase
    (:class:`UsageError`), one shorter than :data:`MIN_PASSPHRASE` characters
    (:class:`WeakPassphrase`) and an unknown ``cost``.
    """

    seed = signer_or_seed.seed() if isinstance(signer_or_seed, SeedSigner) else signer_or_seed
    if not isinstance(seed, bytes) or len(seed) != SEED_SIZE:
        raise UsageError("an Ed25519 seed is 32 bytes")
    if not isinstance(passphrase, bytes) or not passphrase:
        raise UsageError("refusing an empty passphrase for a key file")
    if len(passphrase.decode("utf-8", errors="replace")) < MIN_PASSPHRASE:
        raise WeakPassphrase(f"a key file's passphrase needs at least {MIN_PASSPHRASE} characters")
    if cost not in COSTS:
        raise UsageError(f"unknown key file cost {cost!r}: one of {', '.join(COSTS)}")
    try:
        _check_label(label)
    except BadKeyFile as e:
        raise UsageError(e.message) from None
    opslimit, memlimit = COSTS[cost]
    public_key = SeedSigner(seed).public_key
    salt = nacl.utils.random(_SALT_SIZE)
    nonce = nacl.utils.random(_NONCE_SIZE)
    key = argon2id.kdf(nacl.secret.SecretBox.KEY_SIZE, passphrase, salt, opslimit=opslimit, memlimit=memlimit)
    ciphertext = nacl.secret.SecretBox(key).encrypt(seed, nonce).ciphertext
    doc: dict[str, Any] = {
        "format": FORMAT,
        "public_key": public_key.hex(),
        "kdf": KDF,
        "opslimit": opslimit,
        "memlimit": memlimit,
        "salt": salt.hex(),
        "nonce": nonce.hex(),
        "ciphertext": ciphertext.hex(),
        "label": label,
    }
    doc["checksum"] = _checksum(doc)
    data = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("utf-8")

    target = os.fspath(path)
    create_private(target, data, error=BadKeyFile, what="key file ")
    return public_key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise BadKeyFile(f"duplicate field {k!r}")
        out[k] = v
    return out


def _hex_field(doc: dict[str, Any], name: str, size: int) -> bytes:
    value = doc[name]
    if not isinstance(value, str) or len(value) != 2 * size:
        raise BadKeyFile(f"{name} must be {size} bytes of hex")
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise BadKeyFile(f"{name} is not hex") from None
    if raw.hex() != value:  # lower case only: one spelling per file
        raise BadKeyFile(f"{name} must be lower-case hex")
    return raw


def _int_field(doc: dict[str, Any], name: str, bounds: tuple[int, int]) -> int:
    value = doc[name]
    if type(value) is not int:
        raise BadKeyFile(f"{name} must be an integer")
    lo, hi = bounds
    if not lo <= value <= hi:
        raise BadKeyFile(f"{name} {value} is outside the accepted range [{lo}, {hi}]")
    return value


def _read(path: str | os.PathLike[str]) -> tuple[str, dict[str, Any]]:
    """Open, check permissions, parse and validate a key file (no passphrase needed)."""

    target = os.fspath(path)
    try:
        fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise BadKeyFile(f"no key file at {target}") from None
    except OSError as e:
        raise BadKeyFile(f"cannot open key file {target}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BadKeyFile(f"{target} is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise BadKeyFile(
                f"key file {target} is accessible by group or others (mode {mode:04o});"
                f" run: chmod 600 {target}"
            )
        if st.st_size > MAX_FILE_SIZE:
            raise BadKeyFile(f"key file {target} is larger than {MAX_FILE_SIZE} bytes")
        with os.fdopen(os.dup(fd), "rb") as fh:
            data = fh.read(MAX_FILE_SIZE + 1)
    except OSError as e:
        raise BadKeyFile(f"cannot read key file {target}: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_SIZE:
        raise BadKeyFile(f"key file {target} is larger than {MAX_FILE_SIZE} bytes")
    try:
        doc = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except BadKeyFile as e:
        raise BadKeyFile(f"{target}: {e.message}") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BadKeyFile(f"{target} is not a JSON key file") from None
    if not isinstance(doc, dict):
        raise BadKeyFile(f"{target} is not a JSON object")
    if doc.get("format") != FORMAT:
        raise BadKeyFile(f"{target} is not a {FORMAT} key file")
    if set(doc) != _FIELDS:
        missing = sorted(_FIELDS - set(doc))
        extra = sorted(set(doc) - _FIELDS)
        raise BadKeyFile(f"{target}: missing fields {missing}, unknown fields {extra}")
    try:
        if doc["kdf"] != KDF:
            raise BadKeyFile(f"unsupported kdf {doc['kdf']!r}")
        _int_field(doc, "opslimit", OPSLIMIT_RANGE)
        _int_field(doc, "memlimit", MEMLIMIT_RANGE)
        for name, size in (
            ("public_key", PUBLIC_KEY_SIZE),
            ("salt", _SALT_SIZE),
            ("nonce", _NONCE_SIZE),
            ("ciphertext", _CIPHERTEXT_SIZE),
            ("checksum", 32),
        ):
            _hex_field(doc, name, size)
        _check_label(doc["label"])
    except BadKeyFile as e:
        raise BadKeyFile(f"{target}: {e.message}") from None
    if not hmac.compare_digest(doc["checksum"], _checksum(doc)):
        raise BadKeyFile(f"{target} has been modified or corrupted (checksum mismatch)")
    return target, doc


def read_public_key(path: str | os.PathLike[str]) -> bytes:
    """The public key recorded in a key file, without the passphrase.

    Only as trustworthy as the file: :func:`load_key_file` checks it against
    the decrypted seed.
    """

    _, doc = _read(path)
    return bytes.fromhex(doc["public_key"])


def load_key_file(path: str | os.PathLike[str], passphrase: bytes) -> FileSigner:
    """Decrypt a key file.

    Raises :class:`WrongPassphrase` when the passphrase does not open it and
    :class:`BadKeyFile` when the file is unreadable by policy (mode), malformed,
    edited, or decrypts to a key other than its recorded public key.
    """

    if not isinstance(passphrase, bytes):
        raise UsageError("the passphrase is bytes")
    target, doc = _read(path)
    if not passphrase:
        raise WrongPassphrase(f"an empty passphrase cannot open {target}")
    try:
        key = argon2id.kdf(
            nacl.secret.SecretBox.KEY_SIZE,
            passphrase,
            bytes.fromhex(doc["salt"]),
            opslimit=doc["opslimit"],
            memlimit=doc["memlimit"],
        )
    except nacl.exceptions.CryptoError:
        raise BadKeyFile(f"key derivation for {target} failed (not enough memory?)") from None
    try:
        seed = nacl.secret.SecretBox(key).decrypt(
            bytes.fromhex(doc["ciphertext"]), bytes.fromhex(doc["nonce"])
        )
    except nacl.exceptions.CryptoError:
        raise WrongPassphrase(f"the passphrase does not open {target}") from None
    signer = FileSigner(seed, path=target, label=doc["label"])
    if not hmac.compare_digest(signer.public_key, bytes.fromhex(doc["public_key"])):
        raise BadKeyFile(f"{target} decrypts to a key other than its recorded public key")
    return signer
