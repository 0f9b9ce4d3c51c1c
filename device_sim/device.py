"""One simulated field device: the model of its firmware.

A device is installed with two facts, the root's public key (the *anchor*)
and the ledger's origin, and generates its own Ed25519 key. Everything else it
learns from the ledger and verifies itself (PROTOCOL sections 3 to 5): it
applies records with the same :class:`~ledger.state.LedgerState` rules as the
server, computes the tree, accepts a checkpoint only through
:func:`ledger.view.accept`, and judges credentials with
:func:`ledger.credential.check_credential`.

State lives in a directory (the CLI device) or in memory (a fleet)::

    DIR/device.key      the private seed, hex, mode 0600; never sent, logged or exported
    DIR/enroll.bin      the enrollment request (PROTOCOL section 7)
    DIR/state.bin       config, the ledger state, the accepted view, the own grant
    DIR/evidence.json   the last evidence records (refused data), newest last
    DIR/challenge.bin   the challenge issued for the next check (single use)

``state.bin`` changes only when a sync is accepted, so a refused sync leaves it
byte for byte as it was; evidence and challenges live in their own files.
Every write is atomic (temporary file, fsync, rename, directory fsync): a
crash mid-sync leaves the old or the new state, never a torn one.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ledger import credential, encoding, messages, records, tree, view
from ledger.crypto import SeedSigner
from ledger.errors import (
    BadKeyFile,
    BadMessage,
    CheckpointRejected,
    Fork,
    StaleHead,
    StorageError,
    UsageError,
    VerificationError,
    WritError,
)
from ledger.fileio import create_private, read_capped, write_atomic
from ledger.state import LedgerState
from ledger.view import AcceptedView, Evidence

__all__ = [
    "DEFAULT_MAX_STALENESS",
    "MAX_EVIDENCE",
    "STALE_POLICIES",
    "Device",
    "DeviceConfig",
    "OwnGrant",
    "SyncResult",
    "atomic_write",
]

DEFAULT_MAX_STALENESS = credential.DEFAULT_MAX_STALENESS
STALE_POLICIES = ("refuse", "accept")
#: evidence records kept (the oldest are dropped).
MAX_EVIDENCE = 20

KEY_FILE = "device.key"
ENROLL_FILE = "enroll.bin"
STATE_FILE = "state.bin"
EVIDENCE_FILE = "evidence.json"
CHALLENGE_FILE = "challenge.bin"

_STATE_VERSION = 1
_MAX_STATE_FILE = 256 * 1024 * 1024
_MAX_EVIDENCE_FILE = 4 * 1024 * 1024


# --- files --------------------------------------------------------------------


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new content."""
    write_atomic(path, data, mode=mode, error=StorageError)


def _read_capped(path: Path, limit: int, what: str) -> bytes:
    return read_capped(path, limit, error=BadMessage, what=what, missing_is_error=False)


def _write_key(path: Path, signer: SeedSigner) -> None:
    create_private(
        path, (signer.seed().hex() + "\n").encode("ascii"), error=StorageError, what="the device key "
    )


def _read_key(path: Path) -> SeedSigner:
    try:
        st = os.stat(path)
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise BadKeyFile(f"{path} must be readable by its owner only (mode 0600)")
        text = _read_capped(path, 256, "the device key file").decode("ascii").strip()
        seed = bytes.fromhex(text)
    except FileNotFoundError:
        raise UsageError(f"{path.parent} is not an initialised device (no {KEY_FILE})") from None
    except (UnicodeDecodeError, ValueError, BadMessage):
        raise BadKeyFile(f"{path} does not hold a hex Ed25519 seed") from None
    if len(seed) != 32:
        raise BadKeyFile(f"{path} does not hold a 32-byte Ed25519 seed")
    return SeedSigner(seed)


