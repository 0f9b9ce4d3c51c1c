"""One update, verified as it arrives (:class:`PendingUpdate`), and the proof
that records sent again are the ones the device applied (:class:`Overlap`).

A :class:`~device_sim.device.Device` starts one with
:meth:`~device_sim.device.Device.begin`; a source feeds it records as they
come (tile by tile, or a stream's entry bundle) and :meth:`PendingUpdate.finish`
accepts the checkpoint and commits, all or nothing. Both classes are
re-exported by :mod:`device_sim.device`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ledger import acceptance, checkpoints, errors, records, tree
from ledger.acceptance import AcceptedView
from ledger.errors import BadMessage, Fork, StaleHead, VerificationError
from ledger.state import LedgerState

from .values import OwnGrant, SyncResult

if TYPE_CHECKING:
    from .device import Device

__all__ = ["Overlap", "PendingUpdate"]


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
        self.size = acceptance.checkpoint_size(self.note)
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
                    checkpoints.verify_checkpoint(self.note, st.origin, keys)
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
            accepted = acceptance.accept(dev.view, self.note, cur, now=self.now)
            return self._commit(cur, accepted)
        new = self.new if self.new is not None else cur.copy()
        accepted = acceptance.accept(dev.view, self.note, new, now=self.now)
        return self._commit(new, accepted)

    def _commit(self, new: LedgerState, accepted: AcceptedView) -> SyncResult:
        dev = self.device
        previous = dev.size
        if self.evidence:
            dev._commit(new, accepted, self.own)
            return SyncResult(new.size, new.root, dev.checkpoint_time, previous, dev.is_stale(self.now))
        return SyncResult(new.size, new.root, accepted.timestamp, previous, False)

    def _nothing_new(self) -> SyncResult:
        """A bundle not newer than the device (docs/protocol.md, "Sync bundles"): an old USB
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
                accepted = acceptance.accept(dev.view, self.note, cur, now=self.now)
            except errors.TimestampRegression:
                return self._old(cur)  # the same tree, signed earlier: an old stick
            if accepted != dev.view:  # the same tree, signed later: the view is fresher
                return self._commit(cur, accepted)
            return self._old(cur)
        origin = cur.origin if cur.origin is not None else dev.config.origin
        vc = checkpoints.verify_checkpoint(self.note, origin, _log_keys_at(cur, self.size))
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
