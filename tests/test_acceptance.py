"""ledger.acceptance: which checkpoint a device or auditor may accept (docs/protocol.md, "Checkpoints").

Each rule is played by the attacker it stops."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_sim.device import Device
from ledger import checkpoints, notes
from ledger.acceptance import (
    MAX_AHEAD,
    MAX_EVIDENCE_DATA,
    AcceptedView,
    Evidence,
    accept,
    checkpoint_size,
    verify,
)
from ledger.credential import Freshness
from ledger.crypto import SeedSigner
from ledger.errors import (
    BadMessage,
    BadNote,
    Fork,
    FutureCheckpoint,
    MissingCosignatures,
    Rollback,
    TimestampRegression,
    UntrustedCheckpoint,
    WrongOrigin,
)
from ledger.state import LedgerState
from tests.helpers.device import T0, World, signer

NOW = T0 + 1000  # the verifier's clock


@pytest.fixture(scope="module")
def world() -> World:
    w = World()
    w.grant(w.tablet.public_key, "operator", "tablet-07")
    w.grant(signer("plc").public_key, "device", "plc-17", scope="plant-1/line-3")
    return w


def state_at(w: World, size: int) -> LedgerState:
    st_ = LedgerState(w.root.public_key, origin=w.origin)
    st_.apply_all(w.records[:size])
    return st_


def test_honest_log_is_accepted(world: World) -> None:
    st_ = state_at(world, world.size)
    v = accept(None, world.checkpoint(T0 + 100), st_, now=NOW)
    assert (v.size, v.root, v.timestamp) == (world.size, world.root_at(), T0 + 100)
    assert v.note == world.checkpoint(T0 + 100)
    # the log re-signs the same head with a newer timestamp: accepted
    v2 = accept(v, world.checkpoint(T0 + 110), st_, now=NOW)
    assert v2.timestamp == T0 + 110
    # and the same note again: accepted (idempotent)
    assert accept(v2, world.checkpoint(T0 + 110), st_, now=NOW) == v2


def test_growth_is_accepted(world: World) -> None:
    v = accept(None, world.checkpoint(T0 + 100, 3), state_at(world, 3), now=NOW)
    v2 = accept(v, world.checkpoint(T0 + 101), state_at(world, world.size), now=NOW)
    assert v2.size == world.size


def test_checkpoint_bytes_are_accepted(world: World) -> None:
    note = world.checkpoint(T0 + 100)
    assert accept(None, note.encode(), state_at(world, world.size), now=NOW).note == note


def test_replayed_older_checkpoint_is_rollback(world: World) -> None:
    now_state = state_at(world, world.size)
    v = accept(None, world.checkpoint(T0 + 100), now_state, now=NOW)
    with pytest.raises(Rollback):
        accept(v, world.checkpoint(T0 + 50, 3), now_state, now=NOW)
    # even with a newer timestamp, the size may not go back
    with pytest.raises(Rollback):
        accept(v, world.checkpoint(T0 + 500, 3), now_state, now=NOW)


def test_same_size_other_root_is_fork(world: World) -> None:
    st_ = state_at(world, world.size)
    v = accept(None, world.checkpoint(T0 + 100), st_, now=NOW)
    forged = world.checkpoint(T0 + 101, root=bytes(32))
    with pytest.raises(Fork):
        accept(v, forged, st_, now=NOW)


def test_root_not_the_computed_tree_is_fork(world: World) -> None:
    st_ = state_at(world, world.size)
    with pytest.raises(Fork):
        accept(None, world.checkpoint(T0 + 100, root=world.root_at(3)), st_, now=NOW)


def test_checkpoint_beyond_the_records_applied_is_fork(world: World) -> None:
    # the log signs size 5 but the device could only compute 4 records
    with pytest.raises(Fork):
        accept(None, world.checkpoint(T0 + 100, 5), state_at(world, 4), now=NOW)


def test_checkpoint_by_ungranted_key_is_untrusted(world: World) -> None:
    with pytest.raises(UntrustedCheckpoint):
        accept(None, world.checkpoint(T0 + 100, key=signer("mallory")), state_at(world, world.size), now=NOW)


def test_checkpoint_by_the_root_key_is_untrusted(world: World) -> None:
    # the root is not a log key: it signs records, never checkpoints
    with pytest.raises(UntrustedCheckpoint):
        accept(None, world.checkpoint(T0 + 100, key=world.root), state_at(world, world.size), now=NOW)


def test_checkpoint_by_revoked_log_key_is_untrusted() -> None:
    w = World()
    new_log = signer("log-2")
    w.grant(new_log.public_key, "log", "log-2")
    w.revoke(w.log_seq, reason=1)
    st_ = state_at(w, w.size)
    with pytest.raises(UntrustedCheckpoint):
        accept(None, w.checkpoint(T0 + 100), st_, now=NOW)
    assert accept(None, w.checkpoint(T0 + 100, key=new_log), st_, now=NOW).size == w.size


def test_checkpoint_by_log_key_revoked_by_key_is_untrusted() -> None:
    w = World()
    w.revoke(w.log.public_key, reason=1)
    with pytest.raises(UntrustedCheckpoint):
        accept(None, w.checkpoint(T0 + 100), state_at(w, w.size), now=NOW)


def test_log_key_granted_only_after_the_checkpoint_is_untrusted() -> None:
    w = World()
    w.grant(signer("x").public_key, "operator", "x")
    late = signer("log-late")
    w.grant(late.public_key, "log", "late")
    # a checkpoint of size 4 signed by a key granted at seq 4
    with pytest.raises(UntrustedCheckpoint):
        accept(None, w.checkpoint(T0 + 100, 4, key=late), state_at(w, 4), now=NOW)


def test_timestamp_going_backwards_is_regression(world: World) -> None:
    st_ = state_at(world, world.size)
    v = accept(None, world.checkpoint(T0 + 100), st_, now=NOW)
    with pytest.raises(TimestampRegression):
        accept(v, world.checkpoint(T0 + 99), st_, now=NOW)


def test_timestamp_regression_across_growth(world: World) -> None:
    v = accept(None, world.checkpoint(T0 + 100, 3), state_at(world, 3), now=NOW)
    with pytest.raises(TimestampRegression):
        accept(v, world.checkpoint(T0 + 99), state_at(world, world.size), now=NOW)


def test_note_without_timestamp_keeps_the_last_one(world: World) -> None:
    v = accept(None, world.checkpoint(T0 + 100, 3), state_at(world, 3), now=NOW)
    st_ = state_at(world, world.size)
    v2 = accept(v, world.plain_checkpoint(), st_, now=NOW)
    assert (v2.size, v2.timestamp) == (world.size, T0 + 100)
    # and the carried timestamp still stops a regression afterwards
    with pytest.raises(TimestampRegression):
        accept(v2, world.checkpoint(T0 + 50), st_, now=NOW)
    # a first note with no timestamp is accepted but never fresh
    assert accept(None, world.plain_checkpoint(), st_, now=NOW).timestamp is None


def test_altered_timestamp_rejects_the_whole_note(world: World) -> None:
    note = world.checkpoint(T0 + 100)
    parsed = notes.parse_note(note)
    plain, cosig = parsed.signatures
    forged_payload = (T0 + 999_999).to_bytes(8, "big") + cosig.payload[8:]
    forged = notes.Note(parsed.body, (plain, notes.NoteSignature(cosig.name, cosig.key_id, forged_payload)))
    with pytest.raises(UntrustedCheckpoint):
        accept(None, forged.serialize(), state_at(world, world.size), now=NOW)


def test_checkpoint_of_another_origin_is_refused(world: World) -> None:
    with pytest.raises(WrongOrigin):
        accept(
            None, world.checkpoint(T0 + 100, origin="other.example/log"), state_at(world, world.size), now=NOW
        )


def test_garbage_note_is_bad_note(world: World) -> None:
    with pytest.raises(BadNote):
        accept(None, "not a checkpoint\n", state_at(world, world.size), now=NOW)
    with pytest.raises(BadNote):
        checkpoint_size(b"\xff\xfe")


def test_empty_device_knows_no_log_key() -> None:
    w = World()
    with pytest.raises(UntrustedCheckpoint):
        accept(None, w.checkpoint(T0, 0), LedgerState(w.root.public_key, origin=w.origin), now=NOW)
    with pytest.raises(UntrustedCheckpoint):
        accept(None, w.checkpoint(T0, 0), LedgerState(w.root.public_key), now=NOW)


# --- the future bound (1.1) ----------------------------------------------------


@pytest.mark.parametrize("ahead", [MAX_AHEAD + 1, 3600, 100 * 365 * 86400])
def test_future_dated_checkpoint_is_refused_and_moves_no_floor(world: World, ahead: int) -> None:
    """A stolen log key dates a checkpoint ahead of the verifier's clock: refused,
    and the view (its timestamp floor included) stays where it was."""
    st_ = state_at(world, world.size)
    v = accept(None, world.checkpoint(NOW - 10), st_, now=NOW)
    with pytest.raises(FutureCheckpoint) as info:
        accept(v, world.checkpoint(NOW + ahead), st_, now=NOW)
    assert info.value.type == "future-checkpoint"
    with pytest.raises(FutureCheckpoint):  # a first checkpoint too
        accept(None, world.checkpoint(NOW + ahead), st_, now=NOW)
    # the honest log, a second later, is accepted
    assert accept(v, world.checkpoint(NOW + 1), st_, now=NOW + 1).timestamp == NOW + 1


def test_checkpoint_up_to_300_s_ahead_is_accepted(world: World) -> None:
    st_ = state_at(world, world.size)
    v = accept(None, world.checkpoint(NOW + MAX_AHEAD), st_, now=NOW)
    assert v.timestamp == NOW + MAX_AHEAD
    assert not Freshness(v.fresh_time(), max_staleness=0).is_stale(NOW)  # counts as now


def test_stolen_log_key_far_future_then_key_replaced_device_catches_up() -> None:
    """The issue's story in the core: the future note is refused, so the
    records that revoke the stolen key and grant a new one are accepted with
    the new key's honest checkpoint."""
    w = World()
    w.grant(w.tablet.public_key, "operator", "tablet-07")
    v = accept(None, w.checkpoint(NOW - 5), state_at(w, w.size), now=NOW)
    with pytest.raises(FutureCheckpoint):
        accept(v, w.checkpoint(NOW + 100 * 365 * 86400), state_at(w, w.size), now=NOW)
    new_log = signer("log-2")
    w.grant(new_log.public_key, "log", "log-2")
    w.revoke(w.log.public_key, reason=1)
    st_ = state_at(w, w.size)
    v2 = accept(v, w.checkpoint(NOW + 60, key=new_log), st_, now=NOW + 60)
    assert (v2.size, v2.timestamp) == (w.size, NOW + 60)
    with pytest.raises(UntrustedCheckpoint):  # the stolen key signs nothing any more
        accept(v2, w.checkpoint(NOW + 70), st_, now=NOW + 70)


