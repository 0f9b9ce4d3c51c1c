"""The witness (api/witness.py) against c2sp.org/tlog-witness, in process.

Request bodies are written from the spec's text (tests/helpers/witness.py
``spec_body``); each refusal is named after what a misbehaving log tries.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api.witness import (
    MAX_PROOF_LINES,
    Witness,
    WitnessConfig,
    WitnessLimits,
    create_witness_app,
    init_witness_dir,
    logs_from_flags,
)
from api.witness_store import MemoryWitnessStore, SqliteWitnessStore, WitnessStore
from ledger import checkpoints, notes
from ledger.crypto import SeedSigner
from ledger.errors import UsageError, WitnessConflict, WritError

from .helpers.witness import FakeLog, spec_body

ORIGIN = "ledger.example/plant-7"
WNAME = "witness.example/w1"
T0 = 1_800_000_000


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Env:
    def __init__(self, client: httpx.AsyncClient, log: FakeLog, wpub: bytes, store: WitnessStore) -> None:
        self.client = client
        self.log = log
        self.wpub = wpub
        self.store = store

    async def post(self, body: bytes) -> httpx.Response:
        return await self.client.post("/add-checkpoint", content=body)

    async def submit(self, old: int, log: FakeLog | None = None, ts: int = T0) -> httpx.Response:
        lg = log or self.log
        return await self.post(spec_body(old, lg.proof(old), lg.note(ts)))

    def verify(self, note: str, cosig: str) -> int:
        """The witness's cosignature verifies on the note; returns its timestamp."""
        full = notes.add_signatures(note, [cosig])
        vc = checkpoints.verify_checkpoint(
            full, self.log.origin, [self.log.signer.public_key], [(WNAME, self.wpub)], require_witnesses=1
        )
        assert vc.cosigners == (WNAME,)
        parsed = notes.parse_note(full)
        sig = next(s for s in parsed.signatures if s.name == WNAME)
        return int.from_bytes(sig.payload[:8], "big")


async def _env(
    tmp_path: Path,
    store: WitnessStore,
    *,
    logs: list[str] | None = None,
    log: FakeLog | None = None,
    clock: Callable[[], float] | None = None,
    limits: WitnessLimits | None = None,
) -> AsyncIterator[Env]:
    lg = log or FakeLog(ORIGIN)
    data = tmp_path / "w"
    doc = await init_witness_dir(data, WNAME)
    config = WitnessConfig(
        data_dir=data, logs=logs_from_flags(logs or [f"{ORIGIN}={lg.vkey}"]), limits=limits or WitnessLimits()
    )
    app = create_witness_app(config, store=store, clock=clock or Clock())
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://witness.test") as client:
            yield Env(client, lg, bytes.fromhex(doc["witness_public_key"]), store)


@pytest.fixture(params=["memory", "sqlite"])
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    store: WitnessStore
    if request.param == "memory":
        store = MemoryWitnessStore()
    else:
        store = await SqliteWitnessStore.open(tmp_path / "state.db", create=True)
    async for e in _env(tmp_path, store):
        yield e


# --- the happy path ---------------------------------------------------------------


async def test_first_checkpoint_is_cosigned_and_verifies(env: Env) -> None:
    env.log.append(5)
    note = env.log.note(T0)
    r = await env.post(spec_body(0, [], note))
    assert r.status_code == 200, r.text
    lines = r.text.splitlines(keepends=True)
    assert len(lines) == 1 and lines[0].startswith("\u2014 " + WNAME + " ")
    assert env.verify(note, lines[0]) == T0
    assert (await env.store.head(ORIGIN)).size == 5


async def test_growing_log_is_cosigned_with_consistency_proofs(env: Env) -> None:
    old = 0
    for n in (1, 2, 5, 64, 200):
        env.log.append(n)
        r = await env.submit(old)
        assert r.status_code == 200, (old, r.text)
        old = env.log.size
    assert (await env.store.head(ORIGIN)).size == old


async def test_same_tree_is_cosigned_again_with_a_fresh_timestamp(tmp_path: Path) -> None:
    clock = Clock()
    async for env in _env(tmp_path, MemoryWitnessStore(), clock=clock):
        env.log.append(3)
        assert (await env.submit(0)).status_code == 200
        clock.t = T0 + 60
        note = env.log.note(T0 + 60)
        r = await env.post(spec_body(3, [], note))
        assert r.status_code == 200
        assert env.verify(note, r.text) == T0 + 60


