"""ledger.view: which checkpoint a device or auditor may accept (PROTOCOL section 5).

Each rule is played by the attacker it stops."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger import notes
from ledger.errors import (
    BadMessage,
    BadNote,
    Fork,
    MissingCosignatures,
    Rollback,
    TimestampRegression,
    UntrustedCheckpoint,
    WrongOrigin,
)
from ledger.state import LedgerState
from ledger.view import MAX_EVIDENCE_DATA, AcceptedView, Evidence, accept, checkpoint_size
from tests.device_fixtures import T0, World, signer


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
    v = accept(None, world.checkpoint(T0 + 100), st_)
    assert (v.size, v.root, v.timestamp) == (world.size, world.root_at(), T0 + 100)
    assert v.note == world.checkpoint(T0 + 100)
    # the log re-signs the same head with a newer timestamp: accepted
    v2 = accept(v, world.checkpoint(T0 + 110), st_)
    assert v2.timestamp == T0 + 110
    # and the same note again: accepted (idempotent)
    assert accept(v2, world.checkpoint(T0 + 110), st_) == v2


def test_growth_is_accepted(world: World) -> None:
    v = accept(None, world.checkpoint(T0 + 100, 3), state_at(world, 3))
    v2 = accept(v, world.checkpoint(T0 + 101), state_at(world, world.size))
    assert v2.size == world.size


def test_checkpoint_bytes_are_accepted(world: World) -> None:
    note = world.checkpoint(T0 + 100)
    assert accept(None, note.encode(), state_at(world, world.size)).note == note


def test_replayed_older_checkpoint_is_rollback(world: World) -> None:
    now_state = state_at(world, world.size)
    v = accept(None, world.checkpoint(T0 + 100), now_state)
    with pytest.raises(Rollback):
        accept(v, world.checkpoint(T0 + 50, 3), now_state)
    # even with a newer timestamp, the size may not go back
    with pytest.raises(Rollback):
        accept(v, world.checkpoint(T0 + 500, 3), now_state)


def test_same_size_other_root_is_fork(world: World) -> None:
    st_ = state_at(world, world.size)
    v = accept(None, world.checkpoint(T0 + 100), st_)
    forged = world.checkpoint(T0 + 101, root=bytes(32))
    with pytest.raises(Fork):
        accept(v, forged, st_)


def test_root_not_the_computed_tree_is_fork(world: World) -> None:
    st_ = state_at(world, world.size)
    with pytest.raises(Fork):
        accept(None, world.checkpoint(T0 + 100, root=world.root_at(3)), st_)


def test_checkpoint_beyond_the_records_applied_is_fork(world: World) -> None:
    # the log signs size 5 but the device could only compute 4 records
    with pytest.raises(Fork):
        accept(None, world.checkpoint(T0 + 100, 5), state_at(world, 4))


def test_checkpoint_by_ungranted_key_is_untrusted(world: World) -> None:
    with pytest.raises(UntrustedCheckpoint):
        accept(None, world.checkpoint(T0 + 100, key=signer("mallory")), state_at(world, world.size))


def test_checkpoint_by_the_root_key_is_untrusted(world: World) -> None:
    # the root is not a log key: it signs records, never checkpoints
    with pytest.raises(UntrustedCheckpoint):
        accept(None, world.checkpoint(T0 + 100, key=world.root), state_at(world, world.size))


def test_checkpoint_by_revoked_log_key_is_untrusted() -> None:
    w = World()
    new_log = signer("log-2")
    w.grant(new_log.public_key, "log", "log-2")
    w.revoke(w.log_seq, reason=1)
    st_ = state_at(w, w.size)
    with pytest.raises(UntrustedCheckpoint):
        accept(None, w.checkpoint(T0 + 100), st_)
    assert accept(None, w.checkpoint(T0 + 100, key=new_log), st_).size == w.size


def test_checkpoint_by_log_key_revoked_by_key_is_untrusted() -> None:
    w = World()
    w.revoke(w.log.public_key, reason=1)
    with pytest.raises(UntrustedCheckpoint):
        accept(None, w.checkpoint(T0 + 100), state_at(w, w.size))


def test_log_key_granted_only_after_the_checkpoint_is_untrusted() -> None:
    w = World()
    w.grant(signer("x").public_key, "operator", "x")
    late = signer("log-late")
    w.grant(late.public_key, "log", "late")
    # a checkpoint of size 4 signed by a key granted at seq 4
    with pytest.raises(UntrustedCheckpoint):
        accept(None, w.checkpoint(T0 + 100, 4, key=late), state_at(w, 4))


def test_timestamp_going_backwards_is_regression(world: World) -> None:
    st_ = state_at(world, world.size)
    v = accept(None, world.checkpoint(T0 + 100), st_)
    with pytest.raises(TimestampRegression):
        accept(v, world.checkpoint(T0 + 99), st_)


def test_timestamp_regression_across_growth(world: World) -> None:
    v = accept(None, world.checkpoint(T0 + 100, 3), state_at(world, 3))
    with pytest.raises(TimestampRegression):
        accept(v, world.checkpoint(T0 + 99), state_at(world, world.size))


def test_note_without_timestamp_keeps_the_last_one(world: World) -> None:
    v = accept(None, world.checkpoint(T0 + 100, 3), state_at(world, 3))
    st_ = state_at(world, world.size)
    v2 = accept(v, world.plain_checkpoint(), st_)
    assert (v2.size, v2.timestamp) == (world.size, T0 + 100)
    # and the carried timestamp still stops a regression afterwards
    with pytest.raises(TimestampRegression):
        accept(v2, world.checkpoint(T0 + 50), st_)
    # a first note with no timestamp is accepted but never fresh
    assert accept(None, world.plain_checkpoint(), st_).timestamp is None


def test_altered_timestamp_rejects_the_whole_note(world: World) -> None:
    note = world.checkpoint(T0 + 100)
    parsed = notes.parse_note(note)
    plain, cosig = parsed.signatures
    forged_payload = (T0 + 999_999).to_bytes(8, "big") + cosig.payload[8:]
    forged = notes.Note(parsed.body, (plain, notes.NoteSignature(cosig.name, cosig.key_id, forged_payload)))
    with pytest.raises(UntrustedCheckpoint):
        accept(None, forged.serialize(), state_at(world, world.size))


def test_checkpoint_of_another_origin_is_refused(world: World) -> None:
    with pytest.raises(WrongOrigin):
        accept(None, world.checkpoint(T0 + 100, origin="other.example/log"), state_at(world, world.size))


def test_garbage_note_is_bad_note(world: World) -> None:
    with pytest.raises(BadNote):
        accept(None, "not a checkpoint\n", state_at(world, world.size))
    with pytest.raises(BadNote):
        checkpoint_size(b"\xff\xfe")


def test_empty_device_knows_no_log_key() -> None:
    w = World()
    with pytest.raises(UntrustedCheckpoint):
        accept(None, w.checkpoint(T0, 0), LedgerState(w.root.public_key, origin=w.origin))
    with pytest.raises(UntrustedCheckpoint):
        accept(None, w.checkpoint(T0, 0), LedgerState(w.root.public_key))


def test_witnesses_required() -> None:
    w = World()
    wit = signer("witness-a")
    w.grant(wit.public_key, "witness", "witness.example/a")
    st_ = state_at(w, w.size)
    note = w.checkpoint(T0 + 100)
    with pytest.raises(MissingCosignatures):
        accept(None, note, st_, require_witnesses=1)
    cp = notes.Checkpoint(w.origin, w.size, w.root_at())
    cosigned = notes.add_signatures(note, [notes.cosign(cp, "witness.example/a", wit, T0 + 101)])
    assert accept(None, cosigned, st_, require_witnesses=1).size == w.size
    # a revoked witness no longer counts
    w.revoke(wit.public_key, reason=1)
    st2 = state_at(w, w.size)
    cp2 = notes.Checkpoint(w.origin, w.size, w.root_at())
    note2 = notes.add_signatures(
        w.checkpoint(T0 + 200), [notes.cosign(cp2, "witness.example/a", wit, T0 + 201)]
    )
    with pytest.raises(MissingCosignatures):
        accept(None, note2, st2, require_witnesses=1)


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
            new = accept(v, w.checkpoint(T0 + ts, size), current)
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
    v = accept(None, world.checkpoint(T0 + 100), state_at(world, world.size))
    assert AcceptedView.from_json(json.loads(json.dumps(v.to_json()))) == v
    with pytest.raises(BadMessage):
        AcceptedView.from_json({"size": 1})
    with pytest.raises(BadMessage):
        AcceptedView.from_json({"size": 1, "root": "00", "timestamp": None, "note": ""})


def test_evidence_keeps_both_notes_and_round_trips(world: World) -> None:
    st_ = state_at(world, world.size)
    v = accept(None, world.checkpoint(T0 + 100), st_)
    forged = world.checkpoint(T0 + 101, root=bytes(32))
    with pytest.raises(Fork) as info:
        accept(v, forged, st_)
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
