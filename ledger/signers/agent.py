"""A minimal ssh-agent client (``--ssh-agent FINGERPRINT``), draft-miller-ssh-agent.

Only ``ssh-ed25519`` keys. The agent's signature blob is
``string "ssh-ed25519" || string sig`` and ``sig`` is a plain Ed25519
signature of the data, which this client verifies against the public key
before returning it: an agent (or whatever answers on the socket) is not
trusted to have signed what was asked.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import socket
import struct
from typing import Final

import nacl.exceptions
import nacl.signing

from .. import sshkey
from ..crypto import SIGNATURE_SIZE
from ..errors import AgentError, BadSshKey, UsageError
from ..sshkey import KEY_TYPE, fingerprint, key_blob

__all__ = ["AgentSigner", "fingerprint", "key_blob", "list_agent_keys"]

SSH_AGENT_FAILURE: Final = 5
SSH_AGENTC_REQUEST_IDENTITIES: Final = 11
SSH_AGENT_IDENTITIES_ANSWER: Final = 12
SSH_AGENTC_SIGN_REQUEST: Final = 13
SSH_AGENT_SIGN_RESPONSE: Final = 14

#: largest agent reply accepted (OpenSSH's own limit is 256 KiB).
MAX_REPLY: Final = 256 * 1024
#: seconds for connecting and for each read; signing may wait for a confirmation prompt.
DEFAULT_TIMEOUT: Final = 30.0

_FINGERPRINT = re.compile(r"SHA256:([A-Za-z0-9+/]{43})")
_HEX_KEY = re.compile(r"[0-9a-fA-F]{64}")


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


class _Reader:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def uint32(self) -> int:
        if self._pos + 4 > len(self._data):
            raise AgentError("malformed agent reply (truncated)")
        (value,) = struct.unpack_from(">I", self._data, self._pos)
        self._pos += 4
        return int(value)

    def string(self) -> bytes:
        n = self.uint32()
        if self._pos + n > len(self._data):
            raise AgentError("malformed agent reply (truncated string)")
        out = self._data[self._pos : self._pos + n]
        self._pos += n
        return out

    def end(self) -> None:
        if self._pos != len(self._data):
            raise AgentError("malformed agent reply (trailing bytes)")


def _parse_ed25519_blob(blob: bytes) -> bytes | None:
    """The 32-byte public key in an ssh-ed25519 key blob, or None for another key type."""
    try:
        return sshkey.parse_blob(blob)
    except BadSshKey:
        return None


def _socket_path(socket_path: str | None) -> str:
    path = socket_path if socket_path is not None else os.environ.get("SSH_AUTH_SOCK")
    if not path:
        raise AgentError("no ssh-agent: SSH_AUTH_SOCK is not set")
    return path


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks: list[bytes] = []
    while n:
        chunk = sock.recv(min(n, 65536))
        if not chunk:
            raise AgentError("the ssh-agent closed the connection")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _request(path: str, message: bytes, timeout: float) -> tuple[int, bytes]:
    """Send one request, return (reply type, reply payload)."""

    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(struct.pack(">I", len(message)) + message)
            (length,) = struct.unpack(">I", _recv_exact(sock, 4))
            if not 1 <= length <= MAX_REPLY:
                raise AgentError(f"the ssh-agent sent a reply of {length} bytes")
            reply = _recv_exact(sock, length)
    except (FileNotFoundError, ConnectionRefusedError):
        raise AgentError(f"no ssh-agent listening at {path}") from None
    except TimeoutError:
        raise AgentError(f"the ssh-agent at {path} did not answer within {timeout:g} s") from None
    except OSError as e:
        raise AgentError(
            f"cannot talk to the ssh-agent at {path}: {e.strerror or type(e).__name__}"
        ) from None
    return reply[0], reply[1:]


def _identities(path: str, timeout: float) -> list[tuple[bytes, bytes]]:
    kind, payload = _request(path, bytes([SSH_AGENTC_REQUEST_IDENTITIES]), timeout)
    if kind == SSH_AGENT_FAILURE:
        raise AgentError("the ssh-agent refused to list its keys")
    if kind != SSH_AGENT_IDENTITIES_ANSWER:
        raise AgentError(f"unexpected ssh-agent reply type {kind} to a key listing")
    r = _Reader(payload)
    count = r.uint32()
    if count > MAX_REPLY // 8:
        raise AgentError("malformed agent reply (key count)")
    out = [(r.string(), r.string()) for _ in range(count)]
    r.end()
    return out


def list_agent_keys(
    socket_path: str | None = None, *, timeout: float = DEFAULT_TIMEOUT
) -> list[tuple[str, bytes, str]]:
    """The agent's ssh-ed25519 keys as ``(fingerprint, public_key, comment)``; other key types are skipped."""

    path = _socket_path(socket_path)
    out: list[tuple[str, bytes, str]] = []
    for blob, comment in _identities(path, timeout):
        pub = _parse_ed25519_blob(blob)
        if pub is not None:
            out.append((fingerprint(pub), pub, comment.decode("utf-8", errors="replace")))
    return out


