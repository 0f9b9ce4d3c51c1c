"""A credential holder: a technician's tablet (or laptop) with its own key.

The holder's side of docs/protocol.md, "Credentials on a device". It generates its Ed25519 key, asks
for a grant with an enrollment request (section 7) and answers a device's
challenge with the auth message that ``device check --auth`` verifies,
carrying its own published grant record. The key is an OpenSSH key file, so
the very same key logs in over SSH to a device whose sshd asks the ledger
(``device authorized-keys``, docs/ssh.md)::

    DIR/id_ed25519      the private key, openssh-key-v1, mode 0600 (``ssh -i`` reads it)
    DIR/id_ed25519.pub  its OpenSSH public key line
    DIR/enroll.bin      the enrollment request for ``writ grant --request``
    DIR/grant.bin       the last grant record fetched from the server (for offline answers)

The holder verifies nothing about the ledger (the device does); it checks
only that a grant record it is given names its own key, so it never hands a
device someone else's grant.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ledger import encoding, messages, records, sshkey
from ledger.crypto import SeedSigner
from ledger.errors import BadKeyFile, BadMessage, BadSshKey, UsageError, WritError
from ledger.fileio import create_private

from .device import atomic_write
from .values import named_enrollment

__all__ = ["GRANT_FILE", "KEY_FILE", "Holder", "pick_grant", "read_grant_file"]

KEY_FILE = "id_ed25519"
PUB_FILE = "id_ed25519.pub"
ENROLL_FILE = "enroll.bin"
GRANT_FILE = "grant.bin"

#: a grant file: one record, a records file, or a credential's JSON.
MAX_GRANT_FILE = 1024 * 1024
#: the JSON answer of ``GET /v1/credentials?subject=`` (at most a page of credentials).
MAX_CREDENTIALS_REPLY = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Candidate:
    """A grant record naming the holder's key, and what the server said of it."""

    seq: int
    role: str
    raw: bytes
    status: str | None = None  # "active", "revoked", ... (None: unknown, from a file)


class Holder:
    """A holder directory: its key and its answers."""

    def __init__(self, signer: SeedSigner, directory: Path, name: str) -> None:
        self._signer = signer
        self.directory = directory
        self.name = name

    def __repr__(self) -> str:
        return f"Holder(subject={self.subject.hex()}, directory={str(self.directory)!r})"

    @property
    def subject(self) -> bytes:
        return self._signer.public_key

    @property
    def ssh_public_key(self) -> str:
        return sshkey.format_public_key(self.subject, self.name)

    @classmethod
    def create(cls, directory: Path | str, *, name: str | None, now: int) -> Holder:
        """A new key in ``directory`` (created 0700; an existing holder is refused)."""
        d = Path(directory)
        signer = SeedSigner.generate()
        label, enroll = named_enrollment(signer, name, "holder", now)
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        if (d / KEY_FILE).exists():
            raise UsageError(f"{d} already holds a holder key; use another directory")
        create_private(
            d / KEY_FILE,
            sshkey.format_private_key(signer.seed(), signer.public_key, label).encode("ascii"),
            error=BadKeyFile,
            what="holder key ",
        )
        holder = cls(signer, d, label)
        atomic_write(d / PUB_FILE, (holder.ssh_public_key + "\n").encode(), 0o644)
        atomic_write(d / ENROLL_FILE, enroll, 0o644)
        return holder

    @classmethod
    def load(cls, directory: Path | str) -> Holder:
        d = Path(directory)
        path = d / KEY_FILE
        try:
            st = os.stat(path)
            if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise BadKeyFile(f"{path} must be readable by its owner only (mode 0600)")
            with open(path, "rb") as f:
                data = f.read(sshkey.MAX_PRIVATE_FILE + 1)
        except FileNotFoundError:
            raise UsageError(f"{d} is not an initialised holder (no {KEY_FILE}): run holder init") from None
        try:
            seed, public, comment = sshkey.parse_private_key(data)
        except BadSshKey as exc:
            raise BadKeyFile(f"{path}: {exc.message}") from None
        signer = SeedSigner(seed)
        if signer.public_key != public:
            raise BadKeyFile(f"{path}: the private key does not match its public key")
        return cls(signer, d, comment)

    def answer(self, grant_record: bytes, challenge: bytes, device_key: bytes, now: int) -> bytes:
        """The section 4 auth message answering ``challenge`` of the device ``device_key``."""
        if len(challenge) != 32 or len(device_key) != 32:
            raise UsageError("the challenge and the device key are 32 bytes each")
        own_grant(grant_record, self.subject)
        return messages.make_auth(grant_record, self._signer, device_key, challenge, now)

    def keep_grant(self, raw: bytes) -> Path:
        path = self.directory / GRANT_FILE
        atomic_write(path, raw, 0o644)
        return path


