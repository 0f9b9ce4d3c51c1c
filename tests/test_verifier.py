"""Signature pre-checks in worker processes (``ledger/verifier.py``,
``ledger/verify_worker.py``): the same answers as ``crypto.check``, safe under
threads, and a dead or confused worker only ever makes the caller check the
batch itself."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger import audit, crypto, errors, records, verifier, verify_worker
from ledger.keyguess import PrecheckItem
from ledger.records import Revoke
from ledger.state import LedgerState
from tests.helpers.device import World, signer

KEYS = [signer(f"v{i}") for i in range(3)]
MSGS = [b"", b"m", b"writ" * 100]


def _item(k: int, m: int, *, domain: bytes = crypto.RECORD_DOMAIN, good: bool = True) -> PrecheckItem:
    key = KEYS[k]
    sig = crypto.sign(key, domain, MSGS[m])
    if not good:
        sig = sig[:-1] + bytes([sig[-1] ^ 1])
    return (key.public_key, domain, MSGS[m], sig)


@pytest.fixture(scope="module")
def pv() -> Iterator[verifier.ProcessVerifier]:
    with verifier.ProcessVerifier(2) as v:
        assert v.usable, v.broken
        yield v


ITEMS = st.lists(
    st.one_of(
        st.none(),
        st.builds(
            _item,
            st.integers(0, 2),
            st.integers(0, 2),
            domain=st.sampled_from([crypto.RECORD_DOMAIN, crypto.AUTH_DOMAIN]),
            good=st.booleans(),
        ),
        # the shapes crypto.check says False to without calling libsodium
        st.tuples(st.binary(max_size=40), st.just(b"d"), st.binary(max_size=8), st.binary(max_size=70)),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(ITEMS)
def test_workers_answer_exactly_what_crypto_check_answers(
    pv: verifier.ProcessVerifier, items: list[PrecheckItem | None]
) -> None:
    assert list(pv.submit(items)()) == crypto.check_batch(items)
    assert pv.usable


def test_a_forged_signature_is_refused_by_the_workers(pv: verifier.ProcessVerifier) -> None:
    items = [_item(0, 1), _item(0, 1, good=False), _item(1, 2), (KEYS[2].public_key, *_item(1, 2)[1:])]
    assert list(pv.submit(items)()) == [True, False, True, False]


def test_more_keys_than_a_batch_can_name_are_checked_in_process(pv: verifier.ProcessVerifier) -> None:
    keys = [signer(f"many{i}") for i in range(300)]
    items: list[PrecheckItem | None] = [
        (k.public_key, crypto.RECORD_DOMAIN, b"x", crypto.sign(k, crypto.RECORD_DOMAIN, b"x")) for k in keys
    ]
    assert verifier._encode(items) is None
    assert list(pv.submit(items)()) == [True] * 300


def test_threads_share_one_verifier(pv: verifier.ProcessVerifier) -> None:
    batches = [[_item(i % 3, i % 3, good=(i + j) % 4 != 0) for j in range(20)] for i in range(24)]

    def run(items: list[PrecheckItem]) -> bool:
        pending = [pv.submit(items) for _ in range(3)]
        return all(list(p()) == crypto.check_batch(items) for p in reversed(pending))

    with ThreadPoolExecutor(6) as pool:
        assert all(pool.map(run, batches))


def test_an_abandoned_batch_does_not_shift_later_answers(pv: verifier.ProcessVerifier) -> None:
    first = pv.submit([_item(0, 0)] * 5)
    verifier.cancel(first)
    items = [_item(1, 1, good=False), _item(1, 1)]
    assert [list(pv.submit(items)()) for _ in range(4)] == [[False, True]] * 4


def test_a_killed_worker_makes_the_caller_check_the_batch_itself() -> None:
    with verifier.ProcessVerifier(1) as v:
        items = [_item(0, 0), _item(0, 1, good=False)]
        assert list(v.submit(items)()) == [True, False]
        v._workers[0].proc.send_signal(signal.SIGKILL)
        v._workers[0].proc.wait()
        assert list(v.submit(items)()) == [True, False]
        assert not v.usable and v.broken is not None
        assert list(v.submit(items)()) == [True, False]  # from now on in process


def test_a_malformed_batch_gets_an_empty_answer() -> None:
    good = verifier._encode([_item(0, 0)])
    assert good is not None and verify_worker.check_frame(good) == b"\x01"
    for bad in (b"", good[:-1], good + b"\x00", b"\x01\xff\xff", b"\x00\x01" + b"k" * 5):
        assert verify_worker.check_frame(bad) == b""


def test_shared_workers_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WRIT_VERIFY_PROCESSES", "0")
    monkeypatch.setattr(verifier, "_shared", None)
    assert verifier.shared() is None


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_never_writes_to_its_parents_workers(pv: verifier.ProcessVerifier) -> None:
    items = [_item(0, 0)]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        ok = not pv.usable and list(pv.submit(items)()) == [True]
        pv.close()
        os.write(w, b"1" if ok else b"0")
        os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"1"
    os.close(r)
    os.waitpid(pid, 0)
    assert pv.usable and list(pv.submit(items)()) == [True]


# --- the pipeline with worker processes ----------------------------------------------------


def _long_world(n: int = 60) -> World:
    w = World()
    for i in range(n):
        seq = w.grant(signer(f"p{i}").public_key, records.ROLE_OPERATOR, f"p{i}")
        if i % 4 == 0:
            w.revoke(seq, by_revoker=i % 8 == 0)
    return w


@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_apply_stream_with_workers_equals_applying_one_by_one(
    pv: verifier.ProcessVerifier, chunk: int
) -> None:
    w = _long_world()
    runs = [w.records[i : i + 13] for i in range(0, w.size, 13)]
    st_ = LedgerState(w.root.public_key, origin=w.origin)
    spans: list[int] = []
    assert st_.apply_stream(runs, verifier=pv, chunk=chunk, on_span=spans.append) == w.size
    assert st_.snapshot() == w.state.snapshot() and sum(spans) == w.size


@pytest.mark.parametrize("bad", [5, 40, 70])
def test_a_forged_record_deep_in_a_stream_is_refused_at_its_seq(
    pv: verifier.ProcessVerifier, bad: int
) -> None:
    w = _long_world()
    raws = list(w.records)
    raws[bad] = raws[bad][:-1] + bytes([raws[bad][-1] ^ 1])
    with pytest.raises(errors.BadSignature) as info:
        audit.audit([raws[:50], raws[50:]], anchor=w.root.public_key, verifier=pv)
    assert info.value.seq == bad
    # the batches in flight were abandoned cleanly: the workers still answer in order
    _, rep = audit.audit([w.records], anchor=w.root.public_key, verifier=pv)
    assert rep.size == w.size and rep.root == w.state.root


def test_a_revoke_by_a_revoker_granted_in_the_same_stream_verifies_in_the_workers(
    pv: verifier.ProcessVerifier,
) -> None:
    w = World()
    oncall = signer("oncall")
    on_seq = w.grant(oncall.public_key, records.ROLE_REVOKER, "oncall")
    t_seq = w.grant(w.tablet.public_key, records.ROLE_OPERATOR, "tablet-07")
    w.add(Revoke(w.size, w.state.root, w.state.last_time + 1, on_seq, t_seq, 2), oncall)
    st_ = LedgerState(w.root.public_key, origin=w.origin)
    st_.apply_stream([w.records], verifier=pv, chunk=2)
    assert st_.is_revoked(t_seq) and st_.snapshot() == w.state.snapshot()


def test_a_long_audit_given_threads_checks_in_the_shared_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past ``PROCESS_MIN`` records a stream moves from the executor's threads to
    the shared worker processes, with the same result."""
    monkeypatch.setattr(verifier, "PROCESS_MIN", 100)
    used: list[int] = []
    real = verifier.ProcessVerifier.submit

    def spy(self: verifier.ProcessVerifier, items: list[PrecheckItem | None]) -> verifier.Results:
        used.append(len(items))
        return real(self, items)

    monkeypatch.setattr(verifier.ProcessVerifier, "submit", spy)
    w = _long_world(200)
    with ThreadPoolExecutor(2) as pool:
        _, rep = audit.audit([w.records], anchor=w.root.public_key, executor=pool)
    assert rep.size == w.size and rep.root == w.state.root
    if verifier.shared() is not None:
        assert used and sum(used) < w.size


