"""Shared benchmark helpers: ledgers built fast, raw verify rates, timing."""

from __future__ import annotations

import statistics
from collections.abc import Callable

from ledger import crypto, records
from ledger.crypto import SeedSigner
from ledger.state import LedgerState
from ledger.verifier import usable_cores

ORIGIN = "bench.writ.example/ledger"


def build_ledger(
    n: int, *, seed: bytes = b"\x01" * 32, start_time: int = 1_767_000_000
) -> tuple[SeedSigner, list[bytes]]:
    """A ledger of ``n`` records: genesis, a log grant, then grants and some revokes."""

    root, recs = build_signed(n, seed=seed, start_time=start_time)
    return root, [r.raw for r in recs]


def build_signed(
    n: int, *, seed: bytes = b"\x01" * 32, start_time: int = 1_767_000_000
) -> tuple[SeedSigner, list[records.SignedRecord]]:
    """:func:`build_ledger` as :class:`~ledger.records.SignedRecord` values (what storage takes).

    The records are applied with their signature marked pre-checked: they were
    signed a moment ago, so building costs the signing only."""

    root = SeedSigner(seed)
    st = LedgerState(root.public_key, origin=ORIGIN)
    out: list[records.SignedRecord] = []

    def add(body: records.Body) -> None:
        raw = records.sign(body, root)
        out.append(st.apply(raw, prechecked=(root.public_key, True)))

    add(records.Genesis(0, st.root, start_time, ORIGIN, root.public_key, None))
    i = 1
    while st.size < n:
        t = start_time + i
        if i % 10 == 0 and st.is_grant(i - 1) and not st.is_revoked(i - 1):
            add(records.Revoke(st.size, st.root, t, 0, i - 1, 2))
        else:
            subject = crypto.sha256(b"subject" + i.to_bytes(8, "big"))
            role = "log" if i == 1 else ("operator" if i % 3 else "device")
            add(records.Grant(st.size, st.root, t, subject, role, "", f"dev-{i}", 0, 0))
        i += 1
    return root, out


#: Ed25519 verifies per second with ``threads`` threads (PyNaCl releases the GIL).
raw_verify_rate = crypto.verify_rate


def median_spread(fn: Callable[[], float], repeat: int) -> tuple[float, float, float]:
    vals = [fn() for _ in range(repeat)]
    return statistics.median(vals), min(vals), max(vals)


cores = usable_cores
