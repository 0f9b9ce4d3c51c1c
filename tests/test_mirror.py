"""``ledger.mirror.Mirror``: the signing tool's verified local mirror.

A mirror syncs from a source (here :class:`tests.helpers.sources.ListSource`
over a :class:`tests.helpers.device.World`), or is extended by a bundle; it
applies records with the same rules as everyone and accepts the checkpoint
with ``ledger.acceptance``; anything that fails raises, keeps evidence, and leaves
the mirror's files byte for byte as they were. The CLI's use of it
(``writ mirror import``, ``sign --offline``, hostile servers) is in
``tests/test_cli.py``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from ledger import mirror as mirror_mod
from ledger import records
from ledger.acceptance import MAX_AHEAD
from ledger.errors import (
    BadMessage,
    BadSignature,
    CorruptLedger,
    Fork,
    FutureCheckpoint,
    Rollback,
    UntrustedCheckpoint,
    UsageError,
    WritError,
)
from ledger.mirror import Mirror, default_dir, origin_of
from ledger.state import LedgerState
from tests.helpers.device import T0, World, signer
from tests.helpers.lost_tablet import LostTablet
from tests.helpers.sources import ListSource

NOW = T0 + 1000


def source(w: World, *, ts: int = NOW, size: int | None = None) -> ListSource:
    n = w.size if size is None else size
    return ListSource(w.records[:n], w.checkpoint(ts, n))


def files(path: Path) -> dict[str, bytes]:
    """The mirror's committed files (not the lock, not the evidence)."""
    return {p.name: p.read_bytes() for p in path.iterdir() if p.name in ("state.bin", "records.bin")}


def evidence_kinds(path: Path) -> list[str]:
    return sorted(json.loads(p.read_text())["kind"] for p in (path / "evidence").glob("*.json"))


def synced(tmp_path: Path, w: World, **kw: int) -> Path:
    path = tmp_path / "mirror"
    with Mirror.open(path, w.root.public_key) as m:
        m.sync(source(w, **kw), now=NOW)
    return path


# --- open --------------------------------------------------------------------------------------


def test_a_new_mirror_needs_an_anchor(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        Mirror.open(tmp_path / "m", None)
    with pytest.raises(UsageError):
        Mirror.open(tmp_path / "m", signer("root").public_key, create=False)
    assert not (tmp_path / "m").exists()


def test_a_mirror_of_another_anchor_is_refused(tmp_path: Path) -> None:
    path = synced(tmp_path, World())
    with pytest.raises(UsageError, match="anchor"):
        Mirror.open(path, signer("another-root").public_key)
    with Mirror.open(path, None) as m:  # no anchor given: the mirror's own
        assert m.anchor == signer("root").public_key


def test_a_mirror_is_locked_while_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mirror_mod, "LOCK_TIMEOUT", 0.1)
    w = World()
    with Mirror.open(tmp_path / "m", w.root.public_key), pytest.raises(UsageError, match="in use"):
        Mirror.open(tmp_path / "m", w.root.public_key)
    Mirror.open(tmp_path / "m", w.root.public_key).close()


def test_a_damaged_state_file_is_corrupt(tmp_path: Path) -> None:
    path = synced(tmp_path, World())
    (path / "state.bin").write_bytes((path / "state.bin").read_bytes()[:-5])
    with pytest.raises(CorruptLedger, match="damaged"):
        Mirror.open(path, None)


def test_a_truncated_records_file_is_corrupt(tmp_path: Path) -> None:
    path = synced(tmp_path, World())
    (path / "records.bin").write_bytes((path / "records.bin").read_bytes()[:-1])
    with pytest.raises(CorruptLedger, match="shorter"):
        Mirror.open(path, None)


def test_a_rewritten_record_is_found_when_reading(tmp_path: Path) -> None:
    path = synced(tmp_path, World())
    data = bytearray((path / "records.bin").read_bytes())
    data[-1] ^= 1
    (path / "records.bin").write_bytes(bytes(data))
    with Mirror.open(path, None) as m, pytest.raises(CorruptLedger, match="committed tree"):
        m.read_records()


# --- sync ----------------------------------------------------------------------------------------