_DAY = 86400


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(2, 6), st.integers(-2 * _DAY, 200 * 365 * _DAY), st.integers(0, 600)),
        min_size=1,
        max_size=10,
    )
)
def test_floor_never_exceeds_now_plus_300_and_honest_log_recovers(seq: list[tuple[int, int, int]]) -> None:
    """Checkpoints by the log key with arbitrary timestamps, at a clock moving
    forward: the floor is never beyond now + 300, and afterwards an honest
    checkpoint of the current tree is accepted (at once when it is dated at or
    after the floor; in any case once the clock is 300 s later)."""
    w = _small_world()
    states = {n: state_at(w, n) for n in range(2, w.size + 1)}
    now = NOW
    v: AcceptedView | None = None
    for size, offset, step in seq:
        now += step
        current = states[max(size, v.size if v else 0)]
        with contextlib.suppress(Rollback, TimestampRegression, Fork, FutureCheckpoint):
            v = accept(v, w.checkpoint(now + offset, size), current, now=now)
        assert v is None or v.timestamp is None or v.timestamp <= now + MAX_AHEAD
    top = states[w.size]
    later = now + MAX_AHEAD
    honest = accept(v, w.checkpoint(later), top, now=later)
    assert (honest.size, honest.timestamp) == (w.size, later)


