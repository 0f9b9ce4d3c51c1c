"""ledger.compact: the compact event format of GET /v1/events (docs/protocol.md, "HTTP")."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_sim.sse import Event, compact_event
from ledger import checkpoints, compact, notes
from ledger.errors import BadMessage, UntrustedCheckpoint
from tests.helpers.device import T0, World, signer

TS = T0 + 900


def _world(n: int = 3) -> World:
    w = World()
    for i in range(n):
        w.grant(signer(f"k{i}").public_key, "operator", f"k{i}")
    return w


def test_delta_round_trips_to_the_exact_note() -> None:
    w = _world()
    prev, note = w.checkpoint(TS, w.size - 2), w.checkpoint(TS + 1)
    data = json.loads(compact.encode(prev, note, w.size, w.records[-2:]))
    assert type(data) is str  # the delta form
    assert compact.decode(prev, w.size, data) == (w.records[-2:], note)
    full = json.loads(compact.encode(None, note, w.size, []))
    assert full[1] == note and compact.decode(None, w.size, full) == ([], note)


def test_a_note_of_another_shape_is_sent_whole() -> None:
    """A witness cosignature appears: the previous note is no template."""
    w = _world()
    prev = w.checkpoint(TS)
    witness = notes.sign_note(prev.split("\n\n")[0] + "\n", [("witness.example", signer("w"))])
    note = notes.add_signatures(w.checkpoint(TS + 1), [witness.split("\n\n")[1]])
    data = json.loads(compact.encode(prev, note, w.size, []))
    assert data == ["", note]
    assert compact.decode(prev, w.size, data) == ([], note)


def test_a_delta_applied_to_the_wrong_size_yields_a_note_that_does_not_verify() -> None:
    """The rebuilt note is only a candidate: a lying id gives a note the log never signed."""
    w = _world()
    prev, note = w.checkpoint(TS, w.size - 1), w.checkpoint(TS + 1)
    data = json.loads(compact.encode(prev, note, w.size, w.records[-1:]))
    _, forged = compact.decode(prev, w.size + 1, data)
    assert forged != note
    with pytest.raises(UntrustedCheckpoint):
        checkpoints.verify_checkpoint(forged, w.origin, [w.log.public_key])


@pytest.mark.parametrize(
    ("prev", "data"),
    [(None, "0000"), ("not a note", "0000"), ("x", 5), ("x", ["", 5]), ("x", ["~~~~~~", "n"])],
    ids=["delta-without-prev", "delta-on-garbage", "number", "note-not-text", "overflowing-base85"],
)
def test_malformed_compact_data_is_a_bad_message(prev: str | None, data: object) -> None:
    with pytest.raises(BadMessage):
        compact.decode(prev, 3, data)


_W = _world(6)


@settings(max_examples=60, deadline=None)
@given(
    old=st.integers(1, _W.size),
    new=st.integers(1, _W.size),
    carried=st.integers(0, 6),
    whole=st.booleans(),
)
def test_any_event_decodes_to_what_was_encoded(old: int, new: int, carried: int, whole: bool) -> None:
    """Whatever the previous note (or none) and however many records end at the size."""
    prev = None if whole else _W.checkpoint(TS, old)
    note = _W.checkpoint(TS + 1, new)
    recs = _W.records[max(0, new - carried) : new]
    data = json.loads(compact.encode(prev, note, new, recs))
    assert compact.decode(prev, new, data) == (recs, note)


def test_every_stream_decoding_the_same_event_gets_its_own_equal_records() -> None:
    """device_sim.sse.compact_event keeps the decoding of the last few events, keyed
    by the exact bytes (and the note before them): the same event decodes to equal
    values in a list of its own, another previous note is decoded anew, and a bad
    event is refused every time."""
    w = _world()
    prev, note = w.checkpoint(TS, w.size - 2), w.checkpoint(TS + 1)
    ev = Event(str(w.size), "message", [compact.encode(prev, note, w.size, w.records[-2:])])
    one, two = compact_event(ev, prev), compact_event(ev, prev)
    assert one == two == ((w.size - 2, w.records[-2:]), note)
    assert one[0][1] is not two[0][1]  # a caller may keep or change its list
    with pytest.raises(BadMessage):
        compact_event(ev, None)  # a delta with no previous note: never taken from the kept one
    bad = Event(str(w.size), "message", ['"not base85 {"'])
    for _ in range(2):
        with pytest.raises(BadMessage):
            compact_event(bad, prev)
