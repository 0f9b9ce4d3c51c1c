"""A hostile log against a device (docs/threats.md: network attacker, stolen server).

Each attack: the sync raises the right error type, the device's state file is
byte for byte what it was, the in-memory device did not move, evidence is
kept for every verification failure (for a fork or a rollback: both signed
notes), and an honest sync afterwards still works."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from device_sim.device import Device
from device_sim.sources import (
    MAX_CHECKPOINT,
    MAX_ENTRY_BUNDLE,
    BundleSource,
    HttpSource,
    SseSource,
    Update,
    sync,
)
from device_sim.sse import decode_event_json
from ledger import messages, records, tiles
from ledger.errors import (
    BadMessage,
    BadNote,
    BadSignature,
    Fork,
    FutureCheckpoint,
    HTTPStatusError,
    ResponseTooLarge,
    Rollback,
    StaleHead,
    TimestampRegression,
    TransportError,
    UntrustedCheckpoint,
    VerificationError,
    WritError,
    WrongAnchor,
    WrongLedger,
    WrongOrigin,
)
from tests.helpers.device import T0, FakeLog, World, free_port, signer

NOW = T0 + 1000
TS = T0 + 900
URL = "http://log.test"


@dataclass
class Ctx:
    world: World  # the honest ledger, grown by two records since the device synced
    fork: World  # another history signed by the same root and log keys
    log: FakeLog
    have: int  # the device's size
    accepted_note: str


def _flip_last_byte(raw: bytes) -> bytes:
    return raw[:-1] + bytes([raw[-1] ^ 1])


def _tamper_tiles(fn: Callable[[bytes], bytes]) -> Callable[[str, bytes], bytes]:
    return lambda path, body: fn(body) if path.startswith("tile/entries/") else body


def forged_record(c: Ctx) -> None:
    c.log.publish(c.world, TS + 1)
    c.log.records[-1] = _flip_last_byte(c.log.records[-1])


def replayed_older_checkpoint(c: Ctx) -> None:
    c.log.publish(c.world, TS + 5, c.have - 1)


def replayed_older_checkpoint_same_time(c: Ctx) -> None:
    c.log.publish(c.world, TS, c.have - 1)


def fork_same_size_other_root(c: Ctx) -> None:
    c.log.publish(c.fork, TS + 5, c.have)


def fork_other_records(c: Ctx) -> None:
    c.log.publish(c.fork, TS + 5, c.have + 2)


def fork_checkpoint_over_honest_records(c: Ctx) -> None:
    c.log.publish(c.world, TS + 5)
    c.log.note = c.fork.checkpoint(TS + 5, c.world.size)


def checkpoint_by_ungranted_key(c: Ctx) -> None:
    c.log.publish(c.world, TS + 5)
    c.log.note = c.world.checkpoint(TS + 5, key=signer("mallory"))


def checkpoint_by_revoked_log_key(c: Ctx) -> None:
    c.world.grant(signer("log-2").public_key, "log", "log-2")
    c.world.revoke(c.world.log_seq, reason=1)
    c.log.publish(c.world, TS + 5)  # still signed by the revoked key
    c.world.log = signer("log-2")  # the honest log, afterwards


def checkpoint_of_another_origin(c: Ctx) -> None:
    c.log.publish(c.world, TS + 5)
    c.log.note = c.world.checkpoint(TS + 5, origin="ledger.other.example/x")


def timestamp_going_backwards(c: Ctx) -> None:
    c.log.publish(c.world, TS - 1, c.have)


def timestamp_going_backwards_with_growth(c: Ctx) -> None:
    c.log.publish(c.world, TS - 1)


def future_dated_checkpoint(c: Ctx) -> None:  # a stolen log key dates its checkpoint a century ahead
    c.log.publish(c.world, NOW + 100 * 365 * 86400)


def future_dated_checkpoint_same_size(c: Ctx) -> None:  # just beyond the 300 s bound
    c.log.publish(c.world, NOW + 301, c.have)


def garbage_checkpoint(c: Ctx) -> None:
    c.log.note = "hello, device\n"


def truncated_entry_bundle(c: Ctx) -> None:
    c.log.publish(c.world, TS + 1)
    c.log.tamper = _tamper_tiles(lambda b: b[:-3])


def garbage_entry_bundle(c: Ctx) -> None:
    c.log.publish(c.world, TS + 1)
    c.log.tamper = _tamper_tiles(lambda b: b"\xff" * 40)


def empty_entry_bundle(c: Ctx) -> None:
    c.log.publish(c.world, TS + 1)
    c.log.tamper = _tamper_tiles(lambda b: b"")


def tile_with_an_extra_record(c: Ctx) -> None:
    c.log.publish(c.world, TS + 1)
    extra = c.world.records[-1]
    c.log.tamper = _tamper_tiles(lambda b: b + len(extra).to_bytes(2, "big") + extra)


def tile_with_records_reordered(c: Ctx) -> None:  # the second new record is served first
    c.log.publish(c.world, TS + 1)
    n = c.world.size

    def swap(body: bytes) -> bytes:
        entries = tiles.decode_entry_bundle(body)
        entries[n - 1], entries[n - 2] = entries[n - 2], entries[n - 1]
        return tiles.encode_entry_bundle(entries)

    c.log.tamper = _tamper_tiles(swap)


def oversized_entry_bundle(c: Ctx) -> None:
    c.log.publish(c.world, TS + 1)
    c.log.tamper = _tamper_tiles(lambda b: b + bytes(MAX_ENTRY_BUNDLE))


def oversized_checkpoint(c: Ctx) -> None:
    c.log.note = "x" * (MAX_CHECKPOINT + 1)


def endless_body(c: Ctx) -> None:
    c.log.endless = True


def server_error(c: Ctx) -> None:
    c.log.status = 500


@dataclass(frozen=True)
class Attack:
    play: Callable[[Ctx], None]
    error: type[WritError]
    both_notes: bool = False


ATTACKS = [
    Attack(forged_record, BadSignature),
    Attack(replayed_older_checkpoint, Rollback, both_notes=True),
    Attack(replayed_older_checkpoint_same_time, Rollback, both_notes=True),
    Attack(fork_same_size_other_root, Fork, both_notes=True),
    Attack(fork_other_records, StaleHead),
    Attack(fork_checkpoint_over_honest_records, Fork, both_notes=True),
    Attack(checkpoint_by_ungranted_key, UntrustedCheckpoint, both_notes=True),
    Attack(checkpoint_by_revoked_log_key, UntrustedCheckpoint, both_notes=True),
    Attack(checkpoint_of_another_origin, WrongOrigin, both_notes=True),
    Attack(timestamp_going_backwards, TimestampRegression, both_notes=True),
    Attack(timestamp_going_backwards_with_growth, TimestampRegression, both_notes=True),
    Attack(future_dated_checkpoint, FutureCheckpoint, both_notes=True),
    Attack(future_dated_checkpoint_same_size, FutureCheckpoint, both_notes=True),
    Attack(garbage_checkpoint, BadNote),
    Attack(truncated_entry_bundle, BadMessage),
    Attack(garbage_entry_bundle, BadMessage),
    Attack(empty_entry_bundle, BadMessage),
    Attack(tile_with_an_extra_record, BadMessage),
    Attack(tile_with_records_reordered, StaleHead),
    Attack(oversized_entry_bundle, ResponseTooLarge),
    Attack(oversized_checkpoint, ResponseTooLarge),
    Attack(endless_body, ResponseTooLarge),
    Attack(server_error, HTTPStatusError),
]


def _setup(tmp_path: Path) -> tuple[Ctx, Path]:
    w = World()
    w.grant(w.tablet.public_key, "operator", "tablet-07")
    fork = World(tag="-fork")
    fork.grant(fork.tablet.public_key, "operator", "tablet-07")
    for i in range(2):
        fork.grant(signer(f"fork-{i}").public_key, "operator", f"fork-{i}")
    d = tmp_path / "device"
    dev = Device.create(w.root.public_key, w.origin, directory=d, now=T0)
    note = w.checkpoint(TS)
    dev.apply_update(w.records, 0, note, NOW)
    have = w.size
    for i in range(2):
        w.grant(signer(f"op-{i}").public_key, "operator", f"op-{i}")
    log = FakeLog()
    log.publish(w, TS, have)
    return Ctx(w, fork, log, have, note), d


async def _sync(dev: Device, log: FakeLog, *, timeout: float = 10.0) -> None:
    async with log.client() as client:
        await sync(dev, HttpSource(client, URL, timeout=timeout), NOW)


@pytest.mark.parametrize("attack", ATTACKS, ids=lambda a: a.play.__name__)
async def test_hostile_log(tmp_path: Path, attack: Attack) -> None:
    c, d = _setup(tmp_path)
    state_file = d / "state.bin"
    before = state_file.read_bytes()
    dev = Device.load(d)
    attack.play(c)
    with pytest.raises(WritError) as info:
        await _sync(dev, c.log)
    c.log.closing = True
    assert type(info.value) is attack.error, info.value
    assert state_file.read_bytes() == before
    assert (dev.size, dev.view) == (c.have, Device.load(d).view)
    kept = Device.load(d).evidence
    if isinstance(info.value, VerificationError):
        assert kept and kept[-1].kind == attack.error.type and kept == dev.evidence
        if attack.both_notes:
            assert kept[-1].notes == (c.accepted_note, c.log.note)
        else:  # the bad data itself, and the checkpoint it came with
            assert kept[-1].data is not None and kept[-1].notes == (c.log.note,)
        if attack.play is tile_with_records_reordered:  # the record refused, not its neighbour
            assert kept[-1].data == c.world.records[c.have + 1].hex()
    else:
        assert kept == []  # a transport failure is not evidence against the log
    # the device recovers as soon as the log is honest again
    honest = FakeLog()
    honest.publish(c.world, TS + 10)
    await _sync(dev, honest)
    assert (dev.size, dev.root) == (c.world.size, c.world.root_at())
    assert Device.load(d).size == c.world.size


async def test_slow_loris_cannot_hang_the_device(tmp_path: Path) -> None:
    c, d = _setup(tmp_path)
    before = (d / "state.bin").read_bytes()
    dev = Device.load(d)
    c.log.slow = True
    t = time.monotonic()
    with pytest.raises(TransportError) as info:
        await _sync(dev, c.log, timeout=0.5)
    c.log.closing = True
    assert info.value.type == "unreachable"
    assert time.monotonic() - t < 3
    assert (d / "state.bin").read_bytes() == before


async def test_slow_tiles_cannot_hang_the_device(tmp_path: Path) -> None:
    c, d = _setup(tmp_path)
    dev = Device.load(d)
    c.log.publish(c.world, TS + 1)
    honest_reply = c.log.reply

    async def slow_tiles(method: str, path: str, headers: httpx.Headers, content: bytes) -> object:
        if path.startswith("/tile/"):
            c.log.slow = True
        return await honest_reply(method, path, headers, content)

    c.log.reply = slow_tiles  # type: ignore[assignment, method-assign]
    with pytest.raises(TransportError):
        await _sync(dev, c.log, timeout=0.5)
    c.log.closing = True
    assert dev.size == c.have


async def test_unreachable_server(tmp_path: Path) -> None:
    _, d = _setup(tmp_path)
    dev = Device.load(d)
    async with httpx.AsyncClient() as client:
        with pytest.raises(TransportError) as info:
            await HttpSource(client, f"http://127.0.0.1:{free_port()}", timeout=2).fetch(dev.size)
    assert info.value.type == "unreachable"


async def test_frozen_checkpoint_goes_stale(tmp_path: Path) -> None:
    """The log stops re-signing: the view freezes at TS. Syncs still succeed
    (nothing to refuse), but the device reports itself stale and refuses
    credentials by default; with the accept policy it accepts, and says so."""
    c, d = _setup(tmp_path)
    dev = Device.load(d)
    later = TS + 2 * 86400
    async with c.log.client() as client:
        r = dev.apply(await HttpSource(client, URL).fetch(dev.size), later)
    assert (r.size, r.checkpoint_time, r.stale) == (c.have, TS, True)
    assert dev.status(later)["stale"] is True and dev.status(later)["staleness"] == 2 * 86400
    grant = c.world.records[c.world.size - 3]  # the tablet's grant (published before the sync)
    auth = messages.make_auth(grant, c.world.tablet, dev.public_key, dev.challenge(), later)
    v = dev.check(auth, later)
    assert (v.accepted, v.reason, v.stale) == (False, "stale", True)
    lenient = Device.create(c.world.root.public_key, c.world.origin, now=T0, stale_policy="accept")
    lenient.apply_update(c.world.records[: c.have], 0, c.accepted_note, NOW)
    auth = messages.make_auth(grant, c.world.tablet, lenient.public_key, lenient.challenge(), later)
    v = lenient.check(auth, later)
    assert (v.accepted, v.reason, v.stale) == (True, None, True)


async def test_bundle_from_a_hostile_source_is_refused_like_http(tmp_path: Path) -> None:
    c, d = _setup(tmp_path)
    dev = Device.load(d)
    before = (d / "state.bin").read_bytes()
    recs = list(c.world.records[c.have :])
    recs[0] = _flip_last_byte(recs[0])
    bundle = messages.parse_bundle(messages.make_bundle(c.have, recs, c.world.checkpoint(TS + 1)))
    with pytest.raises(BadSignature):
        dev.apply_update(list(bundle.records), bundle.start, bundle.checkpoint, NOW)
    with pytest.raises(Rollback):
        dev.apply_update(c.world.records[:3], 0, c.world.checkpoint(TS + 1, 3), NOW)
    assert (d / "state.bin").read_bytes() == before
    assert [e.kind for e in Device.load(d).evidence] == ["bad-signature", "rollback"]


# --- unsigned data must not drive allocation or downloads (issue: hostile sizes) ---------

HUGE = 2**63 - 1


def _tile_requests(log: FakeLog) -> list[str]:
    return [p for p in log.requests if p.startswith("/tile/")]


@pytest.mark.parametrize("key", ["log", "mallory"])
async def test_huge_checkpoint_size_is_refused_without_allocating_by_it(tmp_path: Path, key: str) -> None:
    """Size 2**63-1 once raised MemoryError (a list entry per claimed tile):
    now at most a window of tiles is asked for, and the checkpoint is refused
    against the tree the device could build: a fork when the device's own log
    key signed it, untrusted when nobody it knows did."""
    c, d = _setup(tmp_path)
    before = (d / "state.bin").read_bytes()
    dev = Device.load(d)
    c.log.note = c.world.checkpoint(TS + 1, HUGE, root=bytes(32), key=signer(key))
    with pytest.raises((Fork, UntrustedCheckpoint)) as info:
        await _sync(dev, c.log)
    c.log.closing = True
    assert type(info.value) is (Fork if key == "log" else UntrustedCheckpoint)
    assert len(_tile_requests(c.log)) <= (4 if key == "log" else 1)
    assert (d / "state.bin").read_bytes() == before and dev.size == c.have
    assert Device.load(d).evidence[-1].kind == info.value.type


def _garbage_tiles(log: FakeLog, entries: list[bytes]) -> None:
    """Every tile path answers 200 with a well-formed entry bundle of ``entries``."""
    honest = log.reply

    async def reply(method: str, path: str, headers: httpx.Headers, content: bytes) -> object:
        if path.startswith("/tile/entries/"):
            log.requests.append(path)
            t = tiles.parse_tile_path(path.lstrip("/"))
            from tests.helpers.device import Reply

            return Reply(200, tiles.encode_entry_bundle((entries * t.width)[: t.width]))
        return await honest(method, path, headers, content)

    log.reply = reply  # type: ignore[assignment, method-assign]


@pytest.mark.parametrize("fresh", [True, False], ids=["fresh-device", "synced-device"])
async def test_claimed_256000_from_an_unknown_key_costs_one_tile(tmp_path: Path, fresh: bool) -> None:
    """A fresh device cannot check the checkpoint's signature before it has the
    records; it fetches one tile, refuses its first record, and stops (it
    once fetched 1,000 garbage tiles first)."""
    c, d = _setup(tmp_path)
    dev = Device.create(c.world.root.public_key, c.world.origin, now=T0) if fresh else Device.load(d)
    log = FakeLog()
    log.note = c.world.checkpoint(TS + 1, 256_000, root=bytes(32), key=signer("mallory"))
    _garbage_tiles(log, [b"\x92\xc4\x03abc\xc4\x40" + bytes(64)])  # a record-shaped thing, wrong in every way
    with pytest.raises(VerificationError):
        await _sync(dev, log)
    assert len(_tile_requests(log)) == 1
    assert dev.size == (0 if fresh else c.have)


@pytest.mark.parametrize("key", ["mallory", "log"])
async def test_forged_records_after_valid_ones_stop_the_download(key: str) -> None:
    """Honest records, then a forged one in tile 1 of 3. Under a checkpoint
    no known key signed, nothing after that tile is fetched; once the records
    applied grant the key that signed it, a window of tiles ahead may be."""
    w = World()
    for i in range(600):
        w.grant(signer(f"op-{i}").public_key, "operator", f"op-{i}")
    log = FakeLog()
    log.publish(w, TS)
    log.note = w.checkpoint(TS, key=signer(key))
    log.records[300] = _flip_last_byte(log.records[300])
    dev = Device.create(w.root.public_key, w.origin, now=T0)
    with pytest.raises(BadSignature):
        await _sync(dev, log)
    fetched = _tile_requests(log)
    assert fetched[:2] == ["/tile/entries/000", "/tile/entries/001"]
    assert fetched[2:] == ([] if key == "mallory" else [f"/tile/entries/002.p/{w.size - 512}"])
    assert dev.size == 0


# --- records overlapping what the device applied (bundles) ------------------------------


def _synced(w: World, tmp_path: Path | None = None) -> Device:
    dev = Device.create(w.root.public_key, w.origin, directory=tmp_path, now=T0)
    dev.apply_update(w.records, 0, w.checkpoint(TS), NOW)
    return dev


def _world(n: int) -> World:
    w = World()
    for i in range(n):
        w.grant(signer(f"g-{i}").public_key, "operator", f"g-{i}")
    return w


def test_forged_genesis_in_a_bundle_overlap_is_a_fork(tmp_path: Path) -> None:
    """The overlap is compared by recomputing the device's compact range: a
    forged genesis at seq 0, signed by someone else entirely, is a fork."""
    w = _world(4)
    dev = _synced(w, tmp_path)
    before = (tmp_path / "state.bin").read_bytes()
    forged = records.sign(
        records.Genesis(0, records.EMPTY_HASH, T0, w.origin, signer("evil").public_key, None), signer("evil")
    )
    w.grant(signer("new").public_key, "operator", "new")
    data = messages.make_bundle(0, [forged, *w.records[1:]], w.checkpoint(TS + 1))
    with pytest.raises(Fork) as info:
        dev.apply(BundleSource.parse(data), NOW)
    assert (tmp_path / "state.bin").read_bytes() == before
    ev = Device.load(tmp_path).evidence[-1]
    assert ev.kind == "fork" and info.value.type == "fork"


@pytest.mark.parametrize("seq", [3, 4, 6])
def test_forged_revoke_in_a_bundle_overlap_is_a_fork(seq: int) -> None:
    """A record the device did not keep (a revoke, an operator grant in a
    compact device) replaced in the overlap: the recomputed subtree differs."""
    w = _world(3)
    w.revoke(5)
    w.grant(signer("x").public_key, "operator", "x")
    dev = Device.create(w.root.public_key, w.origin, now=T0, keep_roles={"device"})
    dev.apply_update(w.records, 0, w.checkpoint(TS), NOW)
    snap = dev.state.snapshot()
    forged = list(w.records)
    forged[seq] = records.sign(
        records.Revoke(seq, w.root_at(seq), T0 + 50, 0, signer("someone").public_key, 1), signer("root")
    )
    # a newer bundle, and an old stick: both must show every overlapping record
    w.grant(signer("y").public_key, "operator", "y")
    for recs, note in ((forged + w.records[-1:], w.checkpoint(TS + 1)), (forged, w.checkpoint(TS + 1, 8))):
        with pytest.raises(Fork):
            dev.apply(BundleSource.parse(messages.make_bundle(0, recs, note)), NOW)
    assert dev.state.snapshot() == snap


def test_overlap_check_is_exact_for_every_size_and_aligned_start() -> None:
    """For every device size 2 <= n <= 20 and every start the device can check
    (0 and its compact range's boundaries), the honest overlap passes and
    each single altered record is caught."""
    w = _world(18)  # 21 records
    other = World("ledger.test.example/other", tag="-o")  # every record differs
    for i in range(18):
        other.grant(signer(f"h-{i}").public_key, "operator", f"h-{i}")
    for n in range(2, 21):  # from the log grant on, the device can accept a checkpoint
        dev = Device.create(w.root.public_key, w.origin, now=T0, keep_roles=set())
        dev.apply_update(w.records[:n], 0, w.checkpoint(TS, n), NOW)
        starts, a = [0], 0
        for h in range(n.bit_length(), -1, -1):
            if n & (1 << h):
                a += 1 << h
                starts.append(a)
        for s in starts[:-1]:
            r = dev.apply(Update(s, w.records[s : n + 1], w.checkpoint(TS + 1, n + 1), bundle=True), NOW)
            assert r.size == n + 1
            dev = Device.create(w.root.public_key, w.origin, now=T0, keep_roles=set())
            dev.apply_update(w.records[:n], 0, w.checkpoint(TS, n), NOW)
            for i in range(s, n):
                bad = list(w.records[s : n + 1])
                bad[i - s] = other.records[i]
                with pytest.raises((Fork, StaleHead)):
                    dev.apply(Update(s, bad, w.checkpoint(TS + 1, n + 1), bundle=True), NOW)
                assert dev.size == n


def test_overlap_starting_inside_a_subtree_cannot_be_shown_and_is_refused() -> None:
    w = _world(2)  # 5 records: the device keeps the subtrees [0, 4) and [4, 5)
    dev = _synced(w)
    w.grant(signer("n").public_key, "operator", "n")
    with pytest.raises(Fork) as info:
        dev.apply(Update(2, w.records[2:], w.checkpoint(TS + 1), bundle=True), NOW)
    assert "[0, 4)" in info.value.message and "starting at seq 0 can be checked" in info.value.message
    assert dev.size == 5
    # from a boundary it works
    r = dev.apply(Update(4, w.records[4:], w.checkpoint(TS + 1), bundle=True), NOW)
    assert r.size == 6


# --- an old USB stick is not an alarm; over HTTP an older checkpoint stays a rollback ----


def test_an_older_bundle_is_nothing_new_and_still_checked(tmp_path: Path) -> None:
    w = _world(6)
    dev = _synced(w, tmp_path)
    before = (tmp_path / "state.bin").read_bytes()
    for m in (3, 5, w.size):
        r = dev.apply(BundleSource.parse(w.bundle(0, TS - 5, m)), NOW)
        assert (r.nothing_new, r.size, r.appended) == (m, w.size, 0)
        assert r.to_json()["nothing_new"] is True and "nothing new" in r.to_json()["note"]
    assert (tmp_path / "state.bin").read_bytes() == before
    # the same old stick with one record changed: a fork, with evidence
    bad = list(w.records[:5])
    bad[4] = World(tag="-z").records[2]
    with pytest.raises((Fork, StaleHead)):
        dev.apply(BundleSource.parse(messages.make_bundle(0, bad, w.checkpoint(TS - 5, 5))), NOW)
    # and a stick whose checkpoint is not the tree of its records
    with pytest.raises(Fork):
        dev.apply(
            BundleSource.parse(messages.make_bundle(0, w.records[:5], w.checkpoint(TS, 5, root=bytes(32)))),
            NOW,
        )
    with pytest.raises(UntrustedCheckpoint):  # an old stick's checkpoint must still be the log's
        dev.apply(
            BundleSource.parse(messages.make_bundle(0, w.records[:5], w.checkpoint(TS, 5, key=signer("m")))),
            NOW,
        )
    assert (tmp_path / "state.bin").read_bytes() == before
    # over HTTP (no bundle flag) the same smaller checkpoint is a rollback
    with pytest.raises(Rollback):
        dev.apply_update(w.records[:3], 0, w.checkpoint(TS - 5, 3), NOW)


def test_old_stick_after_a_log_key_change_is_still_nothing_new() -> None:
    """The stick's checkpoint was signed by the log key of its time, revoked since."""
    w = _world(1)
    old_note = w.checkpoint(TS - 100)
    old = w.size
    w.grant(signer("log-2").public_key, "log", "log-2")
    w.revoke(w.log_seq, reason=4)
    w.log = signer("log-2")
    dev = _synced(w)
    r = dev.apply(BundleSource.parse(messages.make_bundle(0, w.records[:old], old_note)), NOW)
    assert r.nothing_new == old


# --- another ledger -----------------------------------------------------------------


def test_fresh_device_given_another_ledgers_bundle_says_wrong_ledger() -> None:
    w = _world(1)
    other = World(origin="ledger.other.example/site-9")
    dev = Device.create(w.root.public_key, w.origin, now=T0)
    with pytest.raises(WrongLedger) as info:
        dev.apply(BundleSource.parse(other.bundle(0, TS)), NOW)
    assert "ledger.other.example/site-9" in info.value.message and w.origin in info.value.message
    evil = signer("evil")
    g = records.sign(records.Genesis(0, records.EMPTY_HASH, T0, w.origin, evil.public_key, None), evil)
    with pytest.raises(WrongLedger) as info:
        dev.apply(BundleSource.parse(messages.make_bundle(0, [g], w.checkpoint(TS, 1))), NOW)
    assert evil.public_key.hex() in info.value.message and w.root.public_key.hex() in info.value.message
    assert dev.size == 0 and [e.kind for e in dev.evidence] == ["wrong-ledger", "wrong-ledger"]


async def test_fresh_device_pointed_at_another_anchors_server_says_wrong_anchor() -> None:
    w = World()
    log = FakeLog()
    log.publish(w, TS)
    mine = signer("my-root").public_key
    dev = Device.create(mine, w.origin, now=T0)
    with pytest.raises(WrongAnchor) as info:
        await _sync(dev, log)
    assert mine.hex() in info.value.message and w.root.public_key.hex() in info.value.message
    assert dev.size == 0


# --- push: a malformed event is hostile input, never fatal ------------------------------


def test_event_decoder_bounds_depth_and_size_without_recursion() -> None:
    with pytest.raises(BadMessage):
        decode_event_json("[" * 200_000 + "]" * 200_000)
    with pytest.raises(BadMessage):
        decode_event_json(['{"a":', "[" * 50_000])
    with pytest.raises(BadMessage):
        decode_event_json("1" * 100, max_bytes=10)
    with pytest.raises(BadMessage):
        decode_event_json("{not json")
    assert decode_event_json(['{"start": 1,', '"records": ["[[[[[[[[[[[[[["]}']) == {
        "start": 1,
        "records": ["[[[[[[[[[[[[[["],
    }


@pytest.mark.parametrize(
    "payload",
    ["[" * 100_000, '{"start": 0, "records": [1, 2]}', '{"start": -1, "records": []}', "\udcff"],
    ids=["deep-nesting", "records-not-base64", "negative-start", "not-json"],
)
async def test_malformed_sse_event_reconnects_and_recovers(payload: str) -> None:
    """Once, one deeply nested event raised RecursionError out of the client
    and every device behind it went deaf. Now the connection is dropped, the
    error reported, and the next connection delivers."""
    w = World()
    log = HostileEvents(payload)
    log.publish(w, TS)
    dev = Device.create(w.root.public_key, w.origin, now=T0)
    errors: list[Exception] = []
    async with log.client() as client:
        sse = SseSource(client, URL, backoff=(0.01, 0.02), on_error=errors.append)
        gen = sse.updates(lambda: dev.size)
        try:
            up = await asyncio.wait_for(anext(gen), 10)
        finally:
            log.closing = True
            log.notify()
            await gen.aclose()
    assert dev.apply(up, NOW).size == w.size
    assert sse.connections >= 2 and errors and isinstance(errors[0], BadMessage)


class HostileEvents(FakeLog):
    """The first connection gets one malformed ``records`` event; later ones are honest."""

    def __init__(self, payload: str) -> None:
        super().__init__()
        self.payload = payload
        self.hostile = True

    async def _events(self, headers: httpx.Headers) -> AsyncIterator[bytes]:
        if self.hostile:
            self.hostile = False
            yield ("event: records\ndata: " + self.payload + "\n\n").encode("utf-8", "surrogateescape")
            lines = "".join(f"data: {line}\n" for line in self.note.rstrip("\n").split("\n"))
            yield f"event: checkpoint\n{lines}\n".encode()
            return
        async for chunk in super()._events(headers):
            yield chunk
