"""OpenSSH encodings of Ed25519 keys: pure bytes and text in, values out.

A Writ grant's subject is a raw 32-byte Ed25519 public key, which is exactly
what an OpenSSH ``ssh-ed25519`` key holds, so the ledger can name a
technician's existing SSH key and a device can hand sshd the keys it accepts.

- the key blob (RFC 8709): ``string "ssh-ed25519" || string key``;
- a public key line (``authorized_keys``, ``*.pub``, ``ssh-add -L``):
  ``ssh-ed25519 <base64 blob> [comment]``;
- the ``SHA256:`` fingerprint that ``ssh-keygen -l`` prints;
- an unencrypted ``openssh-key-v1`` private key file holding one Ed25519 key
  (what ``ssh-keygen -t ed25519 -N ''`` writes and ``ssh -i`` reads).

Only Ed25519: every other key type is refused with
:class:`~ledger.errors.BadSshKey` naming the type it found.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import secrets
import struct
from typing import Final, NamedTuple

from .errors import BadSshKey

__all__ = [
    "KEY_TYPE",
    "SshPublicKey",
    "fingerprint",
    "format_private_key",
    "format_public_key",
    "key_blob",
    "parse_blob",
    "parse_private_key",
    "parse_public_key",
    "parse_public_key_file",
]

KEY_TYPE: Final = b"ssh-ed25519"
_KEY_SIZE: Final = 32
_MAGIC: Final = b"openssh-key-v1\x00"
_BEGIN: Final = "-----BEGIN OPENSSH PRIVATE KEY-----"
_END: Final = "-----END OPENSSH PRIVATE KEY-----"
#: a public key line longer than this is not an Ed25519 key (RSA-16384 lines are ~2.8 KB).
MAX_LINE: Final = 16 * 1024
MAX_PRIVATE_FILE: Final = 16 * 1024
_OTHER_TYPES: Final = ("ssh-rsa", "ssh-dss", "ecdsa-sha2-", "sk-", "ssh-ed448", "rsa-sha2-")


#: string "ssh-ed25519" || uint32 32: every Ed25519 key blob starts so.
_BLOB_PREFIX: Final = struct.pack(">I", len(KEY_TYPE)) + KEY_TYPE + struct.pack(">I", _KEY_SIZE)


class SshPublicKey(NamedTuple):
    public_key: bytes
    comment: str


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


class _Reader:
    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._pos = 0
        self._what = what

    def _take(self, n: int) -> bytes:
        if n < 0 or self._pos + n > len(self._data):
            raise BadSshKey(f"{self._what} is truncated")
        out = self._data[self._pos : self._pos + n]
        self._pos += n
        return out

    def uint32(self) -> int:
        (v,) = struct.unpack(">I", self._take(4))
        return int(v)

    def string(self) -> bytes:
        return self._take(self.uint32())

    def rest(self) -> bytes:
        return self._take(len(self._data) - self._pos)

    def end(self) -> None:
        if self._pos != len(self._data):
            raise BadSshKey(f"{self._what} has trailing bytes")


def key_blob(public_key: bytes) -> bytes:
    """The SSH wire encoding of an Ed25519 public key."""
    if type(public_key) is not bytes or len(public_key) != _KEY_SIZE:
        raise BadSshKey("an Ed25519 public key is 32 bytes")
    return _BLOB_PREFIX + public_key


def parse_blob(blob: bytes) -> bytes:
    """The 32-byte key of an ``ssh-ed25519`` key blob; other key types are refused."""
    r = _Reader(blob, "the SSH key blob")
    kind = r.string()
    if kind != KEY_TYPE:
        raise BadSshKey(_other_type(kind.decode("ascii", "replace")))
    key = r.string()
    r.end()
    if len(key) != _KEY_SIZE:
        raise BadSshKey("the ssh-ed25519 key is not 32 bytes")
    return key


def fingerprint(public_key: bytes) -> str:
    """OpenSSH's ``SHA256:...`` fingerprint (as ``ssh-keygen -l`` prints it)."""
    digest = hashlib.sha256(key_blob(public_key)).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def _other_type(kind: str) -> str:
    shown = kind if kind.isprintable() and len(kind) <= 40 else "an unknown type"
    return (
        f"the key is {shown}, not ssh-ed25519: Writ grants only Ed25519 keys"
        " (make one with ssh-keygen -t ed25519)"
    )


def format_public_key(public_key: bytes, comment: str = "") -> str:
    """``ssh-ed25519 <base64 blob> [comment]`` (no newline)."""
    line = "ssh-ed25519 " + base64.b64encode(key_blob(public_key)).decode("ascii")
    if comment:
        if "\n" in comment or "\r" in comment or "\x00" in comment:
            raise BadSshKey("an SSH key comment is one line of text")
        line += " " + comment
    return line


