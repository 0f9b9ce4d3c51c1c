"""One revocation test: ``LedgerState.is_withdrawn`` (revoked by id, or its key
revoked) is what every view of a grant asks: the state's own queries, the
credential views, the audit's counts and the server's fleet index."""

from __future__ import annotations

from api.fleet_report import FleetIndex
from ledger import credential_status, records
from ledger.audit import report
from ledger.crypto import SeedSigner
from tests.helpers.server import Mirror


def test_revoked_by_id_and_by_key_are_withdrawn_everywhere() -> None:
    root = SeedSigner.generate()
    m = Mirror(root, "withdrawn.example/ledger", time=1_000)
    m.genesis()
    keep, by_id, by_key = (SeedSigner.generate().public_key for _ in range(3))
    m.grant(keep, records.ROLE_DEVICE, "keep")  # seq 1
    m.grant(by_id, records.ROLE_DEVICE, "by-id")  # seq 2
    m.grant(by_key, records.ROLE_DEVICE, "by-key")  # seq 3
    m.revoke(2)
    m.revoke(by_key)
    st = m.state

    assert [st.is_withdrawn(s) for s in (1, 2, 3)] == [False, True, True]
    assert st.is_revoked(3) is False  # seq 3 itself was never named: its key was
    assert [st.grant_active(s, 1_000) is not None for s in (1, 2, 3)] == [True, False, False]
    assert st.active_keys(records.ROLE_DEVICE) == [keep]
    assert [credential_status.status_of(st, st.grants[s], 1_000) for s in (1, 2, 3)] == [
        "active",
        "revoked",
        "revoked",
    ]
    assert (report(st).active_grants, report(st).revoked_grants) == (1, 2)
    fleet = FleetIndex()
    fleet.sync(st, {})
    assert list(fleet.active) == [1]  # the fleet report counts only the device still in force
