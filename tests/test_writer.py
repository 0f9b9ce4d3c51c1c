"""ledger.writer: sign on a verified state, push, re-sign once on a stale head,
check back after an uncertain answer, never sign on an unverified state."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from ledger import records
from ledger.crypto import SeedSigner
from ledger.errors import BadSignature, Fork, InvalidField, StaleHead, TransportError, WritError
from ledger.state import LedgerState
from ledger.writer import Builder, Writer

ORIGIN = "writer.test/log"
ROOT = SeedSigner(bytes([1]) * 32)
OTHER = SeedSigner(bytes([2]) * 32)


def grant(state: LedgerState, subject: bytes, name: str, signer: SeedSigner = ROOT) -> bytes:
    t = max(int(time.time()), state.last_time)
    body = records.Grant(state.size, state.root, t, subject, "operator", "", name, 0, 0)
    return records.sign(body, signer)


def name(raw: bytes) -> str:
    body = records.decode_unverified(raw).body
    assert isinstance(body, records.Grant)
    return body.name


class Server:
    """The server's side: the same rules, a head that others may move."""

    def __init__(self) -> None:
        self.state = LedgerState(ROOT.public_key, origin=ORIGIN)
        self.raws: list[bytes] = []
        self.posts = 0
        #: called before a POST is handled (another writer, a lost answer...)
        self.before: list[Any] = []
        self.lose_answer = False

    def append(self, raws: list[bytes]) -> None:
        new = self.state.copy()
        for raw in raws:
            new.apply(raw)
        self.state = new
        self.raws.extend(raws)

    def genesis(self) -> None:
        body = records.Genesis(0, self.state.root, int(time.time()), ORIGIN, ROOT.public_key, None)
        self.append([records.sign(body, ROOT)])

    # the client's face
    shown = "http://server.test"

    def post_records(self, raws: list[bytes]) -> dict[str, Any]:
        self.posts += 1
        if self.before:
            self.before.pop(0)()
        if records.parse(raws[0]).seq != self.state.size:
            raise StaleHead("the head moved", seq=records.parse(raws[0]).seq)
        self.append(raws)
        if self.lose_answer:
            self.lose_answer = False
            raise TransportError("the answer was lost on the way back")
        return {"size": self.state.size, "root": self.state.root.hex()}