async def test_witness_timestamp_never_goes_back_when_its_clock_does(tmp_path: Path) -> None:
    clock = Clock(T0 + 100)
    async for env in _env(tmp_path, MemoryWitnessStore(), clock=clock):
        env.log.append(2)
        assert (await env.submit(0)).status_code == 200
        clock.t = T0  # the witness's clock jumps back
        env.log.append(1)
        note = env.log.note(T0)
        r = await env.post(spec_body(2, env.log.proof(2), note))
        assert r.status_code == 200
        assert env.verify(note, r.text) == T0 + 100


async def test_several_trusted_keys_for_one_origin(tmp_path: Path) -> None:
    """A log key replaced after a theft: the witness trusts the old and the new key."""
    old_key = FakeLog(ORIGIN)
    new_key = FakeLog(ORIGIN)
    async for env in _env(
        tmp_path,
        MemoryWitnessStore(),
        logs=[f"{ORIGIN}={old_key.vkey}", f"{ORIGIN}={new_key.vkey}"],
        log=old_key,
    ):
        old_key.append(4)
        assert (await env.submit(0, old_key)).status_code == 200
        # the same tree, signed by the new key
        new_key.leaves, new_key.levels = old_key.leaves, old_key.levels
        old_key.append(1)
        r = await env.post(spec_body(4, old_key.proof(4), new_key.note(T0)))
        assert r.status_code == 200, r.text


async def test_one_witness_witnesses_several_logs(tmp_path: Path) -> None:
    a, b = FakeLog("a.example/log"), FakeLog("b.example/log")
    async for env in _env(
        tmp_path, MemoryWitnessStore(), logs=[f"{a.origin}={a.vkey}", f"{b.origin}={b.vkey}"]
    ):
        a.append(3)
        b.append(7)
        assert (await env.submit(0, a)).status_code == 200
        assert (await env.submit(0, b)).status_code == 200
        r = await env.client.get("/healthz")
        sizes = {x["origin"]: x["size"] for x in r.json()["logs"]}
        assert sizes == {a.origin: 3, b.origin: 7}


async def test_a_hex_log_key_is_accepted_for_a_writ_log(tmp_path: Path) -> None:
    lg = FakeLog(ORIGIN)
    async for env in _env(
        tmp_path, MemoryWitnessStore(), logs=[f"{ORIGIN}={lg.signer.public_key.hex()}"], log=lg
    ):
        lg.append(1)
        assert (await env.submit(0)).status_code == 200


# --- refusals, in the spec's order -----------------------------------------------------


async def test_unknown_origin_is_refused_404(env: Env) -> None:
    other = FakeLog("other.example/log")
    other.append(2)
    r = await env.post(spec_body(0, [], other.note(T0)))
    assert r.status_code == 404


async def test_checkpoint_signed_by_an_untrusted_key_is_refused_403(env: Env) -> None:
    thief = FakeLog(ORIGIN)  # same origin, another key
    thief.append(2)
    r = await env.post(spec_body(0, [], thief.note(T0)))
    assert r.status_code == 403
    assert (await env.store.head(ORIGIN)).size == 0


async def test_checkpoint_with_a_tampered_log_signature_is_refused_403(env: Env) -> None:
    env.log.append(2)
    note = env.log.note(T0)
    parsed = notes.parse_note(note)
    bad = notes.NoteSignature(parsed.signatures[0].name, parsed.signatures[0].key_id, bytes(64))
    tampered = notes.Note(parsed.body, (bad, *parsed.signatures[1:])).serialize()
    r = await env.post(spec_body(0, [], tampered))
    assert r.status_code == 403


async def test_old_size_above_the_checkpoint_is_refused_400(env: Env) -> None:
    env.log.append(3)
    r = await env.post(spec_body(4, [], env.log.note(T0)))
    assert r.status_code == 400


async def test_wrong_old_size_is_409_with_the_witness_size(env: Env) -> None:
    env.log.append(5)
    assert (await env.submit(0)).status_code == 200
    env.log.append(5)
    for old in (0, 3, 6):
        r = await env.post(spec_body(old, env.log.proof(old), env.log.note(T0)))
        assert r.status_code == 409
        assert r.headers["content-type"] == "text/x.tlog.size"
        assert r.content == b"5\n"


async def test_rollback_to_a_smaller_tree_is_never_cosigned(env: Env) -> None:
    env.log.append(10)
    assert (await env.submit(0)).status_code == 200
    r = await env.post(spec_body(10, [], env.log.note(T0, size=6)))
    assert r.status_code == 400  # old size above the checkpoint's
    r = await env.post(spec_body(6, [], env.log.note(T0, size=6)))
    assert r.status_code == 409 and r.content == b"10\n"