def parse_public_key(line: str) -> SshPublicKey:
    """One ``ssh-ed25519 <base64> [comment]`` line; the blob's type must agree."""
    if len(line) > MAX_LINE:
        raise BadSshKey("the SSH public key line is too long for an Ed25519 key")
    parts = line.strip().split(None, 2)
    if len(parts) < 2:
        if parts and parts[0].startswith(_OTHER_TYPES):
            raise BadSshKey(_other_type(parts[0]))
        raise BadSshKey("not an OpenSSH public key line (expected 'ssh-ed25519 AAAA... comment')")
    kind, b64 = parts[0], parts[1]
    if kind != KEY_TYPE.decode():
        if kind.startswith(_OTHER_TYPES) or kind.startswith("ssh-"):
            raise BadSshKey(_other_type(kind))
        raise BadSshKey(
            "not an OpenSSH public key line (expected 'ssh-ed25519 AAAA... comment';"
            " authorized_keys options are not accepted)"
        )
    try:
        blob = base64.b64decode(b64.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise BadSshKey("the SSH public key is not valid base64") from None
    key = parse_blob(blob)
    return SshPublicKey(key, parts[2].strip() if len(parts) > 2 else "")


def parse_public_key_file(data: bytes) -> SshPublicKey:
    """The one key of a ``.pub`` file (or of one line of ``ssh-add -L``):
    blank lines and ``#`` comments are skipped; several keys are refused, as
    the grant would otherwise name one the user did not choose."""
    if len(data) > MAX_LINE:
        raise BadSshKey("the SSH public key file is too large for one Ed25519 key")
    if data.lstrip().startswith(b"-----BEGIN"):
        raise BadSshKey("this is a private key: give the public key (the .pub file next to it)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadSshKey("the SSH public key file is not text") from None
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise BadSshKey("the SSH public key file holds no key")
    if len(lines) > 1:
        raise BadSshKey(f"the file holds {len(lines)} keys; give a file with exactly one")
    return parse_public_key(lines[0])


# --- private key files (openssh-key-v1, unencrypted, one Ed25519 key) ----------------


def format_private_key(seed: bytes, public_key: bytes, comment: str = "") -> str:
    """The PEM-armoured ``openssh-key-v1`` file of one unencrypted Ed25519 key.

    Private material: write it only through a 0600 key-file writer.
    """
    if len(seed) != _KEY_SIZE:
        raise BadSshKey("an Ed25519 seed is 32 bytes")
    blob = key_blob(public_key)
    check = secrets.token_bytes(4)
    inner = (
        check
        + check
        + _string(KEY_TYPE)
        + _string(public_key)
        + _string(seed + public_key)
        + _string(comment.encode("utf-8"))
    )
    inner += bytes(range(1, 1 + (-len(inner)) % 8))
    body = _MAGIC + _string(b"none") + _string(b"none") + _string(b"") + struct.pack(">I", 1)
    body += _string(blob) + _string(inner)
    b64 = base64.b64encode(body).decode("ascii")
    lines = [b64[i : i + 70] for i in range(0, len(b64), 70)]
    return "\n".join([_BEGIN, *lines, _END]) + "\n"


def parse_private_key(data: bytes) -> tuple[bytes, bytes, str]:
    """``(seed, public_key, comment)`` of an unencrypted Ed25519 ``openssh-key-v1`` file.

    The caller derives the public key from the seed and compares: a file
    whose halves disagree is damaged (:class:`~ledger.errors.BadSshKey`).
    """
    if len(data) > MAX_PRIVATE_FILE:
        raise BadSshKey("the private key file is too large for one Ed25519 key")
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise BadSshKey("the private key file is not an OpenSSH private key") from None
    if not (text.startswith(_BEGIN) and text.endswith(_END)):
        raise BadSshKey("the private key file is not an OpenSSH private key")
    try:
        raw = base64.b64decode("".join(text[len(_BEGIN) : -len(_END)].split()), validate=True)
    except (binascii.Error, ValueError):
        raise BadSshKey("the private key file is not valid base64") from None
    if not raw.startswith(_MAGIC):
        raise BadSshKey("the private key file is not openssh-key-v1")
    r = _Reader(raw[len(_MAGIC) :], "the private key file")
    cipher, kdf, _opts = r.string(), r.string(), r.string()
    if cipher != b"none" or kdf != b"none":
        raise BadSshKey("the private key is passphrase-protected; Writ reads only unencrypted holder keys")
    if r.uint32() != 1:
        raise BadSshKey("the private key file holds more than one key")
    public_key = parse_blob(r.string())
    inner = _Reader(r.string(), "the private key section")
    r.end()
    if inner.uint32() != inner.uint32():
        raise BadSshKey("the private key section is damaged (check bytes differ)")
    kind = inner.string()
    if kind != KEY_TYPE:
        raise BadSshKey(_other_type(kind.decode("ascii", "replace")))
    pub2, secret = inner.string(), inner.string()
    comment = inner.string()
    pad = inner.rest()
    if pad != bytes(range(1, 1 + len(pad))) or len(pad) >= 8:
        raise BadSshKey("the private key section is damaged (padding)")
    if pub2 != public_key or len(secret) != 64 or secret[32:] != public_key:
        raise BadSshKey("the private key section does not match its public key")
    try:
        text_comment = comment.decode("utf-8")
    except UnicodeDecodeError:
        text_comment = ""
    return secret[:32], public_key, text_comment
