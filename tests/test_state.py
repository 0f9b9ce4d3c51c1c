"""``ledger.state.LedgerState``: the validity table as one state machine.

Each rule of the table is broken on its own (the tests are named after the
attack), then several at once to pin the order in which the rules run; every
rejection leaves the state exactly as it was. Then ``copy``, ``snapshot`` and
``restore``, ``apply_all``'s pipeline and its key guessing, the withdrawal
queries, and compact (device) states against full ones. The vectors'
expected bytes and roots are pinned in ``tests/test_ledger_vectors.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from ledger import crypto, encoding, errors, records
from ledger.crypto import SeedSigner
from ledger.records import Grant, Kind, Revoke, Rotate
from ledger.state import MAX_FUTURE, LedgerState
from tests.helpers.device import T0, World, signer
from tests.helpers.lost_tablet import LostTablet
from tests.helpers.vectors import state_fingerprint, vector_state
from tests.helpers.vectors_data import ledger_vectors

V = ledger_vectors()
RECORDS = V.records
FULL = len(RECORDS)
U64 = (1 << 64) - 1


def signed(fields: list[Any], key: SeedSigner) -> bytes:
    """A record from raw body fields (which the body classes may refuse to build)."""
    body = encoding.pack(fields)
    return encoding.join_record(body, crypto.sign(key, crypto.RECORD_DOMAIN, body))


def head(w: World, *, time: int | None = None) -> tuple[int, bytes, int]:
    """(seq, prev, time) of the next record on ``w``."""
    return w.size, w.state.root, w.state.last_time + 1 if time is None else time


def grant_fields(
    w: World, subject: bytes, *, role: str = "operator", signer_seq: int = 0, time: int | None = None
) -> list[Any]:
    seq, prev, t = head(w, time=time)
    return [1, int(Kind.GRANT), seq, prev, t, signer_seq, subject, role, "", "g", 0, 0]


def revoke_fields(
    w: World, target: int | bytes, *, signer_seq: int = 0, time: int | None = None
) -> list[Any]:
    seq, prev, t = head(w, time=time)
    return [1, int(Kind.REVOKE), seq, prev, t, signer_seq, target, 2]


def refused(
    st: LedgerState, raw: bytes, exc: type[errors.RecordRejected], **apply: Any
) -> errors.RecordRejected:
    """``raw`` is rejected with ``exc`` (exactly that class) and ``st`` is unchanged."""
    before, fp = st.snapshot(), state_fingerprint(st)
    with pytest.raises(errors.RecordRejected) as info:
        st.apply(raw, **apply)
    assert type(info.value) is exc, (type(info.value), info.value.message)
    assert st.snapshot() == before and state_fingerprint(st) == fp
    return info.value


@pytest.fixture
def story() -> LostTablet:
    """genesis, log, revoker, the tablet granted (a fresh World per test: tests append)."""
    return LostTablet.build()


# --- the table, rule by rule ---------------------------------------------------------


def test_a_ledger_that_does_not_open_with_a_genesis_is_refused(story: LostTablet) -> None:
    empty = LedgerState(story.world.root.public_key)
    refused(empty, story.world.records[1], errors.MisplacedGenesis)


def test_a_second_genesis_is_refused_as_misplaced(story: LostTablet) -> None:
    w = story.world
    seq, prev, t = head(w)
    again = signed([1, int(Kind.GENESIS), seq, prev, t, 0, w.origin, w.root.public_key, None], w.root)
    refused(w.state, again, errors.MisplacedGenesis)


def test_a_replayed_record_is_refused_as_stale_head(story: LostTablet) -> None:
    err = refused(story.world.state, story.grant, errors.StaleHead)
    assert err.detail["size"] == story.world.size


def test_a_record_on_another_history_is_refused_as_stale_head(story: LostTablet) -> None:
    w = story.world
    fields = grant_fields(w, signer("x").public_key)
    fields[3] = bytes(32)
    refused(w.state, signed(fields, w.root), errors.StaleHead)


def test_a_record_from_the_future_seq_is_refused_as_stale_head(story: LostTablet) -> None:
    w = story.world
    fields = grant_fields(w, signer("x").public_key)
    fields[2] += 1
    refused(w.state, signed(fields, w.root), errors.StaleHead)


def test_a_backdated_record_is_refused_as_time_regression(story: LostTablet) -> None:
    w = story.world
    last = w.state.last_time
    refused(
        w.state, signed(grant_fields(w, signer("x").public_key, time=last - 1), w.root), errors.TimeRegression
    )
    w.state.apply(signed(grant_fields(w, signer("x").public_key, time=last), w.root))  # equal time is fine


def test_a_record_far_ahead_of_the_server_clock_is_time_in_future(story: LostTablet) -> None:
    w = story.world
    now = w.state.last_time
    ahead = signed(grant_fields(w, signer("x").public_key, time=now + MAX_FUTURE + 1), w.root)
    refused(w.state, ahead, errors.TimeInFuture, now=now)
    w.state.copy().apply(ahead)  # without a clock (a device, the auditor) the rule does not apply
    w.state.apply(signed(grant_fields(w, signer("x").public_key, time=now + MAX_FUTURE), w.root), now=now)


def test_a_revoke_by_a_grant_that_is_not_a_revoker_is_unauthorized(story: LostTablet) -> None:
    w = story.world
    raw = signed(revoke_fields(w, w.revoker_seq, signer_seq=story.seq), story.tablet)
    refused(w.state, raw, errors.UnauthorizedSigner)


def test_a_revoke_by_a_seq_that_is_not_a_grant_is_unauthorized(story: LostTablet) -> None:
    w = story.world
    for seq in (w.size, w.size + 100, U64):
        refused(
            w.state, signed(revoke_fields(w, story.seq, signer_seq=seq), w.revoker), errors.UnauthorizedSigner
        )


def test_a_revoke_by_a_revoked_revoker_is_unauthorized(story: LostTablet) -> None:
    w = story.world
    w.revoke(w.revoker_seq)
    refused(
        w.state,
        signed(revoke_fields(w, story.seq, signer_seq=w.revoker_seq), w.revoker),
        errors.UnauthorizedSigner,
    )


def test_a_revoke_by_a_revoker_whose_key_is_revoked_is_unauthorized(story: LostTablet) -> None:
    w = story.world
    w.revoke(w.revoker.public_key, reason=1)
    refused(
        w.state,
        signed(revoke_fields(w, story.seq, signer_seq=w.revoker_seq), w.revoker),
        errors.UnauthorizedSigner,
    )


def test_a_revoke_by_a_revoker_outside_its_window_is_unauthorized() -> None:
    w = World()
    oncall = signer("oncall")
    start = w.state.last_time + 100
    seq = w.grant(oncall.public_key, records.ROLE_REVOKER, "oncall", not_before=start, not_after=start + 100)
    target = w.grant(w.tablet.public_key, records.ROLE_OPERATOR, "tablet-07")
    for t in (start - 1, start + 100):
        raw = signed(revoke_fields(w, target, signer_seq=seq, time=t), oncall)
        refused(w.state, raw, errors.UnauthorizedSigner)
    w.state.apply(signed(revoke_fields(w, target, signer_seq=seq, time=start + 99), oncall))


def test_a_grant_that_names_a_signer_is_unauthorized(story: LostTablet) -> None:
    w = story.world
    raw = signed(grant_fields(w, signer("x").public_key, signer_seq=w.revoker_seq), w.revoker)
    refused(w.state, raw, errors.UnauthorizedSigner)


def test_a_rotate_without_a_committed_successor_is_unauthorized(story: LostTablet) -> None:
    w = story.world  # its genesis commits to no successor
    seq, prev, t = head(w)
    new = signer("new-root")
    refused(w.state, records.sign(Rotate(seq, prev, t, new.public_key, None), new), errors.UnauthorizedSigner)


def test_a_rotate_to_another_key_than_the_committed_one_is_unauthorized() -> None:
    st = vector_state(8)  # genesis committed to root_next
    thief = signer("thief-root")
    raw = records.sign(Rotate(st.size, st.root, st.last_time, thief.public_key, None), thief)
    refused(st, raw, errors.UnauthorizedSigner)
    st.apply(RECORDS[8])  # the committed successor rotates in


def test_a_forged_signature_is_refused(story: LostTablet) -> None:
    w = story.world
    raw = signed(grant_fields(w, signer("x").public_key), w.root)
    refused(w.state, raw[:-1] + bytes([raw[-1] ^ 1]), errors.BadSignature)


def test_a_grant_signed_by_another_key_than_the_root_is_bad_signature(story: LostTablet) -> None:
    w = story.world
    refused(w.state, signed(grant_fields(w, signer("x").public_key), story.tablet), errors.BadSignature)


def test_a_record_signed_by_a_rotated_out_root_is_bad_signature() -> None:
    st = vector_state()  # rotated to root_next at seq 8
    body = Grant(st.size, st.root, st.last_time, signer("x").public_key, "operator", "", "x", 0, 0)
    refused(st, records.sign(body, V.signer("root")), errors.BadSignature)
    st.apply(records.sign(body, V.signer("root_next")))


def test_granting_a_root_key_is_invalid_field() -> None:
    st = vector_state()  # root (past) and root_next (current)
    for key in (V.public("root"), V.public("root_next")):
        body = Grant(st.size, st.root, st.last_time, key, "operator", "", "x", 0, 0)
        refused(st, records.sign(body, V.signer("root_next")), errors.InvalidField)


def test_revoking_a_root_key_is_invalid_field() -> None:
    st = vector_state()
    for key in (V.public("root"), V.public("root_next")):
        body = Revoke(st.size, st.root, st.last_time, 0, key, 1)
        refused(st, records.sign(body, V.signer("root_next")), errors.InvalidField)


def test_a_record_whose_fields_are_invalid_is_invalid_field_after_the_signature(story: LostTablet) -> None:
    w = story.world
    err = refused(
        w.state, signed(grant_fields(w, signer("x").public_key, role="Operator"), w.root), errors.InvalidField
    )
    assert err.seq == w.size


@pytest.mark.parametrize("target", ["genesis", "beyond", "revoke-record"])
def test_revoking_what_is_not_a_grant_is_unknown_target(story: LostTablet, target: str) -> None:
    w = story.world
    rev = story.revoke()
    seq = {"genesis": 0, "beyond": w.size + 5, "revoke-record": rev}[target]
    refused(w.state, signed(revoke_fields(w, seq), w.root), errors.UnknownTarget)


def test_revoking_twice_is_already_revoked(story: LostTablet) -> None:
    w = story.world
    story.revoke()
    refused(w.state, signed(revoke_fields(w, story.seq), w.root), errors.AlreadyRevoked)
    w.revoke(story.tablet.public_key, reason=1)
    refused(w.state, signed(revoke_fields(w, story.tablet.public_key), w.root), errors.AlreadyRevoked)


def test_granting_a_revoked_key_again_is_already_revoked(story: LostTablet) -> None:
    w = story.world
    w.revoke(story.tablet.public_key, reason=1)
    refused(w.state, signed(grant_fields(w, story.tablet.public_key), w.root), errors.AlreadyRevoked)


# --- the order of the rules: when several fail, the first in the table is named -----------


def _order_cases() -> list[tuple[str, Callable[[World], bytes], type[errors.RecordRejected]]]:
    x = signer("x").public_key

    def genesis_at_n_on_another_prev_unsigned(w: World) -> bytes:
        seq, _, t = head(w)
        body = encoding.pack([1, 0, seq, bytes(32), t, 0, w.origin, w.root.public_key, None])
        return encoding.join_record(body, bytes(64))

    def stale_backdated_unsigned(w: World) -> bytes:
        f = grant_fields(w, x, time=0)
        f[2] = 1
        return encoding.join_record(encoding.pack(f), bytes(64))

    def backdated_unauthorized(w: World) -> bytes:
        return signed(grant_fields(w, x, signer_seq=5, time=0), w.root)

    def unauthorized_forged(w: World) -> bytes:
        return encoding.join_record(encoding.pack(grant_fields(w, x, signer_seq=w.revoker_seq)), bytes(64))

    def forged_invalid_field(w: World) -> bytes:
        return encoding.join_record(encoding.pack(grant_fields(w, x, role="Operator")), bytes(64))

    def forged_grant_of_the_root(w: World) -> bytes:
        return encoding.join_record(encoding.pack(grant_fields(w, w.root.public_key)), bytes(64))

    def invalid_field_of_a_revoked_key(w: World) -> bytes:
        w.revoke(x, reason=1)
        return signed(grant_fields(w, x, role="Operator"), w.root)

    def unknown_target_in_the_future(w: World) -> bytes:
        return signed(revoke_fields(w, 0, time=T0 + 10**6), w.root)

    def wrong_anchor_unsigned(w: World) -> bytes:
        body = encoding.pack([1, 0, 0, records.EMPTY_HASH, T0, 0, w.origin, signer("x").public_key, None])
        return encoding.join_record(body, bytes(64))

    return [
        (
            "misplaced-genesis before stale-head and bad-signature",
            genesis_at_n_on_another_prev_unsigned,
            errors.MisplacedGenesis,
        ),
        ("stale-head before time-regression and bad-signature", stale_backdated_unsigned, errors.StaleHead),
        ("time-regression before unauthorized-signer", backdated_unauthorized, errors.TimeRegression),
        ("unauthorized-signer before bad-signature", unauthorized_forged, errors.UnauthorizedSigner),
        ("bad-signature before invalid-field", forged_invalid_field, errors.BadSignature),
        ("bad-signature before a root key granted", forged_grant_of_the_root, errors.BadSignature),
        ("invalid-field before already-revoked", invalid_field_of_a_revoked_key, errors.InvalidField),
        ("unknown-target before time-in-future", unknown_target_in_the_future, errors.UnknownTarget),
        ("wrong-anchor before bad-signature", wrong_anchor_unsigned, errors.WrongAnchor),
    ]


@pytest.mark.parametrize(
    ("build", "exc"), [c[1:] for c in _order_cases()], ids=[c[0] for c in _order_cases()]
)
def test_the_first_failing_rule_is_the_one_named(
    build: Callable[[World], bytes], exc: type[errors.RecordRejected]
) -> None:
    w = World()
    raw = build(w)
    st = LedgerState(w.root.public_key, origin=w.origin) if exc is errors.WrongAnchor else w.state
    refused(st, raw, exc, now=T0 + 1000)


# --- genesis, anchor and root keys ---------------------------------------------------------


def test_genesis_for_another_origin_is_refused() -> None:
    st = LedgerState(V.anchor, origin="other.example/x")
    with pytest.raises(errors.InvalidField):
        st.apply(V.records[0])
    assert st.size == 0


def test_genesis_under_another_anchor_is_refused_as_wrong_anchor() -> None:
    st = LedgerState(V.public("log"))
    with pytest.raises(errors.WrongAnchor) as info:
        st.apply(V.records[0])
    assert info.value.seq == 0 and st.size == 0
    assert info.value.detail["anchor"] == V.public("log").hex()
    assert info.value.detail["genesis_root"] == V.anchor.hex()


def test_the_pending_successor_key_is_not_a_root_key_yet() -> None:
    """Step 12 forbids root keys current or past: the committed successor is neither,
    so a grant to it (or a revoke of it by key) follows the table like any other key."""
    st = vector_state(9)  # after the rotate to root_next; root_next_2 is pending
    successor = V.public("root_next_2")
    assert st.pending_digest == crypto.sha256(successor)
    body = Grant(st.size, st.root, st.last_time, successor, "operator", "", "odd-but-legal", 0, 0)
    st.copy().apply(records.sign(body, V.signer("root_next")))
    with pytest.raises(errors.InvalidField):  # a current root key stays refused
        st.copy().apply(
            records.sign(
                Grant(st.size, st.root, st.last_time, V.public("root_next"), "operator", "", "x", 0, 0),
                V.signer("root_next"),
            )
        )


def test_rotate_with_a_malformed_new_root_is_invalid_field_before_the_signer_rule() -> None:
    st = vector_state(8)
    body = encoding.pack([1, 3, st.size, st.root, st.last_time, 7, b"short", None])
    raw = encoding.join_record(body, b"\x00" * 64)
    with pytest.raises(errors.InvalidField):
        st.apply(raw)


# --- all or nothing, copy, snapshot, restore -------------------------------------------------


def test_every_invalid_vector_leaves_full_and_compact_states_unchanged() -> None:
    for keep in (None, [records.ROLE_OPERATOR]):
        st = vector_state(keep_roles=keep)
        for vec in V.invalid:
            err = refused(st, bytes.fromhex(vec["record"]), errors.by_type(vec["expect"]))  # type: ignore[arg-type]
            assert err.type == vec["expect"]


def test_a_copy_is_independent_of_its_original(story: LostTablet) -> None:
    w = story.world
    before = w.state.snapshot()
    c = w.state.copy()
    c.apply(signed(revoke_fields(w, story.seq), w.root))
    c.apply(records.sign(Revoke(c.size, c.root, c.last_time, 0, story.tablet.public_key, 1), w.root))
    assert w.state.snapshot() == before
    assert c.is_revoked(story.seq) and c.key_revoked(story.tablet.public_key)
    assert not w.state.is_withdrawn(story.seq)
    story.revoke()  # and the original moves on without touching the copy
    assert c.size == w.size + 1 and c.root != w.state.root


def test_a_restored_state_continues_like_the_original() -> None:
    half = LedgerState.restore(vector_state(5).snapshot())
    half.apply_all(RECORDS[5:])
    assert half.snapshot() == vector_state().snapshot()


def test_a_snapshot_of_an_unknown_version_is_refused() -> None:
    f = encoding.unpack(vector_state().snapshot(), max_depth=3)
    f[0] = 2
    with pytest.raises(errors.BadMessage):
        LedgerState.restore(encoding.pack(f))


def test_snapshot_round_trip_full_and_compact() -> None:
    for keep in (None, ["operator"]):
        st = LedgerState(V.anchor, origin=V.origin, keep_roles=keep)
        for raw in V.records:
            st.apply(raw)
        again = LedgerState.restore(st.snapshot())
        assert state_fingerprint(again) == state_fingerprint(st)
        assert again.snapshot() == st.snapshot()


def test_damaged_snapshot_is_refused() -> None:
    snap = vector_state().snapshot()
    with pytest.raises(errors.BadMessage):
        LedgerState.restore(snap[:-3])
    with pytest.raises(errors.BadMessage):
        LedgerState.restore(b"\x93\x01\x02\x03")


def test_restore_with_huge_bitmap_int_raises_bad_message() -> None:
    """Regression: a snapshot whose grant or revoked bitmap (fields 12, 13) was an
    integer, not bytes, made ``Bits(int)`` allocate that many zero bytes: 2**40
    raised MemoryError, 2**63 OverflowError, neither a WritError, and smaller
    ones silently allocated up to gigabytes."""
    f = encoding.unpack(vector_state().snapshot(), max_depth=3)
    for index in (12, 13):
        for huge in (1 << 40, 1 << 63, U64):
            g = list(f)
            g[index] = huge
            with pytest.raises(errors.BadMessage):
                LedgerState.restore(encoding.pack(g))


@pytest.mark.parametrize(
    ("field", "value"),
    [(8, "x"), (8, None), (8, b"\x00"), (9, [])],
    ids=["last_time as str", "last_time as nil", "last_time as bin", "no roots after genesis"],
)
def test_restore_refuses_ill_typed_fields(field: int, value: Any) -> None:
    """Regression: ``restore`` checked the frontier against the root but not the
    types of the other fields, so it accepted a snapshot whose ``last_time``
    (field 8) was not an int or whose root list (field 9) was empty; ``apply``
    on that state then raised TypeError (step 9 compares int < str) or
    AssertionError (step 10: no root key). Either ``restore`` refuses such a
    snapshot with BadMessage, or the state it returns rejects only with
    RecordRejected."""
    f = encoding.unpack(vector_state(FULL - 1).snapshot(), max_depth=3)
    f[field] = value
    try:
        state = LedgerState.restore(encoding.pack(f))
    except errors.BadMessage:
        return
    with contextlib.suppress(errors.RecordRejected):
        state.apply(RECORDS[FULL - 1])


# --- apply_all: the pipeline and its key guesses --------------------------------------------


def _long_world() -> World:
    """Grants, a rotation-free history with revokes by the root and by the revoker."""
    w = World()
    for i in range(40):
        seq = w.grant(signer(f"k{i}").public_key, records.ROLE_OPERATOR, f"k{i}")
        if i % 3 == 0:
            w.revoke(seq, by_revoker=i % 2 == 0)
    return w


@pytest.mark.parametrize("chunk", [1, 3, 1024])
@pytest.mark.parametrize("threads", [0, 2])
def test_apply_all_equals_applying_one_by_one(chunk: int, threads: int) -> None:
    w = _long_world()
    seen: list[int] = []
    st = LedgerState(w.root.public_key, origin=w.origin)
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(ThreadPoolExecutor(threads)) if threads else None
        out = st.apply_all(w.records, executor=pool, chunk=chunk, on_record=lambda r: seen.append(r.seq))
    assert [r.raw for r in out] == w.records and seen == list(range(w.size))
    assert st.snapshot() == w.state.snapshot()


@pytest.mark.parametrize("threads", [0, 2])
def test_apply_all_keeps_the_records_before_a_rejection(threads: int) -> None:
    w = _long_world()
    bad = 17
    raws = list(w.records)
    raws[bad] = raws[bad][:-1] + bytes([raws[bad][-1] ^ 1])
    st = LedgerState(w.root.public_key, origin=w.origin)
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(ThreadPoolExecutor(threads)) if threads else None
        with pytest.raises(errors.BadSignature) as info:
            st.apply_all(raws, executor=pool, chunk=4)
    assert info.value.seq == bad and st.size == bad
    assert st.root == w.levels.root(bad)


def _spy_prechecks(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bytes, bool] | None]:
    seen: list[tuple[bytes, bool] | None] = []
    real = LedgerState.apply

    def spy(self: LedgerState, raw: bytes, **kw: Any) -> records.SignedRecord:
        seen.append(kw.get("prechecked"))
        return real(self, raw, **kw)

    monkeypatch.setattr(LedgerState, "apply", spy)
    return seen


@pytest.mark.parametrize("chunk", [1, 1024])
def test_a_revoker_granted_in_the_same_batch_is_guessed_for_its_revokes(
    monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    """The pipeline pre-checks every signature under the right key, even a revoke
    signed by a revoker whose grant is earlier in the same batch (or span)."""
    w = World()
    oncall = signer("oncall")
    first = w.size
    on_seq = w.grant(oncall.public_key, records.ROLE_REVOKER, "oncall")
    t_seq = w.grant(w.tablet.public_key, records.ROLE_OPERATOR, "tablet-07")
    w.add(Revoke(w.size, w.state.root, w.state.last_time + 1, on_seq, t_seq, 2), oncall)
    st = LedgerState(w.root.public_key, origin=w.origin)
    st.apply_all(w.records[:first])
    seen = _spy_prechecks(monkeypatch)
    with ThreadPoolExecutor(2) as pool:
        st.apply_all(w.records[first:], executor=pool, chunk=chunk)
    assert st.is_revoked(t_seq) and st.snapshot() == w.state.snapshot()
    assert [p is not None and p[1] for p in seen] == [True, True, True]
    assert seen[-1] is not None and seen[-1][0] == oncall.public_key


def test_key_guesses_follow_a_rotation_inside_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _spy_prechecks(monkeypatch)
    st = LedgerState(V.anchor, origin=V.origin)
    st.apply_all(RECORDS, chunk=2)
    assert all(p is not None and p[1] for p in seen)
    last = seen[FULL - 1]
    assert last is not None and last[0] == V.public("root_next")


def test_a_wrong_precheck_is_never_trusted(story: LostTablet) -> None:
    """A pre-check is used only for the very key the rules pick: one made under
    another key is ignored, so a bad guess costs time, never correctness."""
    w = story.world
    good = signed(grant_fields(w, signer("x").public_key), w.root)
    forged = good[:-1] + bytes([good[-1] ^ 1])
    refused(w.state, forged, errors.BadSignature, prechecked=(story.tablet.public_key, True))
    refused(w.state, good, errors.BadSignature, prechecked=(w.root.public_key, False))
    w.state.apply(good, prechecked=(story.tablet.public_key, False))


def test_a_revoke_by_a_non_revoker_is_refused_in_a_batch_whatever_was_guessed() -> None:
    w = World()
    t_seq = w.grant(w.tablet.public_key, records.ROLE_OPERATOR, "tablet-07")
    raws = [*w.records, signed(revoke_fields(w, t_seq, signer_seq=t_seq), w.tablet)]
    st = LedgerState(w.root.public_key, origin=w.origin)
    with ThreadPoolExecutor(2) as pool, pytest.raises(errors.UnauthorizedSigner):
        st.apply_all(raws, executor=pool, chunk=1)
    assert st.size == w.size


def test_apply_all_applies_the_server_clock_rule() -> None:
    w = _long_world()
    st = LedgerState(w.root.public_key, origin=w.origin)
    with pytest.raises(errors.TimeInFuture):
        st.apply_all(w.records, now=T0 - MAX_FUTURE - 1)
    assert st.size == 0
    st.apply_all(w.records, now=w.state.last_time)


# --- withdrawn, active, named ------------------------------------------------------------------


def test_is_withdrawn_by_id_or_by_key_and_nothing_else() -> None:
    w = World()
    lost = w.grant(w.tablet.public_key, records.ROLE_OPERATOR, "tablet-07")
    stolen_key = signer("stolen")
    a = w.grant(stolen_key.public_key, records.ROLE_OPERATOR, "laptop")
    b = w.grant(stolen_key.public_key, records.ROLE_DEVICE, "laptop-as-device")
    fine = w.grant(signer("fine").public_key, records.ROLE_OPERATOR, "fine")
    w.revoke(lost)
    w.revoke(stolen_key.public_key, reason=1)
    st = w.state
    assert [st.is_withdrawn(s) for s in (lost, a, b, fine)] == [True, True, True, False]
    assert [st.is_revoked(s) for s in (lost, a, b, fine)] == [True, False, False, False]
    assert st.grant_active(fine, T0) is not None
    assert all(st.grant_active(s, T0) is None for s in (lost, a, b))
    assert st.active_keys(records.ROLE_OPERATOR) == [signer("fine").public_key]
    assert [g.seq for g in st.grants_named("laptop")] == [a]
    assert {g.seq for g in st.grants_of(stolen_key.public_key)} == {a, b}


def test_grant_active_respects_the_validity_window() -> None:
    w = World()
    seq = w.grant(w.tablet.public_key, records.ROLE_OPERATOR, "t", not_before=T0 + 100, not_after=T0 + 200)
    st = w.state
    assert [st.grant_active(seq, t) is not None for t in (T0 + 99, T0 + 100, T0 + 199, T0 + 200)] == [
        False,
        True,
        True,
        False,
    ]
    assert not st.is_withdrawn(seq)  # a window is not a withdrawal


# --- compact (device) against full states ------------------------------------------------------


def test_compact_and_full_states_agree_on_the_tree_and_the_bits() -> None:
    full = vector_state()
    compact = vector_state(keep_roles=[records.ROLE_OPERATOR])
    assert full.full and not compact.full
    assert (compact.size, compact.root, compact.roots) == (full.size, full.root, full.roots)
    assert compact.grant_bits.to_bytes() == full.grant_bits.to_bytes()
    assert compact.revoked.to_bytes() == full.revoked.to_bytes()
    assert compact.revoked_keys == full.revoked_keys
    kept = {g.role for g in compact.grants.values()}
    assert kept <= {records.ROLE_OPERATOR} | {records.ROLE_REVOKER, records.ROLE_LOG, records.ROLE_WITNESS}
    assert records.ROLE_DEVICE in {g.role for g in full.grants.values()} - kept
    assert compact.revocations == {} and full.revocations
    assert len(compact.snapshot()) < len(full.snapshot())


def test_a_compact_state_still_refuses_revoking_a_grant_it_does_not_keep() -> None:
    """It keeps one bit per grant and per revocation: all the rules need."""
    w = World()
    plc = w.grant(signer("plc").public_key, records.ROLE_DEVICE, "plc-1")
    compact = LedgerState(w.root.public_key, origin=w.origin, keep_roles=[records.ROLE_OPERATOR])
    compact.apply_all(w.records)
    assert plc not in compact.grants and compact.is_grant(plc)
    w.revoke(plc)
    compact.apply(w.records[-1])
    assert compact.is_withdrawn(plc)
    refused(compact, signed(revoke_fields(w, plc), w.root), errors.AlreadyRevoked)
    refused(compact, signed(revoke_fields(w, 0), w.root), errors.UnknownTarget)


def test_a_compact_state_always_keeps_the_roles_the_rules_consult() -> None:
    w = World()
    wit = w.grant(signer("w").public_key, records.ROLE_WITNESS, "w.example/w")
    compact = LedgerState(w.root.public_key, origin=w.origin, keep_roles=[])
    compact.apply_all(w.records)
    assert set(compact.grants) == {w.log_seq, w.revoker_seq, wit}
    assert compact.active_keys(records.ROLE_LOG) == [w.log.public_key]