async def test_fork_at_the_cosigned_size_is_refused_409_and_kept(env: Env) -> None:
    env.log.append(4)
    assert (await env.submit(0)).status_code == 200
    forked = env.log.fork(2)
    forked.append(2)
    r = await env.post(spec_body(4, [], forked.note(T0)))
    assert r.status_code == 409
    assert r.headers["content-type"] != "text/x.tlog.size"
    assert r.json()["type"].endswith(":fork")
    assert [e.kind for e in await env.store.evidence(ORIGIN)] == ["fork"]


async def test_forked_history_with_a_bad_proof_is_refused_422_and_kept(env: Env) -> None:
    env.log.append(4)
    assert (await env.submit(0)).status_code == 200
    forked = env.log.fork(2)
    forked.append(5)
    r = await env.post(spec_body(4, forked.proof(4), forked.note(T0)))
    assert r.status_code == 422
    assert (await env.store.head(ORIGIN)).size == 4
    assert [e.kind for e in await env.store.evidence(ORIGIN)] == ["bad-proof"]


async def test_garbage_proof_is_refused_422(env: Env) -> None:
    env.log.append(4)
    assert (await env.submit(0)).status_code == 200
    env.log.append(3)
    proof = env.log.proof(4)
    proof[0] = bytes(32)
    r = await env.post(spec_body(4, proof, env.log.note(T0)))
    assert r.status_code == 422


async def test_a_proof_from_size_zero_is_refused_422(env: Env) -> None:
    env.log.append(4)
    r = await env.post(spec_body(0, [bytes(32)], env.log.note(T0)))
    assert r.status_code == 422


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"old 0\n",  # no empty line, no checkpoint
        b"old 00\n\n",
        b"old -1\n\n",
        b"old 1 \n\n",
        b"new 0\n\n",
        b"old 0\nnot base64!\n\n",
        b"old 0\nAAAA\n\n",  # a hash is 32 bytes
        b"old 0\n\nnot a note\n",
        b"\xff\xfe\n\n",
    ],
)
async def test_malformed_request_is_refused_400(env: Env, body: bytes) -> None:
    env.log.append(1)
    r = await env.post(body if not body.endswith(b"\n\n") else body + env.log.note(T0).encode())
    assert r.status_code == 400, r.text


async def test_more_than_63_proof_lines_are_refused_400(env: Env) -> None:
    env.log.append(2)
    r = await env.post(spec_body(0, [bytes(32)] * (MAX_PROOF_LINES + 1), env.log.note(T0)))
    assert r.status_code == 400


async def test_oversized_request_is_refused_413(env: Env) -> None:
    r = await env.post(b"old 0\n\n" + b"x" * (100 * 1024))
    assert r.status_code == 413


async def test_get_is_not_add_checkpoint(env: Env) -> None:
    r = await env.client.get("/add-checkpoint")
    assert r.status_code == 405


async def test_the_spec_example_request_is_refused_for_its_unknown_key(tmp_path: Path) -> None:
    """The example body of c2sp.org/tlog-witness, verbatim: its origin is known
    here, but not its key, so it is 403 (and 404 for a witness that does not
    witness that origin)."""
    example = (
        "old 20852014\n"
        "PlRNCrwHpqhGrupue0L7gxbjbMiKA9temvuZZDDpkaw=\n"
        "jrJZDmY8Y7SyJE0MWLpLozkIVMSMZcD5kvuKxPC3swk=\n"
        "5+pKlUdi2LeF/BcMHBn+Ku6yhPGNCswZZD1X/6QgPd8=\n"
        "/6WVhPs2CwSsb5rYBH5cjHV/wSmA79abXAwhXw3Kj/0=\n"
        "\n"
        "example.com/behind-the-sofa\n"
        "20852163\n"
        "CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
        "\n"
        "\u2014 example.com/behind-the-sofa Az3grlgtzPICa5OS8npVmf1Myq/5IZniMp+ZJurmRDeOoRDe4URYN7u5/"
        "Zhcyv2q1gGzGku9nTo+zyWE+xeMcTOAYQ8=\n"
        "\u2014 example.com/behind-the-sofa opLqBQsREYCgu6xQkYQwJr9fo45a62DN9EdmHXnZdXNqlcVGlCum2Wks+"
        "49/V6267UEjw6QUXTS5Rovnzv++qbSzm9Q=\n"
    ).encode()
    sofa = FakeLog("example.com/behind-the-sofa")
    async for env in _env(
        tmp_path / "a", MemoryWitnessStore(), logs=[f"{sofa.origin}={sofa.vkey}"], log=sofa
    ):
        assert (await env.post(example)).status_code == 403
    async for env in _env(tmp_path / "b", MemoryWitnessStore()):
        assert (await env.post(example)).status_code == 404