# --- witnesses (1.1) --------------------------------------------------------------


def _witness_world(n: int = 3) -> tuple[World, list[SeedSigner]]:
    w = World()
    wits = [signer(f"witness-{i}") for i in range(n)]
    for i, k in enumerate(wits):
        w.grant(k.public_key, "witness", f"witness.example/{i}")
    return w, wits


def _cosigned(w: World, ts: int, stamps: list[tuple[int, SeedSigner, int]], size: int | None = None) -> str:
    n = w.size if size is None else size
    cp = checkpoints.Checkpoint(w.origin, n, w.root_at(n))
    lines = [checkpoints.cosign(cp, f"witness.example/{i}", k, t) for i, k, t in stamps]
    return notes.add_signatures(w.checkpoint(ts, n), lines)


def test_missing_cosignatures_never_hold_records_back() -> None:
    """A log-signed checkpoint with fewer than k cosignatures is accepted (the
    records apply: a revocation is never held back) but is not fresh for k."""
    w, _wits = _witness_world()
    v = accept(None, w.checkpoint(NOW), state_at(w, w.size), now=NOW)
    assert v.size == w.size and v.fresh_time(0) == NOW
    assert v.fresh_time(1) is None
    assert Freshness.of(v, require_witnesses=1).is_stale(NOW)
    assert not Freshness.of(v).is_stale(NOW)