# --- values -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    """What the device is installed with. ``keep_roles`` None keeps every
    grant (a CLI device can afford it); a fleet keeps ``{"operator"}``."""

    anchor: bytes
    origin: str
    max_staleness: int = DEFAULT_MAX_STALENESS
    stale_policy: str = "refuse"
    keep_roles: frozenset[str] | None = None
    require_witnesses: int = 0

    def __post_init__(self) -> None:
        if type(self.anchor) is not bytes or len(self.anchor) != 32:
            raise UsageError("the anchor is a 32-byte Ed25519 public key")
        try:
            records.check_origin(self.origin)
        except WritError:
            raise UsageError("the origin is 1..128 bytes with no spaces, '+' or control characters") from None
        if type(self.max_staleness) is not int or self.max_staleness < 0:
            raise UsageError("max_staleness is a number of seconds >= 0")
        if self.stale_policy not in STALE_POLICIES:
            raise UsageError(f"stale_policy is one of {', '.join(STALE_POLICIES)}")
        if type(self.require_witnesses) is not int or self.require_witnesses < 0:
            raise UsageError("require_witnesses is a count >= 0")

    def to_list(self) -> list[Any]:
        roles = None if self.keep_roles is None else sorted(self.keep_roles)
        return [
            self.anchor,
            self.origin,
            self.max_staleness,
            self.stale_policy,
            roles,
            self.require_witnesses,
        ]

    @classmethod
    def from_list(cls, f: Any) -> DeviceConfig:
        if type(f) is not list or len(f) != 6:
            raise BadMessage("damaged device config")
        roles = f[4]
        if roles is not None and (type(roles) is not list or not all(type(r) is str for r in roles)):
            raise BadMessage("damaged device config")
        try:
            return cls(f[0], f[1], f[2], f[3], None if roles is None else frozenset(roles), f[5])
        except UsageError:
            raise BadMessage("damaged device config") from None


@dataclass(frozen=True, slots=True)
class OwnGrant:
    """A ``device`` grant of this device's own key, found in the ledger."""

    seq: int
    scope: str
    name: str

    def to_list(self) -> list[Any]:
        return [self.seq, self.scope, self.name]


@dataclass(frozen=True, slots=True)
class SyncResult:
    """What one accepted update changed."""

    size: int
    root: bytes
    checkpoint_time: int | None
    previous_size: int
    stale: bool

    @property
    def appended(self) -> int:
        return self.size - self.previous_size

    def to_json(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "root": self.root.hex(),
            "checkpoint_time": self.checkpoint_time,
            "appended": self.appended,
            "stale": self.stale,
        }


def _view_to_list(v: AcceptedView | None) -> list[Any] | None:
    return None if v is None else v.to_list()


def _view_from_list(f: Any) -> AcceptedView | None:
    return None if f is None else AcceptedView.from_list(f)


def _grants_from_list(f: Any) -> list[OwnGrant]:
    if type(f) is not list:
        raise BadMessage("damaged own grants in the device state")
    out = []
    for g in f:
        if type(g) is not list or len(g) != 3 or type(g[0]) is not int or type(g[1]) is not str:
            raise BadMessage("damaged own grants in the device state")
        if type(g[2]) is not str:
            raise BadMessage("damaged own grants in the device state")
        out.append(OwnGrant(g[0], g[1], g[2]))
    return out


class UpdateLike(Protocol):
    """What a source yields (:class:`device_sim.sources.Update`)."""

    @property
    def start(self) -> int: ...

    @property
    def records(self) -> list[bytes]: ...

    @property
    def note(self) -> str: ...


# --- the device ---------------------------------------------------------------