# --- rate limits ---------------------------------------------------------------------


async def test_rate_limit_allows_20_per_second_per_log_then_429(tmp_path: Path) -> None:
    async for env in _env(tmp_path, MemoryWitnessStore(), limits=WitnessLimits(log_rate=20, log_burst=25)):
        env.log.append(1)
        assert (await env.submit(0)).status_code == 200
        codes = [(await env.post(spec_body(1, [], env.log.note(T0)))).status_code for _ in range(40)]
        assert codes[:24] == [200] * 24
        assert 429 in codes


async def test_requests_with_no_trusted_signature_do_not_use_up_the_log_rate(tmp_path: Path) -> None:
    async for env in _env(tmp_path, MemoryWitnessStore(), limits=WitnessLimits(log_rate=20, log_burst=20)):
        thief = FakeLog(ORIGIN)
        thief.append(1)
        for _ in range(50):
            assert (await env.post(spec_body(0, [], thief.note(T0)))).status_code == 403
        env.log.append(1)
        assert (await env.submit(0)).status_code == 200


# --- atomicity -----------------------------------------------------------------------


async def test_concurrent_forks_from_one_size_get_one_cosignature(env: Env) -> None:
    """The race the spec warns about: two requests from the same old size; only one wins."""
    env.log.append(4)
    assert (await env.submit(0)).status_code == 200
    a = env.log.fork(4)
    b = env.log.fork(4)
    a.append(3)
    b.append(3)
    bodies = [spec_body(4, lg.proof(4), lg.note(T0)) for lg in (a, b)] * 5
    rs = await asyncio.gather(*(env.post(body) for body in bodies))
    ok = [body for body, r in zip(bodies, rs, strict=True) if r.status_code == 200]
    assert {body for body in ok} and len({body.split(b"\n\n")[1] for body in ok}) == 1
    assert all(r.status_code in (200, 409) for r in rs)


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_store_compare_and_swap_refuses_a_stale_head(tmp_path: Path, kind: str) -> None:
    from api.witness_store import EMPTY_HEAD, LogHead

    store: WitnessStore = (
        MemoryWitnessStore()
        if kind == "memory"
        else await SqliteWitnessStore.open(tmp_path / "s.db", create=True)
    )
    try:
        h1 = LogHead(3, b"\x01" * 32, T0)
        assert await store.advance(ORIGIN, EMPTY_HEAD, h1) == T0
        with pytest.raises(WitnessConflict) as exc:
            await store.advance(ORIGIN, EMPTY_HEAD, LogHead(3, b"\x02" * 32, T0))
        assert exc.value.size == 3
        # a lower timestamp at the same tree keeps the stored one
        assert await store.advance(ORIGIN, h1, LogHead(3, b"\x01" * 32, T0 - 5)) == T0
        assert await store.head(ORIGIN) == h1
    finally:
        await store.close()


async def test_two_witness_processes_on_one_database_cannot_both_advance(tmp_path: Path) -> None:
    from api.witness_store import EMPTY_HEAD, LogHead

    path = tmp_path / "s.db"
    s1 = await SqliteWitnessStore.open(path, create=True)
    s2 = await SqliteWitnessStore.open(path)
    try:
        await s1.advance(ORIGIN, EMPTY_HEAD, LogHead(5, b"\x01" * 32, T0))
        with pytest.raises(WitnessConflict):
            await s2.advance(ORIGIN, EMPTY_HEAD, LogHead(5, b"\x02" * 32, T0))
    finally:
        await s1.close()
        await s2.close()


class Boom(Exception):
    pass


@pytest.mark.parametrize("step", ["begin", "write", "commit"])
@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_failure_before_commit_stores_nothing_and_signs_nothing(
    tmp_path: Path, kind: str, step: str
) -> None:
    armed = [False]

    def fault(name: str) -> None:
        if armed[0] and name == step:
            armed[0] = False
            raise Boom(name)

    store: WitnessStore
    if kind == "memory":
        store = MemoryWitnessStore(fault=fault)
    else:
        store = await SqliteWitnessStore.open(tmp_path / "s.db", create=True, fault=fault)
    async for env in _env(tmp_path, store):
        env.log.append(3)
        assert (await env.submit(0)).status_code == 200
        env.log.append(2)
        armed[0] = True
        r = await env.submit(3)
        assert r.status_code == 500 and "\u2014" not in r.text
        assert (await store.head(ORIGIN)).size == 3
        r = await env.submit(3)  # the log retries
        assert r.status_code == 200