def test_sync_verifies_commits_and_survives_a_reopen(tmp_path: Path) -> None:
    w = World()
    path = tmp_path / "m"
    with Mirror.open(path, w.root.public_key) as m:
        r = m.sync(source(w), now=NOW)
        assert (r.fetched, r.size, r.root, r.checkpoint_time, r.warning) == (
            w.size,
            w.size,
            w.state.root,
            NOW,
            None,
        )
        assert r.to_json()["root"] == w.state.root.hex()
    with Mirror.open(path, None) as m:
        assert m.size == w.size and m.view is not None and m.view.timestamp == NOW
        assert m.read_records() == w.records  # the very bytes, never re-encoded
        assert m.read_records(1, 2) == w.records[1:2]
        with pytest.raises(UsageError):
            m.read_records(0, w.size + 1)


def test_sync_fetches_only_what_is_missing_and_pages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mirror_mod, "PAGE", 2)
    story = LostTablet.build()
    w = story.world
    path = synced(tmp_path, w)
    story.revoke()
    for i in range(3):
        w.grant(signer(f"k{i}").public_key, records.ROLE_OPERATOR, f"k{i}")
    src = source(w, ts=NOW + 10)
    progress: list[int] = []
    with Mirror.open(path, None) as m:
        before = m.size
        r = m.sync(src, progress=progress.append, now=NOW + 10)
        assert (r.fetched, r.size) == (w.size - before, w.size)
        assert m.state.is_revoked(story.seq)
        assert m.sync(src, now=NOW + 10).fetched == 0  # nothing new: nothing fetched
    assert src.calls[0][0] == before and all(limit <= 2 for _, limit in src.calls)
    assert sum(progress) == w.size - before


def test_sync_of_a_short_page_source_still_reaches_the_checkpoint(tmp_path: Path) -> None:
    w = _grow(World(), 6)
    src = ListSource(w.records, w.checkpoint(NOW), page_limit=3)
    with Mirror.open(tmp_path / "m", w.root.public_key) as m:
        assert m.sync(src, now=NOW).size == w.size


def _grow(w: World, n: int) -> World:
    for i in range(n):
        w.grant(signer(f"g{i}").public_key, records.ROLE_OPERATOR, f"g{i}")
    return w


def test_a_ledger_without_a_log_key_syncs_with_a_warning(tmp_path: Path) -> None:
    """Bootstrapping: before the log grant no key can sign a checkpoint; the
    records themselves are root-verified, and the count must match."""
    w = World()
    n = 1  # the genesis only
    with Mirror.open(tmp_path / "m", w.root.public_key) as m:
        before = files(tmp_path / "m")
        with pytest.raises(Rollback):
            m.sync(ListSource(w.records[:n], w.checkpoint(NOW, n + 1)), now=NOW)
        assert files(tmp_path / "m") == before and m.size == 0
        r = m.sync(ListSource(w.records[:n], w.checkpoint(NOW, n)), now=NOW)
        assert r.size == 1 and r.warning is not None and "no log key" in r.warning


# --- refusals leave the mirror unchanged, with evidence ---------------------------------------------


GROWN = 3  # grants before the mirror syncs, and again before the attack


def _forged(w: World) -> ListSource:
    raws = list(w.records)
    raws[-1] = raws[-1][:-1] + bytes([raws[-1][-1] ^ 1])
    return ListSource(raws, w.checkpoint(NOW + 10))


def _rollback(w: World) -> ListSource:
    return ListSource(w.records, w.checkpoint(NOW + 10, w.size - GROWN - 1))  # below the mirror's size


def _fork(w: World) -> ListSource:
    other = World()  # the same keys and first records, then another history
    other.grant(signer("intruder").public_key, records.ROLE_OPERATOR, "intruder")
    _grow(other, 2 * GROWN)
    return ListSource(other.records, other.checkpoint(NOW + 10))


def _future(w: World) -> ListSource:
    return ListSource(w.records, w.checkpoint(NOW + 10 + MAX_AHEAD + 1))


def _unknown_log_key(w: World) -> ListSource:
    return ListSource(w.records, w.checkpoint(NOW + 10, key=signer("not-the-log")))


def _wrong_root(w: World) -> ListSource:
    return ListSource(w.records, w.checkpoint(NOW + 10, root=bytes(32)))