def test_freshness_is_the_kth_freshest_witness_timestamp() -> None:
    w, wits = _witness_world()
    st_ = state_at(w, w.size)
    note = _cosigned(w, NOW, [(0, wits[0], NOW - 50), (1, wits[1], NOW - 10), (2, wits[2], NOW - 4000)])
    v = accept(None, note, st_, now=NOW)
    assert (v.fresh_time(1), v.fresh_time(2), v.fresh_time(3), v.fresh_time(4)) == (
        NOW - 10,
        NOW - 50,
        NOW - 4000,
        None,
    )
    # never the log's own timestamp: the log alone cannot make a k-witness device fresh
    assert v.fresh_time(0) == NOW
    f = Freshness.of(v, require_witnesses=3, max_staleness=3600)
    assert f.checkpoint_time == NOW - 4000 and f.is_stale(NOW)
    # cosignatures arriving later for the same tree accumulate
    v2 = accept(v, _cosigned(w, NOW + 5, [(2, wits[2], NOW + 1)]), st_, now=NOW + 5)
    assert v2.fresh_time(3) == NOW - 50
    assert AcceptedView.from_json(json.loads(json.dumps(v2.to_json()))) == v2
    assert AcceptedView.from_list(v2.to_list()) == v2


def test_split_view_no_witness_saw_is_not_fresh() -> None:
    """The log's key shows one device a tree no witness cosigned: its records
    apply, but the device's freshness no longer rests on the older cosignatures."""
    w, wits = _witness_world(1)
    v = accept(None, _cosigned(w, NOW, [(0, wits[0], NOW)]), state_at(w, w.size), now=NOW)
    assert v.fresh_time(1) == NOW
    w.grant(signer("secret").public_key, "operator", "secret")
    v2 = accept(v, w.checkpoint(NOW + 1), state_at(w, w.size), now=NOW + 1)
    assert v2.size == w.size and v2.fresh_time(1) is None
    # the witness cosigns the new tree: fresh again
    v3 = accept(v2, _cosigned(w, NOW + 2, [(0, wits[0], NOW + 2)]), state_at(w, w.size), now=NOW + 2)
    assert v3.fresh_time(1) == NOW + 2


def test_future_witness_cosignature_is_not_counted_and_sets_no_floor() -> None:
    w, wits = _witness_world(1)
    st_ = state_at(w, w.size)
    far = NOW + 100 * 365 * _DAY
    v = accept(None, _cosigned(w, NOW, [(0, wits[0], far)]), st_, now=NOW)
    assert v.size == w.size and v.fresh_time(1) is None and v.witnesses == ()
    # the witness's honest cosignature afterwards counts
    v2 = accept(v, _cosigned(w, NOW + 1, [(0, wits[0], NOW + 1)]), st_, now=NOW + 1)
    assert v2.fresh_time(1) == NOW + 1
    # up to 300 s ahead counts, as now
    v3 = accept(v2, _cosigned(w, NOW + 2, [(0, wits[0], NOW + 2 + MAX_AHEAD)]), st_, now=NOW + 2)
    assert v3.fresh_time(1) == NOW + 2 + MAX_AHEAD
    assert not Freshness.of(v3, require_witnesses=1, max_staleness=0).is_stale(NOW + 2)


