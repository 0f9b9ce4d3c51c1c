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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ledger import credential, encoding, errors, messages, notes, records, tree, view
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
    "Overlap",
    "OwnGrant",
    "PendingUpdate",
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
    #: a bundle not newer than the device: the size of its checkpoint (nothing was applied)
    nothing_new: int | None = None

    @property
    def appended(self) -> int:
        return self.size - self.previous_size

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "size": self.size,
            "root": self.root.hex(),
            "checkpoint_time": self.checkpoint_time,
            "appended": self.appended,
            "stale": self.stale,
            "nothing_new": self.nothing_new is not None,
        }
        if self.nothing_new is not None:
            out["bundle_size"] = self.nothing_new
            out["note"] = (
                f"nothing new: the bundle's checkpoint (size {self.nothing_new}) is not newer than "
                f"this device's (size {self.size}); its overlapping records match what the device applied"
            )
        return out


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
        device's is "nothing new" rather than a rollback (PROTOCOL section 7).
        On any failure the device keeps its state, adds an
        :class:`~ledger.view.Evidence` and raises the error.
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


# --- one update, verified as it arrives -------------------------------------------


class Overlap:
    """Shows that records sent again (an overlap with what the device applied)
    are the very records it applied, with only the O(log n) hashes it keeps.

    The device keeps the compact range of its tree of ``n`` leaves: one hash
    per set bit of ``n``, the roots of the perfect subtrees ``[0, b1)``,
    ``[b1, b2)``, ... ``[b(k-1), n)``, largest first. The method:

    - The overlap starts at seq ``s``. When ``s`` is 0 or one of the
      boundaries ``b(i)``, the subtrees left of ``s`` are exactly the compact
      range of a tree of ``s`` leaves (the range's *left part*). The check
      starts from that left part and appends the leaf hash of each overlapping
      record, so it always holds the compact range of the tree the overlap
      claims.
    - After ``t`` overlap records (``s + t <= n``), every subtree of the
      device's range that ends at or before ``s + t`` is also one of the
      running range's subtrees (both split their sizes greedily into powers of
      two, and ``s + t`` and ``n`` share every bit down to that subtree), so
      the two hashes must be equal; at ``s + t = n`` the running range *is*
      the device's range, so its root is the device's root. A record that
      differs anywhere changes one of those hashes (SHA-256): a fork. Where
      the overlap stops before the device's next subtree boundary, its last
      records are bound instead by the root of the checkpoint they come with
      (a bundle not newer than the device: :meth:`PendingUpdate.finish`).
    - When ``s`` falls *inside* one of the device's subtrees, the leaves
      before ``s`` in that subtree are unknown to the device, so records from
      ``s`` on cannot be shown to be the ones it applied; the sync is refused
      as a fork, with the record as evidence and the starts that would work
      (0, or the subtree's first seq) in the message. ``writ bundle export``
      starts at 0 unless told otherwise, so its bundles are always checked.

    Every overlapping record must also parse and sit at its own seq
    (``stale-head``), and one whose leaf hash the device kept (a grant it may
    have to honour) is compared directly, naming that record.
    """

    def __init__(self, state: LedgerState, start: int) -> None:
        self.state = state
        self.start = start
        self.next = start
        nodes: list[tuple[int, int, bytes]] = []  # (first seq, end seq, hash) of the device's subtrees
        a, n = 0, state.size
        for h in state.frontier.hashes:
            width = 1 << (n - a).bit_length() - 1
            nodes.append((a, a + width, h))
            a += width
        self.nodes = nodes
        left = [h for _, end, h in nodes if end <= start]
        self.aligned = start == 0 or any(end == start for _, end, _ in nodes)
        self.running: tree.CompactRange | None = (
            tree.CompactRange(start, left) if self.aligned and start <= state.size else None
        )
        self.inside = next(((a, b) for a, b, _ in nodes if a < start < b), None)

    def add(self, raw: bytes) -> None:
        """The next overlapping record (seq ``self.next``)."""
        seq = self.next
        env = records.parse(raw)
        if env.seq != seq:
            raise StaleHead(f"the record served at position {seq} says seq {env.seq}", seq=seq)
        leaf = tree.leaf_hash(raw)
        kept = self.state.grants.get(seq)
        if kept is not None and kept.leaf_hash != leaf:
            raise Fork(f"record {seq} is not the record this device applied at that seq", seq=seq)
        if self.running is None:
            a, b = self.inside if self.inside is not None else (0, self.state.size)
            starts = "seq 0" if a == 0 else f"seq 0 or seq {a}"
            raise Fork(
                f"record {seq} cannot be shown to be the record this device applied: the overlap "
                f"starts inside the subtree [{a}, {b}) that the device keeps as one hash; a bundle "
                f"starting at {starts} can be checked",
                seq=seq,
            )
        self.running.append(leaf)
        self.next += 1
        self.check()

    def check(self) -> None:
        """Every device subtree the overlap has covered so far matches."""
        if self.running is None:
            return
        t = self.running.size
        hashes = self.running.hashes
        for i, (_, end, h) in enumerate(self.nodes):
            if end > t:
                break
            if end <= self.start:
                continue  # the left part itself
            if i >= len(hashes) or hashes[i] != h:
                raise Fork(
                    f"the records [{self.start}, {t}) are not the ones this device applied "
                    f"(the subtree ending at seq {end} differs)",
                    seq=end - 1,
                )

    def root(self) -> bytes | None:
        """The root of the tree [0, next) the overlap claims, when the device can compute it."""
        return None if self.running is None else self.running.root()


