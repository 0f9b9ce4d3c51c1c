"""One simulated field device: the model of its firmware.

A device is installed with two facts, the root's public key (the *anchor*)
and the ledger's origin, and generates its own Ed25519 key. Everything else it
learns from the ledger and verifies itself (docs/protocol.md, "Validity rules" to "Checkpoints"): it
applies records with the same :class:`~ledger.state.LedgerState` rules as the
server, computes the tree, accepts a checkpoint only through
:func:`ledger.acceptance.accept`, and judges credentials with
:func:`ledger.credential.check_credential`.

State lives in a directory (the CLI device) or in memory (a fleet)::

    DIR/device.key      the private seed, hex, mode 0600; never sent, logged or exported
    DIR/enroll.bin      the enrollment request (docs/protocol.md, "Enrollment requests")
    DIR/state.bin       config, the ledger state, the accepted view, the own grant
    DIR/evidence.json   the last evidence records (refused data), newest last
    DIR/challenge.bin   the challenge issued for the next check (single use)

``state.bin`` changes only when a sync is accepted, so a refused sync leaves it
byte for byte as it was; evidence and challenges live in their own files.
Every write is atomic (temporary file, fsync, rename, directory fsync): a
crash mid-sync leaves the old or the new state, never a torn one.

One update being verified as its records arrive is :mod:`device_sim.update`
(:class:`PendingUpdate`, :class:`Overlap`); the value types are
:mod:`device_sim.values`. Both are re-exported here.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ledger import credential, encoding, messages, records
from ledger.acceptance import AcceptedView, Evidence
from ledger.crypto import SeedSigner
from ledger.errors import (
    BadKeyFile,
    BadMessage,
    CheckpointRejected,
    StorageError,
    UsageError,
    VerificationError,
)
from ledger.fileio import create_private, read_capped, write_atomic
from ledger.state import LedgerState

from .update import Overlap, PendingUpdate
from .values import (
    DEFAULT_MAX_STALENESS,
    STALE_POLICIES,
    DeviceConfig,
    OwnGrant,
    SyncResult,
    UpdateLike,
    grants_from_list,
    named_enrollment,
    view_from_list,
    view_to_list,
)

__all__ = [
    "DEFAULT_MAX_STALENESS",
    "MAX_EVIDENCE",
    "STALE_POLICIES",
    "Device",
    "DeviceConfig",
    "Overlap",
    "OwnGrant",
    "PendingUpdate",
    "SyncResult",
    "atomic_write",
]

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
        _, enroll = named_enrollment(signer, name, "device", now)
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
        accepted = view_from_list(f[3])
        if accepted is not None and (accepted.size != state.size or accepted.root != state.root):
            raise BadMessage("the accepted view does not match the ledger state")
        dev = cls(
            signer,
            config,
            state=state,
            accepted=accepted,
            own_grants=grants_from_list(f[4]),
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
        """:meth:`apply_update` of a source's ``Update(start, records, note[, bundle])``."""
        bundle = bool(getattr(update, "bundle", False))
        return self.apply_update(update.records, update.start, update.note, now, bundle=bundle)

    def apply_update(
        self, records_: Sequence[bytes], start: int, note: str | bytes, now: int, *, bundle: bool = False
    ) -> SyncResult:
        """Verify ``records_`` (starting at seq ``start``) and the checkpoint
        ``note`` that covers them, then commit: all or nothing.

        The records must reach exactly the checkpoint's size and start at or
        below the device's size; records below it (an overlap, e.g. a bundle
        made for an older device) change nothing but must be shown to be the
        very records the device applied (:class:`Overlap`). ``bundle``: the
        update comes from a sync bundle, so a checkpoint not newer than the
        device's is "nothing new" rather than a rollback (docs/protocol.md, "Sync bundles").
        On any failure the device keeps its state, adds an
        :class:`~ledger.acceptance.Evidence` and raises the error.
        """
        pending = self.begin(start, note, now, bundle=bundle, streaming=False)
        pending.feed(records_)
        return pending.finish()

    def begin(
        self,
        start: int,
        note: str | bytes,
        now: int,
        *,
        bundle: bool = False,
        evidence: bool = True,
        streaming: bool = True,
    ) -> PendingUpdate:
        """Start verifying an update whose records arrive in pieces
        (:meth:`PendingUpdate.feed`), committed by :meth:`PendingUpdate.finish`.
        ``evidence=False``: a dry run (a relay checking records before it hands
        them to its devices) keeps no evidence and commits nothing.
        ``streaming=False``: the records are all at hand already, so the
        checkpoint is not checked ahead of them (it is checked once, at the end)."""
        return PendingUpdate(self, start, note, now, bundle=bundle, evidence=evidence, streaming=streaming)

    def _commit(self, new_state: LedgerState, accepted: AcceptedView | None, own: list[OwnGrant]) -> None:
        if not (new_state.size == self.size and accepted == self.view):  # else: the very same view again
            self._save_state(new_state, accepted, own)
        self.state, self.view, self.own_grants = new_state, accepted, own

    def _keep_evidence(
        self,
        exc: VerificationError,
        raws: Sequence[bytes],
        start: int,
        note: str | bytes,
        now: int,
        failed_at: int | None = None,
    ) -> None:
        data: bytes | None = None
        notes_: tuple[str | bytes | None, ...] = ()
        if isinstance(exc, CheckpointRejected):
            notes_ = (None if self.view is None else self.view.note, note)
        elif exc.type == "bad-note":
            data = note.encode("utf-8", "replace") if isinstance(note, str) else bytes(note)
        else:
            seq = failed_at if failed_at is not None else exc.detail.get("seq")
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
                view_to_list(accepted),
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
        """The signed receipt of the accepted head (docs/protocol.md, "Receipts")."""
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