def test_witness_timestamp_below_its_floor_is_not_counted() -> None:
    """A witness floor never goes back: an older cosignature (replayed, or a
    witness whose clock went back) does not lower it, and counts for nothing on a new tree."""
    w, wits = _witness_world(1)
    v = accept(None, _cosigned(w, NOW, [(0, wits[0], NOW)]), state_at(w, w.size), now=NOW)
    same = accept(v, _cosigned(w, NOW + 1, [(0, wits[0], NOW - 100)]), state_at(w, w.size), now=NOW + 1)
    assert same.witnesses == v.witnesses and same.fresh_time(1) == NOW
    w.grant(signer("x").public_key, "operator", "x")
    grown = accept(v, _cosigned(w, NOW + 2, [(0, wits[0], NOW - 100)]), state_at(w, w.size), now=NOW + 2)
    assert grown.size == w.size and grown.fresh_time(1) is None
    assert grown.witnesses[0].timestamp == NOW  # the floor stays


def test_revoked_witness_no_longer_counts() -> None:
    w, wits = _witness_world(1)
    v = accept(None, _cosigned(w, NOW, [(0, wits[0], NOW)]), state_at(w, w.size), now=NOW)
    w.revoke(wits[0].public_key, reason=1)
    v2 = accept(v, _cosigned(w, NOW + 1, [(0, wits[0], NOW + 1)]), state_at(w, w.size), now=NOW + 1)
    assert v2.size == w.size and v2.witnesses == () and v2.fresh_time(1) is None


def test_auditor_can_still_require_cosignatures() -> None:
    w, wits = _witness_world(1)
    with pytest.raises(MissingCosignatures):
        verify(w.checkpoint(NOW), state_at(w, w.size), now=NOW, require_witnesses=1)
    vc = verify(_cosigned(w, NOW, [(0, wits[0], NOW)]), state_at(w, w.size), now=NOW, require_witnesses=1)
    assert vc.witness_stamps == ((wits[0].public_key, NOW),)
    with pytest.raises(FutureCheckpoint):
        verify(w.checkpoint(NOW + MAX_AHEAD + 1), state_at(w, w.size), now=NOW)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(2, 6), st.integers(0, 20)), min_size=1, max_size=12))
def test_accepted_views_never_go_back(seq: list[tuple[int, int]]) -> None:
    """Whatever order an honest log's checkpoints arrive in, the accepted
    sizes and timestamps never decrease and every accepted root is the tree's."""
    w = _small_world()
    states = {n: state_at(w, n) for n in range(2, w.size + 1)}
    v: AcceptedView | None = None
    for size, ts in seq:
        current = states[max(size, v.size if v else 0)]
        try:
            new = accept(v, w.checkpoint(T0 + ts, size), current, now=NOW)
        except (Rollback, TimestampRegression, Fork):
            continue
        assert new.root == w.root_at(size)
        if v is not None:
            assert new.size >= v.size
            assert new.timestamp is not None and v.timestamp is not None and new.timestamp >= v.timestamp
        v = new


_SMALL: list[World] = []


def _small_world() -> World:
    if not _SMALL:
        w = World()
        for i in range(3):
            w.grant(signer(f"op-{i}").public_key, "operator", f"op-{i}")
        _SMALL.append(w)
    return _SMALL[0]


# --- values -----------------------------------------------------------------


def test_accepted_view_json_round_trip(world: World) -> None:
    v = accept(None, world.checkpoint(T0 + 100), state_at(world, world.size), now=NOW)
    assert AcceptedView.from_json(json.loads(json.dumps(v.to_json()))) == v
    with pytest.raises(BadMessage):
        AcceptedView.from_json({"size": 1})
    with pytest.raises(BadMessage):
        AcceptedView.from_json({"size": 1, "root": "00", "timestamp": None, "note": ""})