class PendingUpdate:
    """One update being verified: its records are applied, as they arrive, to
    a copy of the device's state, so a source can stream them (tile by tile)
    and stop at the first invalid record; nothing is committed before
    :meth:`finish`, nothing is sized by the checkpoint's unverified size.

    ``note_verified`` says whether the checkpoint's signature already verifies
    under a log key the device knows (then a source may fetch a few tiles
    ahead; otherwise one at a time: what was downloaded is bounded by what was
    verified plus one tile). A checkpoint that does not verify yet is not
    refused here: the records it covers may grant the new log key that signed
    it; :meth:`finish` decides.
    """

    def __init__(
        self,
        device: Device,
        start: int,
        note: str | bytes,
        now: int,
        *,
        bundle: bool = False,
        evidence: bool = True,
        streaming: bool = True,
    ) -> None:
        self.device = device
        self.streaming = streaming
        self.start = start
        self.note = note
        self.now = now
        self.bundle = bundle
        self.evidence = evidence
        self.base = device.state
        self.next = start
        self.new: LedgerState | None = None
        self.own = list(device.own_grants)
        self.overlap: Overlap | None = None
        self.note_verified = False
        self.size = 0
        self._run(self._begin, [], start)

    def _run(self, step: Callable[[], None], raws: Sequence[bytes], at: int) -> None:
        """Run ``step``; on a verification failure keep the evidence (the refused record)."""
        try:
            step()
        except VerificationError as exc:
            if self.evidence:
                seq = self.new.size if self.new is not None and self.new.size >= at else None
                self.device._keep_evidence(exc, raws, at, self.note, self.now, failed_at=seq)
            raise

    def _begin(self) -> None:
        self.size = view.checkpoint_size(self.note)
        if type(self.start) is not int or self.start < 0:
            raise BadMessage("records start at a seq >= 0")
        if self.start > self.base.size:
            raise BadMessage(
                f"records start at seq {self.start} but the device has only {self.base.size}: a gap",
                start=self.start,
                size=self.base.size,
            )
        if self.start < self.base.size:
            self.overlap = Overlap(self.base, self.start)
        if self.streaming and self.size > self.base.size:
            self.check_note()

    def check_note(self) -> bool:
        """Does the checkpoint verify under a log key known so far (the
        device's, or one granted by the records applied since)? Sets and
        returns ``note_verified``; never raises: a note signed by a key still
        to come is judged by :meth:`finish`."""
        if not self.note_verified:
            st = self.new if self.new is not None else self.base
            keys = st.active_keys(records.ROLE_LOG)
            if keys and st.origin is not None:
                try:
                    notes.verify_checkpoint(self.note, st.origin, keys)
                    self.note_verified = True
                except VerificationError:
                    pass
        return self.note_verified

    @property
    def wanted(self) -> int:
        """How many more records the checkpoint claims (unverified: never allocate by it)."""
        return max(0, self.size - self.next)

    def feed(self, raws: Sequence[bytes]) -> None:
        """Apply the next records (from seq ``self.next``); raises at the first invalid one."""
        self._run(lambda: self._feed(raws), raws, self.next)

    def _feed(self, raws: Sequence[bytes]) -> None:
        at = self.next
        if raws and at + len(raws) > self.size:
            raise BadMessage(
                f"records [{self.start}, {at + len(raws)}) go beyond the checkpoint's size {self.size}",
                start=self.start,
                end=at + len(raws),
                checkpoint_size=self.size,
            )
        i = 0
        while i < len(raws) and self.next < self.base.size:
            assert self.overlap is not None
            self.overlap.add(raws[i])
            self.next += 1
            i += 1
        rest = raws[i:]
        if not rest:
            return
        if self.new is None:
            self.new = self.base.copy()
        if self.new.size == 0 and self.bundle:
            self._same_ledger(rest[0])
        applied = self.new.apply_all(list(rest))
        self.next += len(applied)
        key = self.device.public_key
        for rec in applied:
            body = rec.body
            if isinstance(body, records.Grant) and body.role == records.ROLE_DEVICE and body.subject == key:
                self.own.append(OwnGrant(body.seq, body.scope, body.name))

    def _same_ledger(self, raw: bytes) -> None:
        """A device with no state given another ledger's bundle: ``wrong-ledger``, both named."""
        try:
            env = records.parse(raw)
        except VerificationError:
            return  # the rules name it
        if env.kind is not records.Kind.GENESIS or len(env.extra) != 3:
            return
        origin, root = env.extra[0], env.extra[1]
        cfg = self.device.config
        if (type(root) is bytes and len(root) == 32 and root != cfg.anchor) or (
            type(origin) is str and origin != cfg.origin
        ):
            shown = root.hex() if type(root) is bytes else "?"
            raise errors.WrongLedger(
                f"this bundle is of another ledger (origin {str(origin)[:128]!r}, anchor {shown}); "
                f"this device belongs to origin {cfg.origin!r}, anchor {cfg.anchor.hex()}",
                seq=0,
                anchor=cfg.anchor.hex(),
                bundle_anchor=shown,
            )

    def finish(self, *, complete: bool = True) -> SyncResult:
        """Accept the checkpoint over what was applied and commit, or raise.

        ``complete=False``: the source ran out of records before the
        checkpoint's size (it has no more tiles); the checkpoint is then
        judged against the tree applied so far, which refuses it."""
        out: list[SyncResult] = []
        self._run(lambda: out.append(self._finish(complete)), [], self.next)
        return out[0]

    def _finish(self, complete: bool) -> SyncResult:
        dev = self.device
        cur = self.base
        if complete and self.next != self.size and (self.next != self.start or self.size > cur.size):
            raise BadMessage(
                f"records [{self.start}, {self.next}) do not end at the checkpoint's size {self.size}",
                start=self.start,
                end=self.next,
                checkpoint_size=self.size,
            )
        if self.overlap is not None:
            self.overlap.check()
        if self.size <= cur.size and self.new is None:
            if self.size == 0:  # an empty ledger: nothing to verify, nothing learnt
                return SyncResult(dev.size, dev.root, dev.checkpoint_time, dev.size, dev.is_stale(self.now))
            if self.bundle:
                return self._nothing_new()
            accepted = view.accept(dev.view, self.note, cur, now=self.now)
            return self._commit(cur, accepted)
        new = self.new if self.new is not None else cur.copy()
        accepted = view.accept(dev.view, self.note, new, now=self.now)
        return self._commit(new, accepted)

    def _commit(self, new: LedgerState, accepted: AcceptedView) -> SyncResult:
        dev = self.device
        previous = dev.size
        if self.evidence:
            dev._commit(new, accepted, self.own)
            return SyncResult(new.size, new.root, dev.checkpoint_time, previous, dev.is_stale(self.now))
        return SyncResult(new.size, new.root, accepted.timestamp, previous, False)

    def _nothing_new(self) -> SyncResult:
        """A bundle not newer than the device (PROTOCOL section 7): an old USB
        stick is not an alarm, but its records were checked (:class:`Overlap`)
        and its checkpoint must be one the log signed over them.

        At the device's own size the checkpoint goes through the usual
        acceptance (same root; a newer timestamp refreshes the view, an older
        one is simply old). Below it, the note must verify under a key that
        was a granted, unrevoked ``log`` key at the note's size, and, where
        the device can compute the tree the bundle's records claim, its root
        must be the note's root; either failure is refused with evidence."""
        dev = self.device
        cur = self.base
        if self.size == cur.size:
            try:
                accepted = view.accept(dev.view, self.note, cur, now=self.now)
            except errors.TimestampRegression:
                return self._old(cur)  # the same tree, signed earlier: an old stick
            if accepted != dev.view:  # the same tree, signed later: the view is fresher
                return self._commit(cur, accepted)
            return self._old(cur)
        origin = cur.origin if cur.origin is not None else dev.config.origin
        vc = notes.verify_checkpoint(self.note, origin, _log_keys_at(cur, self.size))
        # the tree [0, size) the bundle's records claim (with no records: the device's own prefix,
        # when the bundle's size is one of its subtree boundaries)
        claimed = self.overlap.root() if self.overlap is not None and self.next == self.size else None
        if claimed is not None and claimed != vc.checkpoint.root:
            raise Fork(
                f"the bundle's checkpoint of size {self.size} is not the tree of the records this "
                "device applied",
                size=self.size,
            )
        return self._old(cur)

    def _old(self, cur: LedgerState) -> SyncResult:
        dev = self.device
        return SyncResult(
            cur.size, cur.root, dev.checkpoint_time, cur.size, dev.is_stale(self.now), nothing_new=self.size
        )


def _log_keys_at(state: LedgerState, size: int) -> list[bytes]:
    """The keys that were granted role ``log`` and not revoked (by id or key)
    within records[0:size]. A grant revoked by id at a time the state did not
    keep (a compact state keeps the revoked bit, not the details) counts as
    revoked: the safer reading."""
    out = []
    for g in state.grants.values():
        if g.role != records.ROLE_LOG or g.seq >= size:
            continue
        if state.is_revoked(g.seq):
            by_id = state.revocations.get(g.seq)
            if by_id is None or by_id.seq < size:
                continue
        by_key = state.revoked_keys.get(g.subject)
        if by_key is None or by_key >= size:
            out.append(g.subject)
    return out


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
