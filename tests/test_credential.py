"""``ledger.credential``: is this credential valid on this device now?

The check is a pure function of the device's state, the auth message, the
challenge, ``now`` and the freshness; here it runs without a device. Every
refusal reason is produced on its own, and for every pair of faults that can
occur together the one earlier in :data:`ledger.credential.REFUSALS` is the
one reported (docs/protocol.md, section 7 'Credentials on a device'). The device-level
behaviour (single-use challenges, the stale policy, persistence) is in
``tests/test_device.py``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest

from ledger import acceptance, checkpoints, credential, messages, notes, records
from ledger.acceptance import MAX_AHEAD
from ledger.credential import DEFAULT_MAX_STALENESS, MAX_SKEW, REFUSALS, Freshness, Verdict
from ledger.crypto import SeedSigner, sha256
from ledger.errors import CredentialRefusal
from ledger.records import Genesis, Revoke
from ledger.state import LedgerState
from tests.helpers.device import T0, World, signer
from tests.helpers.lost_tablet import LostTablet
from tests.helpers.vectors import check_vector_auth, vector_credential

NOW = T0 + 10_000
DEVICE = signer("plc-17")
CHALLENGE = bytes(range(32))
DEVICE_SCOPE = "plant-1/line-3"
R = CredentialRefusal


def check(
    state: LedgerState,
    auth: bytes,
    *,
    challenge: bytes | None = CHALLENGE,
    now: int = NOW,
    roles: tuple[str, ...] = (records.ROLE_OPERATOR,),
    scope: str = DEVICE_SCOPE,
    checkpoint_time: int | None = NOW,
    policy: str = "refuse",
) -> Verdict:
    return credential.check_credential(
        state,
        auth,
        device_key=DEVICE.public_key,
        challenge=challenge,
        now=now,
        roles=roles,
        device_scope=scope,
        freshness=Freshness(checkpoint_time, policy=policy),
    )


# --- one scenario per set of faults ---------------------------------------------------

#: every fault that makes the check refuse, named after the refusal it causes
FAULTS: tuple[R, ...] = REFUSALS
#: faults that cannot hold together: a window cannot both have ended and not begun
EXCLUSIVE = {frozenset({R.EXPIRED, R.NOT_YET_VALID})}


@dataclass
class Case:
    state: LedgerState
    auth: bytes
    challenge: bytes
    now: int
    checkpoint_time: int
    seq: int


def scenario(faults: frozenset[R]) -> Case:
    """A ledger and an auth message with exactly ``faults`` wrong, everything else right."""
    w = World()
    tablet = w.tablet
    window = {}
    if R.EXPIRED in faults:
        window["not_after"] = NOW - 10
    if R.NOT_YET_VALID in faults:
        window["not_before"] = NOW + 10
    role = "maintenance" if R.WRONG_ROLE in faults else records.ROLE_OPERATOR
    scope = "plant-2" if R.OUT_OF_SCOPE in faults else "plant-1"
    seq = w.grant(tablet.public_key, role, "tablet-07", scope=scope, **window)
    grant = w.records[seq]
    if R.UNPUBLISHED in faults:
        # root-signed, same seq and fields, but not the record the ledger holds (a stolen root)
        grant = w.grant_record(
            tablet.public_key, role, "tablet-07", scope=scope, seq=seq, prev=w.root_at(seq), **window
        )
    if R.REVOKED in faults:
        w.revoke(seq, reason=int(records.Reason.LOST))
    if R.REVOKED_KEY in faults:
        w.revoke(tablet.public_key, reason=int(records.Reason.KEY_COMPROMISE))
    holder = signer("thief") if R.BAD_SIGNATURE in faults else tablet
    signed_at = NOW + MAX_SKEW + 1 if R.CLOCK_SKEW in faults else NOW
    issued = bytes(32) if R.BAD_CHALLENGE in faults else CHALLENGE
    auth = messages.make_auth(grant, holder, DEVICE.public_key, CHALLENGE, signed_at)
    checkpoint_time = NOW - DEFAULT_MAX_STALENESS - 1 if R.STALE in faults else NOW
    return Case(w.state, auth, issued, NOW, checkpoint_time, seq)


def run(case: Case) -> Verdict:
    return check(case.state, case.auth, challenge=case.challenge, checkpoint_time=case.checkpoint_time)


def test_a_valid_credential_is_accepted_with_its_grant() -> None:
    case = scenario(frozenset())
    v = run(case)
    assert v == Verdict(True, None, case.seq, "tablet-07", records.ROLE_OPERATOR, False)
    assert v.to_json() == {
        "accepted": True,
        "grant_seq": case.seq,
        "name": "tablet-07",
        "role": "operator",
        "stale": False,
    }


@pytest.mark.parametrize("reason", FAULTS, ids=str)
def test_each_fault_is_refused_with_its_reason(reason: R) -> None:
    v = run(scenario(frozenset({reason})))
    assert (v.accepted, v.reason) == (False, reason)
    assert v.to_json()["reason"] == str(reason)


PAIRS = [(a, b) for a, b in itertools.combinations(FAULTS, 2) if frozenset({a, b}) not in EXCLUSIVE]


@pytest.mark.parametrize(("first", "second"), PAIRS, ids=lambda r: str(r))
def test_the_earlier_refusal_wins_when_two_apply(first: R, second: R) -> None:
    assert REFUSALS.index(first) < REFUSALS.index(second)
    assert run(scenario(frozenset({first, second}))).reason == first


def test_every_fault_at_once_is_bad_challenge() -> None:
    every = frozenset(FAULTS) - {R.NOT_YET_VALID}
    assert run(scenario(every)).reason == R.BAD_CHALLENGE


def test_refusals_are_in_the_documented_order() -> None:
    assert [str(r) for r in REFUSALS] == [
        "bad-challenge",
        "clock-skew",
        "bad-signature",
        "unpublished",
        "revoked",
        "revoked-key",
        "expired",
        "not-yet-valid",
        "wrong-role",
        "out-of-scope",
        "stale",
    ]


def test_refusals_after_the_signatures_name_the_grant() -> None:
    """Once the grant and the possession verify, the verdict names the grant it judged."""
    for reason in FAULTS[FAULTS.index(R.UNPUBLISHED) :]:
        case = scenario(frozenset({reason}))
        v = run(case)
        assert (v.grant_seq, v.name) == (case.seq, "tablet-07"), reason
    for reason in (R.BAD_CHALLENGE, R.CLOCK_SKEW, R.BAD_SIGNATURE):
        assert run(scenario(frozenset({reason}))).grant_seq is None


# --- the edges of each rule ------------------------------------------------------------


@pytest.fixture(scope="module")
def story() -> LostTablet:
    return LostTablet.build(scope="plant-1")


def auth_at(
    story: LostTablet, at: int, *, key: SeedSigner | None = None, grant: bytes | None = None
) -> bytes:
    return messages.make_auth(
        story.grant if grant is None else grant, key or story.tablet, DEVICE.public_key, CHALLENGE, at
    )


def test_no_challenge_issued_is_bad_challenge(story: LostTablet) -> None:
    assert check(story.world.state, auth_at(story, NOW), challenge=None).reason == R.BAD_CHALLENGE


def test_auth_for_another_device_is_bad_challenge(story: LostTablet) -> None:
    other = messages.make_auth(story.grant, story.tablet, signer("other").public_key, CHALLENGE, NOW)
    assert check(story.world.state, other).reason == R.BAD_CHALLENGE


def test_malformed_auth_is_bad_signature_even_without_a_challenge(story: LostTablet) -> None:
    """docs/protocol.md, 'Choices where the contract is open': a message that
    does not parse proves nothing, so it is a bad signature, whatever else."""
    assert check(story.world.state, b"\x93garbage", challenge=None).reason == R.BAD_SIGNATURE


def test_a_grant_that_does_not_decode_is_bad_signature_after_challenge_and_skew(story: LostTablet) -> None:
    """docs/protocol.md, 'Choices where the contract is open', 7."""
    garbage = b"\x92\xc4\x01x\xc4\x01y"
    st = story.world.state
    assert check(st, auth_at(story, NOW, grant=garbage)).reason == R.BAD_SIGNATURE
    assert check(st, auth_at(story, NOW, grant=garbage), challenge=bytes(32)).reason == R.BAD_CHALLENGE
    assert check(st, auth_at(story, NOW + MAX_SKEW + 1, grant=garbage)).reason == R.CLOCK_SKEW


@pytest.mark.parametrize("delta", [-MAX_SKEW, MAX_SKEW])
def test_clock_skew_of_exactly_300_s_is_accepted(story: LostTablet, delta: int) -> None:
    assert check(story.world.state, auth_at(story, NOW + delta)).accepted


@pytest.mark.parametrize("delta", [-MAX_SKEW - 1, MAX_SKEW + 1])
def test_clock_skew_beyond_300_s_is_refused(story: LostTablet, delta: int) -> None:
    assert check(story.world.state, auth_at(story, NOW + delta)).reason == R.CLOCK_SKEW


def test_a_forged_grant_signature_is_bad_signature(story: LostTablet) -> None:
    forged = story.grant[:-1] + bytes([story.grant[-1] ^ 1])
    assert check(story.world.state, auth_at(story, NOW, grant=forged)).reason == R.BAD_SIGNATURE


def test_a_grant_signed_by_another_key_than_the_root_is_bad_signature(story: LostTablet) -> None:
    w = story.world
    body = w.grant_body(story.tablet.public_key, records.ROLE_OPERATOR, "tablet-07", seq=story.seq)
    rogue = records.sign(body, signer("not-the-root"))
    assert check(w.state, auth_at(story, NOW, grant=rogue)).reason == R.BAD_SIGNATURE


def test_a_record_that_is_not_a_grant_is_bad_signature(story: LostTablet) -> None:
    w = story.world
    genesis = w.records[0]
    assert check(w.state, auth_at(story, NOW, grant=genesis)).reason == R.BAD_SIGNATURE
    revoke = records.sign(Revoke(w.size, w.state.root, NOW, 0, story.seq, 2), w.root)
    assert check(w.state, auth_at(story, NOW, grant=revoke)).reason == R.BAD_SIGNATURE


def test_a_revoke_by_a_revoker_presented_as_a_credential_is_bad_signature(story: LostTablet) -> None:
    """A record with signer != 0 is never a credential, even if its bytes verify."""
    w = story.world
    revoke = records.sign(Revoke(w.size, w.state.root, NOW, w.revoker_seq, story.seq, 2), w.revoker)
    assert check(w.state, auth_at(story, NOW, grant=revoke)).reason == R.BAD_SIGNATURE


def test_a_state_before_genesis_refuses_everything_as_bad_signature(story: LostTablet) -> None:
    empty = LedgerState(story.world.root.public_key)
    assert check(empty, auth_at(story, NOW)).reason == R.BAD_SIGNATURE


def test_a_grant_beyond_the_device_head_is_unpublished() -> None:
    """The device has not seen the grant yet (it is behind): not published as far as it knows."""
    story = LostTablet.build()
    behind = LedgerState(story.world.root.public_key, origin=story.world.origin)
    behind.apply_all(story.world.records[: story.seq])
    assert check(behind, auth_at(story, NOW)).reason == R.UNPUBLISHED


def test_a_compact_state_that_does_not_keep_the_role_refuses_it_as_unpublished() -> None:
    """A device keeps only the grants of the roles it honours; others are unknown to it."""
    story = LostTablet.build()
    w = story.world
    keeping = LedgerState(w.root.public_key, origin=w.origin, keep_roles=[records.ROLE_OPERATOR])
    keeping.apply_all(w.records)
    assert check(keeping, auth_at(story, NOW)).accepted
    other = LedgerState(w.root.public_key, origin=w.origin, keep_roles=["maintenance"])
    other.apply_all(w.records)
    assert check(other, auth_at(story, NOW)).reason == R.UNPUBLISHED


def test_expiry_and_start_are_half_open() -> None:
    """Valid from not_before inclusive until not_after exclusive."""
    story = LostTablet.build(not_before=NOW - 100, not_after=NOW + 100)
    st = story.world.state
    assert check(st, auth_at(story, NOW - 100), now=NOW - 100).accepted
    assert check(st, auth_at(story, NOW - 101), now=NOW - 101).reason == R.NOT_YET_VALID
    assert check(st, auth_at(story, NOW + 99), now=NOW + 99).accepted
    assert check(st, auth_at(story, NOW + 100), now=NOW + 100).reason == R.EXPIRED


def test_a_role_asked_for_is_accepted(story: LostTablet) -> None:
    st = story.world.state
    assert check(st, auth_at(story, NOW), roles=("maintenance",)).reason == R.WRONG_ROLE
    assert check(st, auth_at(story, NOW), roles=("maintenance", records.ROLE_OPERATOR)).accepted


@pytest.mark.parametrize(
    ("device_scope", "ok"),
    [
        ("plant-1", True),
        ("plant-1/line-3", True),
        ("plant-10", False),
        ("plant-2/line-3", False),
        ("", False),
    ],
)
def test_scope_covers_the_device_scope_and_below(story: LostTablet, device_scope: str, ok: bool) -> None:
    v = check(story.world.state, auth_at(story, NOW), scope=device_scope)
    assert (v.accepted, v.reason) == ((True, None) if ok else (False, R.OUT_OF_SCOPE))


def test_the_lost_tablet_is_refused_once_revoked_and_the_state_says_why() -> None:
    story = LostTablet.build()
    w = story.world
    assert check(w.state, auth_at(story, NOW)).accepted
    story.revoke()
    assert check(w.state, auth_at(story, NOW)).reason == R.REVOKED
    assert w.state.is_withdrawn(story.seq)


def test_a_revoked_key_refuses_every_grant_of_that_key() -> None:
    story = LostTablet.build()
    w = story.world
    second = w.grant(story.tablet.public_key, records.ROLE_OPERATOR, "tablet-07b")
    w.revoke(story.tablet.public_key, reason=int(records.Reason.KEY_COMPROMISE))
    assert check(w.state, auth_at(story, NOW)).reason == R.REVOKED_KEY
    assert check(w.state, auth_at(story, NOW, grant=w.records[second])).reason == R.REVOKED_KEY


def test_a_grant_signed_by_a_rotated_out_root_is_still_honoured() -> None:
    """Each record is verified under the root in force at its seq."""
    old, new = signer("root"), signer("root-2")
    st = LedgerState(old.public_key, origin="o.example/x")
    digest = sha256(new.public_key)
    st.apply(records.sign(Genesis(0, st.root, T0, "o.example/x", old.public_key, digest), old))
    tablet = signer("tablet")
    grant = records.sign(
        records.Grant(1, st.root, T0 + 1, tablet.public_key, records.ROLE_OPERATOR, "", "t", 0, 0), old
    )
    st.apply(grant)
    st.apply(records.sign(records.Rotate(2, st.root, T0 + 2, new.public_key, None), new))
    auth = messages.make_auth(grant, tablet, DEVICE.public_key, CHALLENGE, NOW)
    assert check(st, auth, scope="").accepted


# --- freshness ---------------------------------------------------------------------------


def test_freshness_bounds() -> None:
    f = Freshness(NOW, max_staleness=3600)
    assert not f.is_stale(NOW) and not f.is_stale(NOW + 3600) and f.is_stale(NOW + 3601)
    assert not f.is_stale(NOW - MAX_AHEAD) and f.is_stale(NOW - MAX_AHEAD - 1)  # never fresh further ahead
    assert Freshness(None).is_stale(NOW)


def test_stale_refused_by_default_accepted_and_reported_under_the_accept_policy(story: LostTablet) -> None:
    st, old = story.world.state, NOW - DEFAULT_MAX_STALENESS - 1
    refused = check(st, auth_at(story, NOW), checkpoint_time=old)
    assert (refused.accepted, refused.reason, refused.stale) == (False, R.STALE, True)
    lenient = check(st, auth_at(story, NOW), checkpoint_time=old, policy="accept")
    assert (lenient.accepted, lenient.reason, lenient.stale) == (True, None, True)
    assert lenient.to_json()["stale"] is True


def test_a_stale_view_never_hides_an_earlier_refusal(story: LostTablet) -> None:
    """Under the accept policy too, a revoked credential is refused as revoked."""
    story2 = LostTablet.build()
    story2.revoke()
    v = check(story2.world.state, auth_at(story2, NOW), checkpoint_time=None, policy="accept")
    assert v.reason == R.REVOKED


def _witnessed_view(
    w: World, witness: SeedSigner, *, log_ts: int, witness_ts: int | None
) -> acceptance.AcceptedView:
    note = w.checkpoint(log_ts)
    if witness_ts is not None:
        cp = checkpoints.Checkpoint(w.origin, w.size, w.root_at())
        note = notes.add_signatures(note, [checkpoints.cosign(cp, "witness.example/w", witness, witness_ts)])
    return acceptance.accept(None, note, w.state, now=log_ts)


def test_freshness_with_required_witnesses_is_judged_by_the_cosignature() -> None:
    w = World()
    wit = signer("witness")
    w.grant(wit.public_key, records.ROLE_WITNESS, "witness.example/w")
    story = LostTablet.build(w)
    late = NOW + DEFAULT_MAX_STALENESS // 2

    log_only = _witnessed_view(w, wit, log_ts=NOW, witness_ts=None)
    assert Freshness.of(log_only).checkpoint_time == NOW
    assert Freshness.of(log_only, require_witnesses=1).checkpoint_time is None
    assert check(
        w.state, auth_at(story, NOW), checkpoint_time=Freshness.of(log_only).checkpoint_time
    ).accepted
    fresh_by_witness = Freshness.of(log_only, require_witnesses=1)
    assert fresh_by_witness.is_stale(NOW)  # no cosignature: never fresh for a device that requires one

    cosigned = _witnessed_view(w, wit, log_ts=NOW, witness_ts=NOW - DEFAULT_MAX_STALENESS // 2 - 1)
    assert Freshness.of(cosigned).checkpoint_time == NOW
    by_witness = Freshness.of(cosigned, require_witnesses=1)
    assert by_witness.checkpoint_time == NOW - DEFAULT_MAX_STALENESS // 2 - 1
    assert not by_witness.is_stale(NOW)
    assert by_witness.is_stale(late)  # the witness's older timestamp decides
    assert not Freshness.of(cosigned).is_stale(late)
    assert Freshness.of(cosigned, require_witnesses=2).is_stale(NOW)  # only one witness exists
    assert Freshness.of(None).checkpoint_time is None


# --- the protocol vector -------------------------------------------------------------------


def test_credential_vector_is_accepted_before_revocation() -> None:
    assert check_vector_auth(vector_credential()[1]).accepted