def _wanted(key: str) -> tuple[str, bytes | None]:
    """(fingerprint, public key if given as hex) for a user's ``--ssh-agent`` argument."""

    text = key.strip()
    if _HEX_KEY.fullmatch(text):
        pub = bytes.fromhex(text)
        return fingerprint(pub), pub
    m = _FINGERPRINT.fullmatch(text)
    if m is None:
        raise UsageError("an ssh-agent key is named by its SHA256:... fingerprint or its 64-hex public key")
    try:
        digest = base64.b64decode(m.group(1) + "=", validate=True)
    except (binascii.Error, ValueError):
        raise UsageError("the SHA256 fingerprint is not valid base64") from None
    if len(digest) != 32:
        raise UsageError("the SHA256 fingerprint is not 32 bytes")
    return text, None


class AgentSigner:
    """Signs with an Ed25519 key held by an ssh-agent.

    The key is looked up once, here; each signature opens a new connection to
    the agent and is verified before it is returned.
    """

    __slots__ = ("_fingerprint", "_path", "_public", "_timeout")

    def __init__(
        self, fingerprint: str, socket_path: str | None = None, *, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        want, want_pub = _wanted(fingerprint)
        self._path = _socket_path(socket_path)
        self._timeout = timeout
        found: bytes | None = None
        for blob, _comment in _identities(self._path, timeout):
            if _fingerprint_of_blob(blob) != want:
                continue
            pub = _parse_ed25519_blob(blob)
            if pub is None:
                raise AgentError(f"the agent's key {want} is not an ssh-ed25519 key")
            found = pub
            break
        if found is None or (want_pub is not None and found != want_pub):
            raise AgentError(f"the key {want} is not loaded in the ssh-agent (ssh-add it)")
        self._public = found
        self._fingerprint = want

    @property
    def public_key(self) -> bytes:
        return self._public

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def sign(self, message: bytes) -> bytes:
        request = (
            bytes([SSH_AGENTC_SIGN_REQUEST])
            + _string(key_blob(self._public))
            + _string(message)
            + struct.pack(">I", 0)
        )
        kind, payload = _request(self._path, request, self._timeout)
        if kind == SSH_AGENT_FAILURE:
            raise AgentError(
                f"the ssh-agent refused to sign with {self._fingerprint}"
                " (key removed, or confirmation denied)"
            )
        if kind != SSH_AGENT_SIGN_RESPONSE:
            raise AgentError(f"unexpected ssh-agent reply type {kind} to a sign request")
        r = _Reader(payload)
        blob = r.string()
        r.end()
        s = _Reader(blob)
        if s.string() != KEY_TYPE:
            raise AgentError("the ssh-agent answered with a signature that is not ssh-ed25519")
        sig = s.string()
        s.end()
        if len(sig) != SIGNATURE_SIZE:
            raise AgentError("the ssh-agent answered with a signature that is not 64 bytes")
        try:
            nacl.signing.VerifyKey(self._public).verify(message, sig)
        except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError):
            raise AgentError(
                f"the ssh-agent returned a signature that does not verify under {self._fingerprint}"
            ) from None
        return sig

    def __repr__(self) -> str:
        return f"AgentSigner(fingerprint={self._fingerprint!r}, public_key={self._public.hex()})"


def _fingerprint_of_blob(blob: bytes) -> str:
    digest = hashlib.sha256(blob).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")