class Device:
    """A field device: its key, its verified view of the ledger, its verdicts.

    Build one with :meth:`create` (a new device, on disk or in memory) or
    :meth:`load` (a device directory). The core is :meth:`apply_update`
    (verify and apply records plus a checkpoint, all or nothing) and
    :meth:`check` (is this credential valid here now?).
    """

    def __init__(
        self,
        signer: SeedSigner,
        config: DeviceConfig,
        *,
        state: LedgerState | None = None,
        accepted: AcceptedView | None = None,
        own_grants: Sequence[OwnGrant] = (),
        evidence: Iterable[Evidence] = (),
        directory: Path | None = None,
        enroll_request: bytes = b"",
    ) -> None:
        self._signer = signer
        self.config = config
        self.state = (
            state
            if state is not None
            else LedgerState(config.anchor, origin=config.origin, keep_roles=config.keep_roles)
        )
        self.view = accepted
        self.own_grants: list[OwnGrant] = list(own_grants)
        self.evidence: list[Evidence] = list(evidence)[-MAX_EVIDENCE:]
        self.directory = directory
        self.enroll_request = enroll_request
        self._challenge: bytes | None = None
        self._failed_at: int | None = None

    def __repr__(self) -> str:
        where = f", directory={str(self.directory)!r}" if self.directory is not None else ""
        return f"Device(public_key={self.public_key.hex()}, size={self.size}{where})"

    # -- construction --------------------------------------------------------

    @classmethod
    def create(
        cls,
        anchor: bytes,
        origin: str,
        *,
        directory: Path | str | None = None,
        name: str | None = None,
        now: int,
        max_staleness: int = DEFAULT_MAX_STALENESS,
        stale_policy: str = "refuse",
        keep_roles: Iterable[str] | None = None,
        require_witnesses: int = 0,
        signer: SeedSigner | None = None,
    ) -> Device:
        """A new device with a freshly generated key (``signer`` only for tests).

        With ``directory`` the key (0600), the enrollment request and the
        initial state are written there; an already initialised directory is
        refused.
        """

        config = DeviceConfig(
            anchor,
            origin,
            max_staleness,
            stale_policy,
            None if keep_roles is None else frozenset(keep_roles),
            require_witnesses,
        )
        signer = signer if signer is not None else SeedSigner.generate()
        label = name if name is not None else f"device-{signer.public_key.hex()[:8]}"
        try:
            records.check_text("name", label, records.MAX_NAME)
            enroll = messages.make_enroll(signer, label, now)
        except WritError:
            raise UsageError("the device name is 0..64 bytes of text with no control characters") from None
        d = None if directory is None else Path(directory)
        dev = cls(signer, config, directory=d, enroll_request=enroll)
        if d is not None:
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            if (d / KEY_FILE).exists() or (d / STATE_FILE).exists():
                raise UsageError(f"{d} already holds a device; use another directory")
            _write_key(d / KEY_FILE, signer)
            atomic_write(d / ENROLL_FILE, enroll, 0o644)
            dev._save_state(dev.state, dev.view, dev.own_grants)
        return dev

    @classmethod
    def load(cls, directory: Path | str) -> Device:
        d = Path(directory)
        signer = _read_key(d / KEY_FILE)
        try:
            raw = _read_capped(d / STATE_FILE, _MAX_STATE_FILE, "the device state")
        except FileNotFoundError:
            raise UsageError(f"{d} is not an initialised device (no {STATE_FILE})") from None
        f = encoding.unpack_array(raw, min_len=5, max_len=5, max_depth=3, error=BadMessage)
        if f[0] != _STATE_VERSION:
            raise BadMessage("unknown device state version")
        config = DeviceConfig.from_list(f[1])
        if type(f[2]) is not bytes:
            raise BadMessage("damaged device state")
        state = LedgerState.restore(f[2])
        if state.anchor != config.anchor or state.expected_origin != config.origin:
            raise BadMessage("the ledger state does not belong to this device's anchor and origin")
        accepted = _view_from_list(f[3])
        if accepted is not None and (accepted.size != state.size or accepted.root != state.root):
            raise BadMessage("the accepted view does not match the ledger state")
        dev = cls(
            signer,
            config,
            state=state,
            accepted=accepted,
            own_grants=_grants_from_list(f[4]),
            evidence=_load_evidence(d / EVIDENCE_FILE),
            directory=d,
        )
        with contextlib.suppress(FileNotFoundError):
            dev.enroll_request = _read_capped(d / ENROLL_FILE, messages.MAX_MESSAGE, "enroll.bin")
        with contextlib.suppress(FileNotFoundError):
            ch = _read_capped(d / CHALLENGE_FILE, 64, "challenge.bin")
            dev._challenge = ch if len(ch) == 32 else None
        return dev

    # -- queries -------------------------------------------------------------

    @property
    def public_key(self) -> bytes:
        return self._signer.public_key

    @property
    def size(self) -> int:
        return self.state.size

    @property
    def root(self) -> bytes:
        return self.state.root

    @property
    def checkpoint_time(self) -> int | None:
        return None if self.view is None else self.view.timestamp

    @property
    def own_grant(self) -> OwnGrant | None:
        """The newest unrevoked ``device`` grant of this key (else the newest)."""
        if not self.own_grants:
            return None
        for g in reversed(self.own_grants):
            if not self.state.is_revoked(g.seq) and not self.state.key_revoked(self.public_key):
                return g
        return self.own_grants[-1]

    @property
    def scope(self) -> str:
        g = self.own_grant
        return "" if g is None else g.scope

    def freshness(self) -> credential.Freshness:
        return credential.Freshness.of(
            self.view,
            require_witnesses=self.config.require_witnesses,
            max_staleness=self.config.max_staleness,
            policy=self.config.stale_policy,
        )

    def is_stale(self, now: int) -> bool:
        return self.freshness().is_stale(now)

    # -- sync ----------------------------------------------------------------

    def apply(self, update: UpdateLike, now: int) -> SyncResult:
        """:meth:`apply_update` of a source's ``Update(start, records, note)``."""
        return self.apply_update(update.records, update.start, update.note, now)

    def apply_update(self, records_: Sequence[bytes], start: int, note: str | bytes, now: int) -> SyncResult:
        """Verify ``records_`` (starting at seq ``start``) and the checkpoint
        ``note`` that covers them, then commit: all or nothing.

        The records must reach exactly the checkpoint's size and start at or
        below the device's size; records below it (an overlap, e.g. a bundle
        made for an older device) are parsed, must sit at their seq and, where
        the device kept the record's leaf hash, be the very record it applied;
        they change nothing. On any failure the device keeps its state, adds
        an :class:`~ledger.view.Evidence` and raises the error.
        """

        self._failed_at = None
        try:
            new_state, accepted, own = self._verify(records_, start, note, now)
        except VerificationError as exc:
            self._keep_evidence(exc, records_, start, note, now)
            raise
        if new_state is None:  # an empty ledger: nothing to verify, nothing learnt
            return SyncResult(self.size, self.root, self.checkpoint_time, self.size, self.is_stale(now))
        previous = self.size
        if not (new_state.size == previous and accepted == self.view):  # else: the very same view again
            self._save_state(new_state, accepted, own)
        self.state, self.view, self.own_grants = new_state, accepted, own
        return SyncResult(new_state.size, new_state.root, self.checkpoint_time, previous, self.is_stale(now))

    def _verify(
        self, raws: Sequence[bytes], start: int, note: str | bytes, now: int
    ) -> tuple[LedgerState | None, AcceptedView | None, list[OwnGrant]]:
        size = view.checkpoint_size(note)
        cur = self.state
        own = list(self.own_grants)
        if size < cur.size:  # nothing to apply: accept() names the rollback once the note verifies
            return cur, view.accept(self.view, note, cur, now=now), own
        if size == 0 and not raws:
            return None, None, own
        if type(start) is not int or start < 0:
            raise BadMessage("records start at a seq >= 0")
        if raws or size > cur.size:
            if start > cur.size:
                raise BadMessage(
                    f"records start at seq {start} but the device has only {cur.size}: a gap",
                    start=start,
                    size=cur.size,
                )
            if start + len(raws) != size:
                raise BadMessage(
                    f"records [{start}, {start + len(raws)}) do not end at the checkpoint's size {size}",
                    start=start,
                    end=start + len(raws),
                    checkpoint_size=size,
                )
        overlap = max(0, min(len(raws), cur.size - start)) if raws else 0
        self._check_overlap(raws[:overlap], start)
        new = cur.copy()
        try:
            applied = new.apply_all(list(raws[overlap:]))
        except VerificationError:
            self._failed_at = new.size  # the position of the refused record
            raise
        accepted = view.accept(self.view, note, new, now=now)
        for rec in applied:
            body = rec.body
            if (
                isinstance(body, records.Grant)
                and body.role == records.ROLE_DEVICE
                and body.subject == self.public_key
            ):
                own.append(OwnGrant(body.seq, body.scope, body.name))
        return new, accepted, own

    def _check_overlap(self, raws: Sequence[bytes], start: int) -> None:
        for i, raw in enumerate(raws):
            seq = start + i
            env = records.parse(raw)
            if env.seq != seq:
                raise StaleHead(f"the record served at position {seq} says seq {env.seq}", seq=seq)
            kept = self.state.grants.get(seq)
            if kept is not None and kept.leaf_hash != tree.leaf_hash(raw):
                raise Fork(f"record {seq} is not the record this device applied at that seq", seq=seq)

    def _keep_evidence(
        self, exc: VerificationError, raws: Sequence[bytes], start: int, note: str | bytes, now: int
    ) -> None:
        data: bytes | None = None
        notes_: tuple[str | bytes | None, ...] = ()
        if isinstance(exc, CheckpointRejected):
            notes_ = (None if self.view is None else self.view.note, note)
        elif exc.type == "bad-note":
            data = note.encode("utf-8", "replace") if isinstance(note, str) else bytes(note)
        else:
            seq = self._failed_at if self._failed_at is not None else exc.detail.get("seq")
            i = seq - start if type(seq) is int else -1
            if 0 <= i < len(raws) and isinstance(raws[i], bytes | bytearray):
                data = bytes(raws[i])
            notes_ = (note,) if isinstance(note, str) else ()
        self.add_evidence(Evidence.from_error(exc, observed_at=now, notes=notes_, data=data))

    def add_evidence(self, ev: Evidence) -> None:
        self.evidence = [*self.evidence, ev][-MAX_EVIDENCE:]
        if self.directory is not None:
            body = json.dumps([e.to_json() for e in self.evidence], indent=1).encode()
            with contextlib.suppress(OSError, StorageError):  # losing evidence must not hide the refusal
                atomic_write(self.directory / EVIDENCE_FILE, body, 0o644)

    def _save_state(self, state: LedgerState, accepted: AcceptedView | None, own: Sequence[OwnGrant]) -> None:
        if self.directory is None:
            return
        data = encoding.pack(
            [
                _STATE_VERSION,
                self.config.to_list(),
                state.snapshot(),
                _view_to_list(accepted),
                [g.to_list() for g in own],
            ]
        )
        atomic_write(self.directory / STATE_FILE, data)

    # -- credentials ----------------------------------------------------------

    def challenge(self) -> bytes:
        """32 fresh random bytes for the next :meth:`check` (which consumes them)."""
        ch = secrets.token_bytes(32)
        if self.directory is not None:
            atomic_write(self.directory / CHALLENGE_FILE, ch, 0o600)
        self._challenge = ch
        return ch

    def _take_challenge(self) -> bytes | None:
        ch, self._challenge = self._challenge, None
        if self.directory is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.directory / CHALLENGE_FILE)
        return ch

    def check(
        self, auth_bytes: bytes, now: int, roles: Iterable[str] = (records.ROLE_OPERATOR,)
    ) -> credential.Verdict:
        """Is the credential in ``auth_bytes`` valid here at ``now``? The last
        challenge is consumed whatever the answer."""
        ch = self._take_challenge()
        return credential.check_credential(
            self.state,
            auth_bytes,
            device_key=self.public_key,
            challenge=ch,
            now=now,
            roles=tuple(roles),
            device_scope=self.scope,
            freshness=self.freshness(),
        )

    def receipt(self, now: int) -> bytes:
        """The signed receipt of the accepted head (PROTOCOL section 6)."""
        g = self.own_grant
        if g is None:
            raise UsageError(
                "this device has no device grant in the ledger it synced: grant its key "
                "(enroll.bin), then sync before sending a receipt"
            )
        return messages.make_receipt(self._signer, g.seq, self.size, self.root, now)

    def enrollment(self, name: str, now: int) -> bytes:
        """A fresh enrollment request for this device's key."""
        return messages.make_enroll(self._signer, name, now)

    # -- report ----------------------------------------------------------------

    def status(self, now: int) -> dict[str, Any]:
        g = self.own_grant
        ts = self.checkpoint_time
        return {
            "public_key": self.public_key.hex(),
            "origin": self.config.origin,
            "anchor": self.config.anchor.hex(),
            "size": self.size,
            "root": self.root.hex(),
            "checkpoint_time": ts,
            "staleness": None if ts is None else now - ts,
            "stale": self.is_stale(now),
            "max_staleness": self.config.max_staleness,
            "stale_policy": self.config.stale_policy,
            "revoked": {"ids": len(self.state.revoked), "keys": len(self.state.revoked_keys)},
            "grant": None
            if g is None
            else {
                "seq": g.seq,
                "scope": g.scope,
                "name": g.name,
                "revoked": self.state.is_revoked(g.seq) or self.state.key_revoked(self.public_key),
            },
            "evidence": [e.to_json() for e in self.evidence],
        }


def _load_evidence(path: Path) -> list[Evidence]:
    try:
        raw = _read_capped(path, _MAX_EVIDENCE_FILE, "evidence.json")
    except FileNotFoundError:
        return []
    try:
        items = json.loads(raw)
    except ValueError:
        raise BadMessage("damaged evidence file") from None
    if type(items) is not list:
        raise BadMessage("damaged evidence file")
    return [Evidence.from_json(e) for e in items][-MAX_EVIDENCE:]