async def test_failure_after_commit_persists_and_the_retry_is_told_the_new_size(tmp_path: Path) -> None:
    armed = [False]

    def fault(name: str) -> None:
        if armed[0] and name == "committed":
            armed[0] = False
            raise Boom(name)

    store = await SqliteWitnessStore.open(tmp_path / "s.db", create=True, fault=fault)
    async for env in _env(tmp_path, store):
        env.log.append(3)
        armed[0] = True
        r = await env.submit(0)
        assert r.status_code == 500 and "\u2014" not in r.text
        r = await env.submit(0)
        assert r.status_code == 409 and r.content == b"3\n"
        assert (await env.submit(3)).status_code == 200


# --- configuration and the CLI ---------------------------------------------------------


@pytest.mark.parametrize("flag", ["noequals", "=x", f"{ORIGIN}=", f"{ORIGIN}=notavkey", "a\tb=x"])
def test_bad_log_flag_is_a_usage_error(flag: str) -> None:
    with pytest.raises(UsageError):
        logs_from_flags([flag])


def test_log_flags_group_several_keys_by_origin() -> None:
    a, b = SeedSigner.generate(), SeedSigner.generate()
    va = checkpoints.checkpoint_vkeys(ORIGIN, a.public_key)[0]
    vb = checkpoints.checkpoint_vkeys(ORIGIN, b.public_key)[0]
    logs = logs_from_flags([f"{ORIGIN}={va}", f"{ORIGIN}={vb}", f"{ORIGIN}={va}"])
    assert [v.public_key for v in logs[ORIGIN]] == [a.public_key, b.public_key]


async def test_witness_init_refuses_an_existing_witness(tmp_path: Path) -> None:
    from ledger.errors import LedgerExists

    doc = await init_witness_dir(tmp_path / "w", WNAME)
    assert notes.parse_vkey(doc["witness_vkey"]).sig_type == notes.SIG_ED25519_COSIGNATURE
    assert (tmp_path / "w" / "witness.key").stat().st_mode & 0o777 == 0o600
    with pytest.raises(LedgerExists):
        await init_witness_dir(tmp_path / "w", WNAME)


async def test_witness_init_refuses_a_bad_key_name(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        await init_witness_dir(tmp_path / "w", "bad name")
    assert not (tmp_path / "w").exists()


# --- property: whatever logs send, the cosigned trees form one append-only history -------------


#: a step: which of three histories submits, how many leaves it grows by, which old size it claims.
STEP = st.tuples(st.integers(0, 2), st.integers(0, 4), st.sampled_from(["right", "zero", "stale", "own"]))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(STEP, min_size=1, max_size=25))
def test_cosigned_trees_always_form_one_append_only_history(steps: list[tuple[int, int, str]]) -> None:
    """Three forks of one log (same key) submit in any order with any old size:
    every cosignature the witness returns is for a tree consistent with every
    other it returned, it never cosigns two roots of one size, and its stored
    size never goes down."""
    base = FakeLog(ORIGIN)
    base.append(2)
    logs = [base.fork(2) for _ in range(3)]
    w = Witness(
        WNAME, SeedSigner.generate(), logs_from_flags([f"{ORIGIN}={base.vkey}"]), MemoryWitnessStore()
    )
    cosigned: list[tuple[int, bytes, FakeLog]] = []
    known = [0, 0, 0]  # what each submitter believes the witness's size is
    last = 0

    async def run() -> None:
        nonlocal last
        for who, grow, claim in steps:
            lg = logs[who]
            lg.append(grow)
            old = {"right": known[who], "zero": 0, "stale": max(0, known[who] - 1), "own": lg.size}[claim]
            old = min(old, lg.size)
            proof = lg.proof(old) if old <= lg.size else []
            try:
                await w.add_checkpoint(spec_body(old, proof, lg.note(T0)))
            except WitnessConflict as exc:
                known[who] = exc.size
            except WritError:
                pass
            else:
                cosigned.append((lg.size, lg.root(), lg))
                known[who] = lg.size
            size = (await w.store.head(ORIGIN)).size
            assert size >= last
            last = size

    asyncio.run(run())
    roots: dict[int, bytes] = {}
    for size, root, _ in cosigned:
        assert roots.setdefault(size, root) == root
    for s1, r1, _ in cosigned:
        for s2, _, l2 in cosigned:
            if s1 <= s2:
                assert l2.root(s1) == r1