def test_concurrent_streams_share_the_workers(pv: verifier.ProcessVerifier) -> None:
    w = _long_world(30)
    results: list[bytes] = []
    lock = threading.Lock()

    def one() -> None:
        st_ = LedgerState(w.root.public_key, origin=w.origin)
        st_.apply_stream([w.records], verifier=pv, chunk=4)
        with lock:
            results.append(st_.root)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [w.state.root] * 4


def test_closing_twice_is_harmless() -> None:
    v = verifier.ProcessVerifier(1)
    v.close()
    with contextlib.suppress(Exception):
        v.close()
    assert not v.usable


def test_a_bulk_run_pauses_the_collector_and_restores_it(pv: verifier.ProcessVerifier) -> None:
    """The cyclic collector is off while a parallel run applies, back on after it
    (also after a rejection), and left off if it was off before."""
    import gc

    w = _long_world(10)
    seen: list[bool] = []
    st_ = LedgerState(w.root.public_key, origin=w.origin)
    st_.apply_stream([w.records], verifier=pv, on_record=lambda _r: seen.append(gc.isenabled()))
    assert seen and not any(seen) and gc.isenabled()
    bad = list(w.records)
    bad[5] = bad[5][:-1] + bytes([bad[5][-1] ^ 1])
    with pytest.raises(errors.BadSignature):
        LedgerState(w.root.public_key, origin=w.origin).apply_stream([bad], verifier=pv)
    assert gc.isenabled()
    gc.disable()
    try:
        LedgerState(w.root.public_key, origin=w.origin).apply_stream([w.records], verifier=pv)
        assert not gc.isenabled()
    finally:
        gc.enable()