# --- grants -------------------------------------------------------------------


def own_grant(raw: bytes, subject: bytes) -> records.Grant:
    """The grant in ``raw`` if it is one of ``subject``'s (not verified: the device does)."""
    try:
        body = records.decode_unverified(raw).body
    except WritError as exc:
        raise BadMessage(f"not a grant record: {exc.message}") from None
    if not isinstance(body, records.Grant):
        raise BadMessage(f"record {body.seq} is not a grant")
    if body.subject != subject:
        raise BadMessage(
            f"grant {body.seq} names another key ({body.subject.hex()[:16]}…), not this holder's"
        )
    return body


def _candidates(raws: list[bytes], subject: bytes, statuses: dict[int, str] | None = None) -> list[Candidate]:
    out = []
    for raw in raws:
        try:
            g = own_grant(raw, subject)
        except BadMessage:
            continue
        out.append(Candidate(g.seq, g.role, raw, None if statuses is None else statuses.get(g.seq)))
    return out


def pick_grant(cands: list[Candidate], role: str | None) -> Candidate:
    """The newest active grant (of ``role`` when given), else the newest: a
    revoked holder still answers, and the device names the refusal."""
    pool = [c for c in cands if role is None or c.role == role]
    if not pool:
        what = f" of role {role}" if role is not None else ""
        raise UsageError(f"no grant{what} of this holder's key was found; grant its enroll.bin first")
    pool.sort(key=lambda c: c.seq)
    active = [c for c in pool if c.status in (None, "active")]
    return (active or pool)[-1]


def read_grant_file(data: bytes, subject: bytes) -> list[Candidate]:
    """The grants of ``subject`` in a grant file: one raw record, a records
    file (a MessagePack array of records) or the JSON of ``GET
    /v1/credentials[/SEQ]``."""
    stripped = data.lstrip()
    if stripped[:1] in (b"{", b"["):
        try:
            return credentials_json(json.loads(data), subject)
        except ValueError:
            pass
    try:  # a record is itself an array of two bins: try it as one record first
        records.decode_unverified(data)
        raws = [data]
    except WritError:
        try:
            raws = encoding.unpack_records(data, max_count=messages.MAX_BUNDLE_RECORDS, error=BadMessage)
        except WritError:
            raws = [data]
    found = _candidates(raws, subject)
    if not found and len(raws) == 1:
        own_grant(raws[0], subject)  # the reason it is not usable
    return found


def credentials_json(doc: Any, subject: bytes) -> list[Candidate]:
    """Grants of ``subject`` in a credential JSON object or a ``{"credentials": [...]}`` list."""
    items = doc.get("credentials") if isinstance(doc, dict) and "credentials" in doc else [doc]
    if not isinstance(items, list):
        raise BadMessage("the credentials answer is not a list")
    raws: list[bytes] = []
    statuses: dict[int, str] = {}
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("record"), str):
            continue
        try:
            raw = bytes.fromhex(item["record"])
        except ValueError:
            raise BadMessage("a credential's record is not hex") from None
        raws.append(raw)
        if isinstance(item.get("seq"), int) and isinstance(item.get("status"), str):
            statuses[item["seq"]] = item["status"]
    return _candidates(raws, subject, statuses)


async def fetch_grants(server: str, subject: bytes, *, timeout: float) -> list[Candidate]:
    """The holder's grants as the server lists them (``GET /v1/credentials?subject=``)."""
    from ledger.client import AsyncClient

    async with AsyncClient(server.rstrip("/"), timeout=timeout) as http:
        body = await http.get(
            f"v1/credentials?subject={subject.hex()}",
            cap=MAX_CREDENTIALS_REPLY,
            headers={"Accept": "application/json"},
        )
    try:
        doc = json.loads(body)
    except ValueError:
        raise BadMessage("the server's credentials answer is not JSON") from None
    return credentials_json(doc, subject)