@pytest.mark.parametrize(
    ("attack", "exc", "kind"),
    [
        (_forged, BadSignature, "bad-signature"),
        (_rollback, Rollback, "rollback"),
        (_fork, Fork, "fork"),
        (_future, FutureCheckpoint, "future-checkpoint"),
        (_unknown_log_key, UntrustedCheckpoint, "untrusted-checkpoint"),
        (_wrong_root, Fork, "fork"),  # the log signs another tree than these records make
    ],
    ids=["forged-record", "rollback", "fork", "future-checkpoint", "unknown-log-key", "wrong-root"],
)
def test_a_hostile_source_is_refused_and_the_mirror_is_unchanged(
    tmp_path: Path, attack: Callable[[World], ListSource], exc: type[WritError], kind: str
) -> None:
    w = _grow(World(), GROWN)
    path = synced(tmp_path, w)
    _grow(w, GROWN)
    src = attack(w)
    before = files(path)
    with Mirror.open(path, None) as m:
        state_before = m.state.snapshot()
        with pytest.raises(exc):
            m.sync(src, now=NOW + 10)
        assert m.state.snapshot() == state_before
    assert files(path) == before
    assert evidence_kinds(path) == [kind]
    with Mirror.open(path, None) as m:  # and the honest source is still accepted afterwards
        assert m.sync(source(w, ts=NOW + 10), now=NOW + 10).size == w.size


def test_a_future_checkpoint_is_refused_at_the_machines_clock(tmp_path: Path) -> None:
    w = World()
    path = synced(tmp_path, w)
    with Mirror.open(path, None) as m:
        with pytest.raises(FutureCheckpoint):
            m.sync(source(w, ts=NOW + MAX_AHEAD + 1), now=NOW)
        assert m.view is not None and m.view.timestamp == NOW
        r = m.sync(source(w, ts=NOW + MAX_AHEAD), now=NOW)  # within the bound: a fast log clock
        assert r.checkpoint_time == NOW + MAX_AHEAD


# --- extend: a bundle for an offline machine ------------------------------------------------------


def test_extend_applies_a_bundle_and_checks_the_overlap(tmp_path: Path) -> None:
    w = World()
    path = synced(tmp_path, w)
    have = w.size
    _grow(w, 4)
    with Mirror.open(path, None) as m:
        r = m.extend(have - 2, w.records[have - 2 :], w.checkpoint(NOW + 5), now=NOW + 5)
        assert (r.fetched, r.size) == (4, w.size)
        assert m.read_records() == w.records


def test_a_bundle_that_leaves_a_gap_is_refused(tmp_path: Path) -> None:
    w = World()
    path = synced(tmp_path, w)
    have = w.size
    _grow(w, 4)
    before = files(path)
    with Mirror.open(path, None) as m, pytest.raises(BadMessage, match="--start"):
        m.extend(have + 1, w.records[have + 1 :], w.checkpoint(NOW + 5), now=NOW + 5)
    assert files(path) == before


def test_a_bundle_that_rewrites_the_mirrors_history_is_a_fork(tmp_path: Path) -> None:
    w = World()
    fork_at = w.size
    _grow(w, 2)
    path = synced(tmp_path, w)
    other = World()
    other.grant(signer("intruder").public_key, records.ROLE_OPERATOR, "intruder")
    before = files(path)
    with Mirror.open(path, None) as m, pytest.raises(Fork) as info:
        m.extend(0, other.records, other.checkpoint(NOW + 5), now=NOW + 5)
    assert files(path) == before and evidence_kinds(path) == ["fork"]
    assert info.value.detail["seq"] == fork_at


def test_bytes_past_the_committed_length_are_ignored_and_overwritten(tmp_path: Path) -> None:
    """A crash between the records append and the state write leaves a tail
    that the state does not count: it is ignored, then overwritten."""
    w = World()
    path = synced(tmp_path, w)
    with (path / "records.bin").open("ab") as fh:
        fh.write(b"\x00\x05torn!")
    _grow(w, 2)
    with Mirror.open(path, None) as m:
        assert m.read_records() == w.records[: m.size]
        m.sync(source(w, ts=NOW + 5), now=NOW + 5)
    with Mirror.open(path, None) as m:
        assert m.read_records() == w.records


# --- where mirrors live ----------------------------------------------------------------------------


def test_default_dir_is_per_origin_under_writ_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WRIT_HOME", str(tmp_path))
    a, b = default_dir("ledger.example/a"), default_dir("ledger.example/b")
    assert a.parent == tmp_path / "mirrors" and a != b and len(a.name) == 16
    assert origin_of(World().checkpoint(NOW)) == World().origin


def test_a_new_mirror_state_is_an_empty_ledger_state(tmp_path: Path) -> None:
    w = World()
    with Mirror.open(tmp_path / "m", w.root.public_key) as m:
        assert m.new and m.size == 0 and isinstance(m.state, LedgerState) and m.view is None