class Ledger:
    """A verified local copy: what the writer signs on."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.state = LedgerState(ROOT.public_key, origin=ORIGIN)
        self.raws: list[bytes] = []
        self.syncs = 0
        self.fail_sync: WritError | None = None

    @property
    def size(self) -> int:
        return self.state.size

    def read_records(self, start: int = 0, end: int | None = None) -> list[bytes]:
        return self.raws[start:end]

    def sync(self, client: object) -> None:
        self.syncs += 1
        if self.fail_sync is not None:
            raise self.fail_sync
        new = self.state.copy()
        fetched = self.server.raws[new.size :]
        for raw in fetched:
            new.apply(raw)  # the same rules as everyone: a bad record raises, nothing changes
        self.state = new
        self.raws.extend(fetched)


def world() -> tuple[Server, Ledger, Writer, list[str]]:
    server = Server()
    server.genesis()
    ledger = Ledger(server)
    said: list[str] = []
    return server, ledger, Writer(ledger, server, say=said.append), said


def one_grant(name: str, subject: bytes = bytes([7]) * 32) -> tuple[Builder, list[LedgerState]]:
    seen: list[LedgerState] = []

    def build(state: LedgerState, now: int) -> list[bytes]:
        seen.append(state)
        return [grant(state, subject, name)]

    return build, seen


def test_a_push_signs_on_the_synced_state_and_confirms_the_new_head() -> None:
    server, ledger, writer, _ = world()
    build, seen = one_grant("first")
    pushed = writer.push(build)
    assert seen[0].size == 1  # the genesis was synced and verified before anything was signed
    assert pushed.seqs == [1] and pushed.records == server.raws[1:] and not pushed.retried
    assert pushed.answer == {"size": 2, "root": server.state.root.hex()}
    assert ledger.size == 2 and ledger.state.root == server.state.root  # synced after the push
    assert pushed.posted_at <= pushed.acked_at


def test_a_stale_head_resyncs_and_resigns_once() -> None:
    server, _, writer, said = world()
    server.before.append(lambda: server.append([grant(server.state, bytes([9]) * 32, "intruder")]))
    build, seen = one_grant("mine")
    pushed = writer.push(build)
    assert [s.size for s in seen] == [1, 2]  # re-built on the re-synced head
    assert pushed.retried and pushed.seqs == [2] and server.posts == 2
    assert any("re-synced, signing again" in s for s in said)
    assert name(server.raws[2]) == "mine"


def test_a_head_that_keeps_moving_is_refused_after_one_resign() -> None:
    server, _, writer, _ = world()
    for _ in range(2):
        server.before.append(lambda: server.append([grant(server.state, bytes([9]) * 32, "busy")]))
    with pytest.raises(StaleHead, match="keeps moving"):
        writer.push(one_grant("mine")[0])
    assert server.posts == 2
    assert all(name(r) == "busy" for r in server.raws[1:])


def test_an_answer_lost_after_the_append_is_checked_back_not_resent() -> None:
    server, _, writer, said = world()
    server.lose_answer = True
    pushed = writer.push(one_grant("once")[0])
    assert server.posts == 1 and len(server.raws) == 2  # not sent twice
    assert pushed.records == server.raws[1:] and pushed.answer["size"] == 2
    assert any("answer was lost" in s for s in said)


def test_an_unanswered_push_that_did_not_land_is_an_error() -> None:
    server, _, writer, _ = world()

    def down() -> None:
        raise TransportError("connection refused")

    server.before.append(down)
    with pytest.raises(TransportError):
        writer.push(one_grant("lost")[0])
    assert len(server.raws) == 1


def test_nothing_is_signed_on_an_unverified_state() -> None:
    """A sync that fails verification (a forged record from the server) stops the push
    before the builder runs: nothing is signed, nothing is sent."""
    server, ledger, writer, _ = world()
    server.raws.append(grant(server.state, bytes([5]) * 32, "forged", signer=OTHER))
    build, seen = one_grant("never")
    with pytest.raises(BadSignature):
        writer.push(build)
    assert seen == [] and server.posts == 0 and ledger.size == 0


def test_a_record_the_rules_refuse_is_never_sent() -> None:
    server, _, _, _ = world()
    refused: list[WritError] = []

    def refuse(exc: WritError) -> Any:
        refused.append(exc)
        raise exc

    writer = Writer(Ledger(server), server, refuse=refuse)

    def build(state: LedgerState, now: int) -> list[bytes]:
        return [grant(state, bytes([7]) * 32, "by-a-stranger", signer=OTHER)]

    with pytest.raises(WritError):
        writer.push(build)
    assert server.posts == 0 and refused and refused[0].message.startswith("refusing to sign: ")


def test_a_builder_with_nothing_to_do_pushes_nothing() -> None:
    server, _, writer, _ = world()
    pushed = writer.push(lambda state, now: [])
    assert pushed.records == [] and server.posts == 0 and pushed.answer["size"] == 1


def test_apush_runs_the_same_engine_from_a_thread() -> None:
    server, _, writer, _ = world()
    pushed = asyncio.run(writer.apush(one_grant("async")[0]))
    assert pushed.seqs == [1] and len(server.raws) == 2


def test_confirm_may_refuse_before_anything_is_sent() -> None:
    server, ledger, _, _ = world()

    def no(state: LedgerState, raws: list[bytes]) -> None:
        raise InvalidField("declined")

    writer = Writer(ledger, server, confirm=no)
    with pytest.raises(InvalidField):
        writer.push(one_grant("asked")[0])
    assert server.posts == 0


def test_a_strict_writer_refuses_a_head_other_than_the_one_computed() -> None:
    """A server that answers another root for our records: the CLI warns (the records
    landed), a strict writer (the fleet, which builds on that head) raises."""
    server, ledger, _, said = world()
    real = server.post_records

    def lying(raws: list[bytes]) -> dict[str, Any]:
        answer = real(raws)
        return {**answer, "root": "00" * 32}

    server.post_records = lying  # type: ignore[method-assign]
    Writer(ledger, server, say=said.append).push(one_grant("warned")[0])
    assert any("not the one computed" in s for s in said)
    with pytest.raises(Fork):
        Writer(ledger, server, strict=True).push(one_grant("refused", bytes([8]) * 32)[0])