def test_evidence_keeps_both_notes_and_round_trips(world: World) -> None:
    st_ = state_at(world, world.size)
    v = accept(None, world.checkpoint(T0 + 100), st_, now=NOW)
    forged = world.checkpoint(T0 + 101, root=bytes(32))
    with pytest.raises(Fork) as info:
        accept(v, forged, st_, now=NOW)
    ev = Evidence.from_error(info.value, observed_at=T0 + 102, notes=(v.note, forged))
    assert ev.kind == "fork" and ev.notes == (v.note, forged) and ev.observed_at == T0 + 102
    assert Evidence.from_json(json.loads(json.dumps(ev.to_json()))) == ev


def test_evidence_clips_bad_data() -> None:
    ev = Evidence.from_error(BadNote("x"), observed_at=1, data=b"\xaa" * 100_000)
    assert ev.data is not None and len(ev.data) == 2 * MAX_EVIDENCE_DATA
    with pytest.raises(BadMessage):
        Evidence.from_json({"kind": "fork"})
    with pytest.raises(BadMessage):
        Evidence.from_json({"kind": 1, "detail": "", "observed_at": 0})
    with pytest.raises(BadMessage):
        Evidence.from_json([])


def test_view_with_witness_stamps_survives_a_device_restart(tmp_path: Path) -> None:
    w, wits = _witness_world(2)
    dev = Device.create(w.root.public_key, w.origin, directory=tmp_path / "d", now=NOW, require_witnesses=2)
    note = _cosigned(w, NOW, [(0, wits[0], NOW - 1), (1, wits[1], NOW - 2)])
    dev.apply_update(w.records, 0, note, NOW)
    again = Device.load(tmp_path / "d")
    assert again.view == dev.view and again.view is not None and len(again.view.witnesses) == 2
    assert again.freshness().checkpoint_time == NOW - 2 and not again.is_stale(NOW)
    # the four-element form written before witness floors still loads
    assert dev.view is not None
    old = AcceptedView.from_list(dev.view.to_list()[:4])
    assert (old.size, old.timestamp, old.witnesses) == (dev.view.size, NOW, ())
    for bad in ([*dev.view.to_list()[:4], [b"k"]], [*dev.view.to_list()[:4], [b"x" * 32, 1]], [1, 2]):
        with pytest.raises(BadMessage):
            AcceptedView.from_list(bad)


_WW: list[tuple[World, list[SeedSigner]]] = []


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 600),  # the clock moves forward by this much
            st.booleans(),  # the tree grows by one record first
            st.lists(st.tuples(st.integers(0, 2), st.integers(-2 * _DAY, 200 * 365 * _DAY)), max_size=3),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_witness_floors_never_exceed_now_plus_300_and_honest_witnesses_make_fresh(
    seq: list[tuple[int, bool, list[tuple[int, int]]]],
) -> None:
    if not _WW:
        w0, wits0 = _witness_world()
        for i in range(8):
            w0.grant(signer(f"ww-{i}").public_key, "operator", f"ww-{i}")
        _WW.append((w0, wits0))
    w, wits = _WW[0]
    size = w.size - 8
    now = NOW
    v: AcceptedView | None = None
    for step, grow, stamps in seq:
        now += step
        size += int(grow)
        by_witness = {i: off for i, off in stamps}  # one cosignature per witness and note
        note = _cosigned(w, now, [(i, wits[i], now + off) for i, off in by_witness.items()], size)
        v = accept(v, note, state_at(w, size), now=now)
        assert all(s.timestamp <= now + MAX_AHEAD for s in v.witnesses)
        for k in (1, 2, 3):
            t = v.fresh_time(k)
            assert t is None or t <= now + MAX_AHEAD
    assert v is not None
    later = now + MAX_AHEAD
    honest = _cosigned(w, later, [(i, wits[i], later) for i in range(3)], w.size)
    v2 = accept(v, honest, state_at(w, w.size), now=later)
    assert v2.fresh_time(3) == later and not Freshness.of(v2, require_witnesses=3).is_stale(later)
