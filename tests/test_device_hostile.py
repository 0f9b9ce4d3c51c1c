"""A hostile log against a device (THREATS.md: network attacker, stolen server).

Each attack: the sync raises the right error type, the device's state file is
byte for byte what it was, the in-memory device did not move, evidence is
kept for every verification failure (for a fork or a rollback: both signed
notes), and an honest sync afterwards still works."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from device_sim.device import Device
from device_sim.sources import MAX_CHECKPOINT, MAX_ENTRY_BUNDLE, HttpSource, sync
from ledger import messages, tiles
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
    WrongOrigin,
)
from tests.device_fixtures import T0, FakeLog, World, free_port, signer

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
