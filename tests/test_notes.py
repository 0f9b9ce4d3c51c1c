"""C2SP signed notes, checkpoints and cosignatures (ledger/notes.py, ledger/checkpoints.py)."""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tlog_scales.signing import (
    Ed25519CosignatureVerifier,
    PlainEd25519Signer,
    PlainEd25519Verifier,
    Vkey,
)
from tlog_scales.tlog import Checkpoint as ScalesCheckpoint

from ledger.checkpoints import (
    Checkpoint,
    checkpoint_verifiers,
    checkpoint_vkeys,
    cosign,
    parse_checkpoint_body,
    sign_checkpoint,
    verify_checkpoint,
)
from ledger.crypto import SeedSigner
from ledger.errors import (
    BadNote,
    MissingCosignatures,
    UntrustedCheckpoint,
    WritError,
    WrongOrigin,
)
from ledger.notes import (
    MAX_SIGNATURES,
    SIG_ED25519,
    SIG_ED25519_COSIGNATURE,
    Note,
    NoteSignature,
    Verifier,
    add_signatures,
    key_id,
    parse_note,
    parse_signature_line,
    parse_vkey,
    sign_note,
    verify_note,
    vkey,
)

VECTORS = Path(__file__).parent / "vectors"
NOTE_VECTORS: dict[str, Any] = json.loads((VECTORS / "signed-note.json").read_text())
LEDGER: dict[str, Any] = json.loads((VECTORS / "ledger-v1.json").read_text())

ORIGIN: str = LEDGER["origin"]
CP_VEC: dict[str, Any] = LEDGER["checkpoint"]
CP_NOTE: str = CP_VEC["note"]
CP_TIME: int = CP_VEC["timestamp"]
LOG = SeedSigner(bytes.fromhex(LEDGER["keys"]["log"]["seed"]))
LOG_PUB = bytes.fromhex(LEDGER["keys"]["log"]["public"])
FINAL = Checkpoint(ORIGIN, LEDGER["final"]["size"], bytes.fromhex(LEDGER["final"]["root"]))
OTHER = SeedSigner(bytes(range(32)))  # a key nobody granted
NEXT_LOG = SeedSigner(bytes(range(1, 33)))
W1 = SeedSigner(bytes([7]) * 32)
W2 = SeedSigner(bytes([8]) * 32)


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def signer_from_skey(skey: str) -> tuple[str, SeedSigner]:
    """Go's PRIVATE+KEY+<name>+<hash>+base64(0x01 || seed) signer key format (test only)."""
    priv, key, name, hash16, key64 = skey.split("+", 4)
    assert (priv, key) == ("PRIVATE", "KEY")
    raw = base64.b64decode(key64)
    assert raw[0] == SIG_ED25519 and len(raw) == 33
    signer = SeedSigner(raw[1:])
    assert key_id(name, SIG_ED25519, signer.public_key).hex() == hash16
    return name, signer


# --- signed-note vectors -----------------------------------------------------

NOTE_CASES = NOTE_VECTORS["cases"]


@pytest.mark.parametrize("case", NOTE_CASES, ids=[c["vkey"].split("+")[0] for c in NOTE_CASES])
def test_vector_note_verifies_under_its_vkey(case: dict[str, Any]) -> None:
    v = parse_vkey(case["vkey"])
    assert v.vkey() == case["vkey"]
    assert vkey(v.name, v.sig_type, v.public_key) == case["vkey"]
    note = parse_note(case["note"])
    assert note.serialize() == case["note"]
    assert parse_note(case["note"].encode()) == note
    got = verify_note(note, [v])
    assert [(g.verifier, g.signature.name, g.timestamp) for g in got] == [(v, v.name, None)]


@pytest.mark.parametrize("case", [c for c in NOTE_CASES if "other_vkey" in c], ids=lambda c: c["vkey"][:12])
def test_vector_note_verifies_under_other_vkey_too(case: dict[str, Any]) -> None:
    v, other = parse_vkey(case["vkey"]), parse_vkey(case["other_vkey"])
    note = parse_note(case["note"])
    assert [g.verifier for g in verify_note(note, [other])] == [other]
    assert [g.verifier for g in verify_note(note, [other, v])] == [v, other]  # note order


@pytest.mark.parametrize("case", NOTE_CASES, ids=[c["vkey"].split("+")[0] for c in NOTE_CASES])
def test_vector_note_refused_by_another_key(case: dict[str, Any]) -> None:
    v = parse_vkey(case["vkey"])
    note = parse_note(case["note"])
    # same name, another key: its key ID differs, so the signature is unknown: ignored, none left
    stranger = Verifier.create(v.name, SIG_ED25519, OTHER.public_key)
    with pytest.raises(BadNote, match="no known key"):
        verify_note(note, [stranger])
    with pytest.raises(BadNote, match="no known key"):
        verify_note(note, [])
    # the right key, but the text was altered: a known key's signature fails -> the note is refused
    forged = Note("Something else.\n", note.signatures)
    with pytest.raises(BadNote, match="does not verify"):
        verify_note(forged, [v])


@pytest.mark.parametrize("case", [c for c in NOTE_CASES if "skey" in c], ids=lambda c: c["vkey"][:12])
def test_signing_with_skey_reproduces_vector_signature(case: dict[str, Any]) -> None:
    name, signer = signer_from_skey(case["skey"])
    assert vkey(name, SIG_ED25519, signer.public_key) == case["vkey"]
    note = parse_note(case["note"])
    ours = sign_note(note.body, [(name, signer)])
    mine = [s for s in note.signatures if s.name == name]
    assert ours == note.body + "\n" + mine[0].line()
    assert case["note"].startswith(ours)


@pytest.mark.parametrize("bad", NOTE_VECTORS["bad_vkeys"])
def test_vector_bad_vkeys_refused(bad: str) -> None:
    with pytest.raises(BadNote):
        parse_vkey(bad)


def _vk(name: str, type_and_key: bytes, kid: str | None = None) -> str:
    from ledger.crypto import sha256

    h = kid if kid is not None else sha256(name.encode() + b"\n" + type_and_key)[:4].hex()
    return f"{name}+{h}+{b64(type_and_key)}"


BAD_VKEYS = {
    "wrong-key-id": _vk("example.com/a", b"\x01" + LOG_PUB, kid="00000000"),
    "key-id-of-other-type": _vk(
        "example.com/a", b"\x01" + LOG_PUB, kid=key_id("example.com/a", 4, LOG_PUB).hex()
    ),
    "short-key-id": _vk("example.com/a", b"\x01" + LOG_PUB, kid="0000000"),
    "non-hex-key-id": _vk("example.com/a", b"\x01" + LOG_PUB, kid="0000000g"),
    "key-too-long": _vk("example.com/a", b"\x01" + LOG_PUB + b"\x00"),
    "key-too-short": _vk("example.com/a", b"\x01" + LOG_PUB[:31]),
    "ecdsa-type-0x02": _vk("example.com/a", b"\x02" + LOG_PUB),
    "mldsa-type-0x06": _vk("example.com/a", b"\x06" + LOG_PUB),
    "type-only": _vk("example.com/a", b"\x01"),
    "empty-name": _vk("", b"\x01" + LOG_PUB),
    "name-with-space": _vk("example.com a", b"\x01" + LOG_PUB),
    "name-with-nbsp": _vk("example.com\u00a0a", b"\x01" + LOG_PUB),
    "name-with-tab": _vk("example.com\ta", b"\x01" + LOG_PUB),
    "name-with-del": _vk("example.com\x7fa", b"\x01" + LOG_PUB),
    "missing-key": "example.com/a+61dba5ec",
    "empty-key": "example.com/a+61dba5ec+",
    "not-base64": "example.com/a+61dba5ec+!!!!",
    "truncated-base64": _vk("example.com/a", b"\x01" + LOG_PUB)[:-1],
    "padded-base64-of-short-key": _vk("example.com/a", b"\x01" + LOG_PUB[:30]),
    "urlsafe-base64": "example.com/a+"
    + key_id("example.com/a", 1, bytes([0xFB]) * 32).hex()
    + "+"
    + b64(b"\x01" + bytes([0xFB]) * 32).replace("+", "-").replace("/", "_"),
    "trailing-newline": _vk("example.com/a", b"\x01" + LOG_PUB) + "\n",
    "surrogate-name": _vk("ok", b"\x01" + LOG_PUB).replace("ok", "o\udc80", 1),
}


@pytest.mark.parametrize("bad", BAD_VKEYS.values(), ids=BAD_VKEYS.keys())
def test_malformed_vkeys_refused(bad: str) -> None:
    with pytest.raises(BadNote):
        parse_vkey(bad)


def test_verifier_values_are_checked() -> None:
    good = Verifier.create("a.example/w", SIG_ED25519_COSIGNATURE, W1.public_key)
    assert parse_vkey(good.vkey()) == good
    with pytest.raises(BadNote):
        replace(good, key_id=b"\x00" * 4)
    with pytest.raises(BadNote):
        replace(good, sig_type=SIG_ED25519)  # the key ID is bound to the type
    with pytest.raises(BadNote):
        Verifier.create("a.example/w", 0x02, W1.public_key)
    with pytest.raises(BadNote):
        vkey("a+b", SIG_ED25519, W1.public_key)


# --- the Writ checkpoint vector ---------------------------------------------


def test_checkpoint_vkeys_match_vector() -> None:
    assert checkpoint_vkeys(ORIGIN, LOG_PUB) == (CP_VEC["log_vkey"], CP_VEC["cosig_vkey"])
    plain, cosig = checkpoint_verifiers(ORIGIN, LOG_PUB)
    assert parse_vkey(CP_VEC["log_vkey"]) == plain
    assert parse_vkey(CP_VEC["cosig_vkey"]) == cosig
    assert key_id(ORIGIN, SIG_ED25519, LOG_PUB).hex() == CP_VEC["log_vkey"].split("+")[1]


def test_sign_checkpoint_reproduces_vector_byte_for_byte() -> None:
    assert FINAL.body() == f"{ORIGIN}\n10\n{LEDGER['final']['root_b64']}\n"
    assert sign_checkpoint(FINAL, ORIGIN, LOG, CP_TIME) == CP_NOTE


@pytest.mark.parametrize("form", ["str", "bytes"])
def test_verify_checkpoint_vector(form: str) -> None:
    text: str | bytes = CP_NOTE if form == "str" else CP_NOTE.encode()
    got = verify_checkpoint(text, ORIGIN, [LOG_PUB])
    assert got.checkpoint == FINAL
    assert got.log_key == LOG_PUB
    assert got.timestamp == CP_TIME == 1767233000
    assert got.cosigners == ()
    assert got.note == CP_NOTE


def test_generic_verify_note_reads_cosignature_timestamp() -> None:
    plain, cosig = checkpoint_verifiers(ORIGIN, LOG_PUB)
    got = verify_note(parse_note(CP_NOTE), [cosig, plain])
    assert [(g.verifier.sig_type, g.timestamp) for g in got] == [(1, None), (4, CP_TIME)]


def test_checkpoint_body_round_trip_with_extensions() -> None:
    cp = Checkpoint(ORIGIN, 0, bytes(32), ("ext one", "— ext two"))
    assert cp.body() == f"{ORIGIN}\n0\n{b64(bytes(32))}\next one\n— ext two\n"
    assert parse_checkpoint_body(cp.body()) == cp
    note = sign_checkpoint(cp, ORIGIN, LOG, 5)
    got = verify_checkpoint(note, ORIGIN, [LOG_PUB])
    assert got.checkpoint == cp and got.timestamp == 5


@pytest.mark.parametrize(
    "kwargs",
    [
        {"origin": ""},
        {"origin": "a\nb"},
        {"origin": "a\rb"},
        {"size": -1},
        {"size": 1 << 63},
        {"size": True},
        {"root": bytes(31)},
        {"root": bytes(33)},
        {"extensions": ("",)},
        {"extensions": ("a\nb",)},
    ],
    ids=lambda k: f"{next(iter(k))}={next(iter(k.values()))!r}",
)
def test_invalid_checkpoint_values_refused(kwargs: dict[str, Any]) -> None:
    fields: dict[str, Any] = {"origin": ORIGIN, "size": 1, "root": bytes(32)} | kwargs
    with pytest.raises(BadNote):
        Checkpoint(**fields)


def test_sign_checkpoint_refuses_bad_timestamp_and_key_name() -> None:
    with pytest.raises(BadNote):
        sign_checkpoint(FINAL, ORIGIN, LOG, -1)
    with pytest.raises(BadNote):
        sign_checkpoint(FINAL, ORIGIN, LOG, 1 << 63)
    with pytest.raises(BadNote):
        sign_checkpoint(FINAL, "bad name", LOG, 1)
    assert verify_checkpoint(sign_checkpoint(FINAL, ORIGIN, LOG, (1 << 63) - 1), ORIGIN, [LOG_PUB]).timestamp


# --- negative cases, named after the attack ----------------------------------


def _lines(note: str) -> tuple[str, list[str]]:
    body, _, sigs = note.rpartition("\n\n")
    return body + "\n", sigs.splitlines(keepends=True)


def _signed_body(body: str) -> str:
    """A note whose body is ``body``, correctly signed by the log (0x01): only the parser can refuse it.

    Built by hand, so that no check of our signing side stands in the way.
    """
    sig = LOG.sign(body.encode())
    return body + "\n— " + ORIGIN + " " + b64(key_id(ORIGIN, SIG_ED25519, LOG_PUB) + sig) + "\n"


def _retimestamp(note: str, delta: int) -> str:
    n = parse_note(note)
    sigs = tuple(
        NoteSignature(
            s.name,
            s.key_id,
            (int.from_bytes(s.payload[:8], "big") + delta).to_bytes(8, "big") + s.payload[8:],
        )
        if len(s.payload) == 72
        else s
        for s in n.signatures
    )
    return Note(n.body, sigs).serialize()


ROOT_B64 = LEDGER["final"]["root_b64"]
OTHER_ROOT_B64 = b64(bytes(32))
PLAIN_LINE, COSIG_LINE = _lines(CP_NOTE)[1]
UNKNOWN_LINE = "— example.com/unknown " + b64(b"\x00\x00\x00\x01" + bytes(64)) + "\n"


@dataclass(frozen=True)
class Attack:
    note: str | bytes
    error: type[WritError]
    origin: str = ORIGIN
    witnesses: tuple[tuple[str, bytes], ...] = ()
    require: int = 0


ATTACKS: dict[str, Callable[[], Attack]] = {
    "wrong-origin": lambda: Attack(CP_NOTE, WrongOrigin, origin="ledger.example/plant-8"),
    "other-logs-checkpoint": lambda: Attack(
        sign_checkpoint(replace(FINAL, origin="ledger.example/plant-8"), "ledger.example/plant-8", LOG, 1),
        WrongOrigin,
    ),
    "origin-prefix": lambda: Attack(CP_NOTE, WrongOrigin, origin=ORIGIN + "x"),
    "root-swapped": lambda: Attack(CP_NOTE.replace(ROOT_B64, OTHER_ROOT_B64), UntrustedCheckpoint),
    "size-changed": lambda: Attack(CP_NOTE.replace("\n10\n", "\n11\n", 1), UntrustedCheckpoint),
    "size-rolled-back": lambda: Attack(CP_NOTE.replace("\n10\n", "\n9\n", 1), UntrustedCheckpoint),
    "extension-line-injected": lambda: Attack(
        CP_NOTE.replace(ROOT_B64 + "\n", ROOT_B64 + "\nevil\n", 1), UntrustedCheckpoint
    ),
    "signed-by-ungranted-key": lambda: Attack(
        sign_checkpoint(FINAL, ORIGIN, OTHER, CP_TIME), UntrustedCheckpoint
    ),
    "ungranted-key-line-alongside-garbled-log-line": lambda: Attack(
        add_signatures(
            sign_checkpoint(FINAL, ORIGIN, OTHER, CP_TIME),
            [PLAIN_LINE.replace(PLAIN_LINE[-10:-2], "AAAAAAAA")],
        ),
        UntrustedCheckpoint,
    ),
    "cosignature-timestamp-altered": lambda: Attack(_retimestamp(CP_NOTE, +3600), UntrustedCheckpoint),
    "cosignature-timestamp-rewound": lambda: Attack(_retimestamp(CP_NOTE, -3600), UntrustedCheckpoint),
    "cosignature-only-no-plain-signature": lambda: Attack(
        _lines(CP_NOTE)[0] + "\n" + COSIG_LINE, UntrustedCheckpoint
    ),
    "plain-signature-moved-to-cosignature-key-id": lambda: Attack(
        _lines(CP_NOTE)[0]
        + "\n"
        + NoteSignature(
            ORIGIN, key_id(ORIGIN, 4, LOG_PUB), parse_signature_line(PLAIN_LINE[:-1]).payload
        ).line(),
        UntrustedCheckpoint,
    ),
    "signature-truncated": lambda: Attack(
        _lines(CP_NOTE)[0] + "\n" + NoteSignature(ORIGIN, key_id(ORIGIN, 1, LOG_PUB), bytes(63)).line(),
        UntrustedCheckpoint,
    ),
    "only-unknown-signatures": lambda: Attack(_lines(CP_NOTE)[0] + "\n" + UNKNOWN_LINE, UntrustedCheckpoint),
    "corrupted-witness-cosignature": lambda: Attack(
        add_signatures(CP_NOTE, [cosign(FINAL, "w1.example", W1, CP_TIME + 1).replace("A", "B", 1)]),
        UntrustedCheckpoint,
        witnesses=(("w1.example", W1.public_key),),
    ),
    "witness-cosigned-other-root": lambda: Attack(
        add_signatures(CP_NOTE, [cosign(replace(FINAL, root=bytes(32)), "w1.example", W1, CP_TIME)]),
        UntrustedCheckpoint,
        witnesses=(("w1.example", W1.public_key),),
    ),
    "missing-witness-cosignatures": lambda: Attack(
        add_signatures(CP_NOTE, [cosign(FINAL, "w1.example", W1, CP_TIME)]),
        MissingCosignatures,
        witnesses=(("w1.example", W1.public_key), ("w2.example", W2.public_key)),
        require=2,
    ),
    "one-witness-key-under-two-names": lambda: Attack(
        add_signatures(
            CP_NOTE,
            [
                cosign(FINAL, "w1.example", W1, CP_TIME),
                NoteSignature(
                    "w2.example",
                    key_id("w2.example", 4, W1.public_key),
                    parse_signature_line(cosign(FINAL, "w1.example", W1, CP_TIME)[:-1]).payload,
                ).line(),
            ],
        ),
        MissingCosignatures,
        witnesses=(("w1.example", W1.public_key), ("w2.example", W1.public_key)),
        require=2,
    ),
    "log-posing-as-witness": lambda: Attack(
        add_signatures(CP_NOTE, [cosign(FINAL, "w1.example", LOG, CP_TIME)]),
        MissingCosignatures,
        witnesses=(("w1.example", LOG_PUB),),
        require=1,
    ),
    "missing-blank-line": lambda: Attack(CP_NOTE.replace("\n\n", "\n", 1), BadNote),
    "extra-blank-line-between-signatures": lambda: Attack(
        CP_NOTE.replace(COSIG_LINE, "\n" + COSIG_LINE), BadNote
    ),
    "trailing-garbage": lambda: Attack(CP_NOTE + "garbage", BadNote),
    "trailing-blank-line": lambda: Attack(CP_NOTE + "\n", BadNote),
    "trailing-garbage-line": lambda: Attack(CP_NOTE + "garbage\n", BadNote),
    "missing-trailing-newline": lambda: Attack(CP_NOTE[:-1], BadNote),
    "no-signatures": lambda: Attack(_lines(CP_NOTE)[0] + "\n", BadNote),
    "non-utf8": lambda: Attack(CP_NOTE.encode().replace(b"ledger", b"l\xffdger", 1), BadNote),
    "overlong-utf8-newline": lambda: Attack(CP_NOTE.encode().replace(b"\n10\n", b"\xc0\x8a10\n", 1), BadNote),
    "encoded-surrogate": lambda: Attack(CP_NOTE.encode().replace(b"ledger", b"\xed\xa0\x80", 1), BadNote),
    "lone-surrogate-str": lambda: Attack(CP_NOTE.replace("ledger", "\ud800", 1), BadNote),
    "duplicate-signature-lines": lambda: Attack(CP_NOTE + PLAIN_LINE, BadNote),
    "duplicate-cosignature-with-other-timestamp": lambda: Attack(
        CP_NOTE + _lines(sign_checkpoint(FINAL, ORIGIN, LOG, CP_TIME + 99))[1][1], BadNote
    ),
    "too-many-signatures": lambda: Attack(
        CP_NOTE
        + "".join(
            "— example.com/u" + str(i) + " " + b64(i.to_bytes(4, "big") + bytes(64)) + "\n"
            for i in range(MAX_SIGNATURES - 1)
        ),
        BadNote,
    ),
    "carriage-return": lambda: Attack(CP_NOTE.replace("\n", "\r\n"), BadNote),
    "nul-in-body": lambda: Attack(CP_NOTE.replace("plant-7", "plant-7\x00", 1), BadNote),
    "tab-in-signature-line": lambda: Attack(CP_NOTE.replace("— ", "—\t", 1), BadNote),
    "escape-in-body": lambda: Attack(_signed_body(f"{ORIGIN}\n10\n{ROOT_B64}\n\x1b[2J\n"), BadNote),
    "hyphen-instead-of-em-dash": lambda: Attack(CP_NOTE.replace("—", "-"), BadNote),
    "en-dash-instead-of-em-dash": lambda: Attack(CP_NOTE.replace("—", "\u2013"), BadNote),
    "two-spaces-after-dash": lambda: Attack(CP_NOTE.replace("— ", "—  "), BadNote),
    "non-canonical-base64-signature": lambda: Attack(
        CP_NOTE.replace(PLAIN_LINE, PLAIN_LINE[:-3] + chr(ord(PLAIN_LINE[-3]) + 1) + "=\n"), BadNote
    ),
    "unpadded-signature": lambda: Attack(CP_NOTE.replace("=\n", "\n"), BadNote),
    "key-id-only-signature": lambda: Attack(CP_NOTE + "— example.com/x AAAAAA==\n", BadNote),
    "leading-zero-size": lambda: Attack(_signed_body(f"{ORIGIN}\n010\n{ROOT_B64}\n"), BadNote),
    "zero-padded-empty-size": lambda: Attack(_signed_body(f"{ORIGIN}\n00\n{ROOT_B64}\n"), BadNote),
    "negative-size": lambda: Attack(_signed_body(f"{ORIGIN}\n-1\n{ROOT_B64}\n"), BadNote),
    "plus-signed-size": lambda: Attack(_signed_body(f"{ORIGIN}\n+10\n{ROOT_B64}\n"), BadNote),
    "space-padded-size": lambda: Attack(_signed_body(f"{ORIGIN}\n 10\n{ROOT_B64}\n"), BadNote),
    "underscore-size": lambda: Attack(_signed_body(f"{ORIGIN}\n1_0\n{ROOT_B64}\n"), BadNote),
    "fullwidth-digit-size": lambda: Attack(_signed_body(f"{ORIGIN}\n\uff11\uff10\n{ROOT_B64}\n"), BadNote),
    "hex-size": lambda: Attack(_signed_body(f"{ORIGIN}\n0xa\n{ROOT_B64}\n"), BadNote),
    "huge-size": lambda: Attack(_signed_body(f"{ORIGIN}\n{1 << 63}\n{ROOT_B64}\n"), BadNote),
    "thousands-of-digits-size": lambda: Attack(
        _signed_body(f"{ORIGIN}\n{'9' * 5000}\n{ROOT_B64}\n"), BadNote
    ),
    "root-of-wrong-length": lambda: Attack(_signed_body(f"{ORIGIN}\n10\n{b64(bytes(31))}\n"), BadNote),
    "root-too-long": lambda: Attack(_signed_body(f"{ORIGIN}\n10\n{b64(bytes(33))}\n"), BadNote),
    "root-in-hex": lambda: Attack(_signed_body(f"{ORIGIN}\n10\n{LEDGER['final']['root']}\n"), BadNote),
    "root-non-canonical-base64": lambda: Attack(
        _signed_body(f"{ORIGIN}\n10\n{ROOT_B64[:-2]}{chr(ord(ROOT_B64[-2]) + 1)}=\n"), BadNote
    ),
    "missing-root-line": lambda: Attack(_signed_body(f"{ORIGIN}\n10\n"), BadNote),
    "empty-extension-line": lambda: Attack(_signed_body(f"{ORIGIN}\n10\n{ROOT_B64}\n\nx\n"), BadNote),
    "empty-origin": lambda: Attack(_signed_body(f"\n10\n{ROOT_B64}\n"), BadNote),
}


@pytest.mark.parametrize("attack", ATTACKS.values(), ids=ATTACKS.keys())
def test_checkpoint_attack_refused(attack: Callable[[], Attack]) -> None:
    a = attack()
    with pytest.raises(a.error):
        verify_checkpoint(a.note, a.origin, [LOG_PUB], a.witnesses, a.require)


def test_note_text_may_hold_blank_lines_but_checkpoint_text_may_not() -> None:
    # signed-note: the text ends at the *last* blank line; tlog-checkpoint: no empty line.
    body = f"{ORIGIN}\n10\n{ROOT_B64}\n\nx\n"
    assert parse_note(_signed_body(body)).body == body
    with pytest.raises(BadNote):
        parse_checkpoint_body(body)


def test_timestamp_not_reported_when_only_plain_signature() -> None:
    note = _lines(CP_NOTE)[0] + "\n" + PLAIN_LINE
    got = verify_checkpoint(note, ORIGIN, [LOG_PUB])
    assert got.timestamp is None and got.checkpoint == FINAL


def test_unknown_signatures_ignored_and_sixteen_accepted() -> None:
    extra = [
        "— example.com/u" + str(i) + " " + b64(i.to_bytes(4, "big") + bytes(64)) + "\n" for i in range(14)
    ]
    note = CP_NOTE + "".join(extra)
    assert len(parse_note(note).signatures) == 16
    assert verify_checkpoint(note, ORIGIN, [LOG_PUB]).timestamp == CP_TIME
    # the limit itself is accepted
    full = CP_NOTE + "".join(
        "— example.com/u" + str(i) + " " + b64(i.to_bytes(4, "big") + bytes(64)) + "\n"
        for i in range(MAX_SIGNATURES - 2)
    )
    assert len(parse_note(full).signatures) == MAX_SIGNATURES


def test_log_key_rotation_timestamp_from_the_same_key() -> None:
    # old key's 0x01 + new key's 0x01 and 0x04: accepted under either trust set,
    # and the timestamp is only ever the one of the key whose 0x01 is reported.
    old_plain = _lines(CP_NOTE)[1][0]
    both = add_signatures(sign_checkpoint(FINAL, ORIGIN, NEXT_LOG, CP_TIME + 5), [old_plain])
    got = verify_checkpoint(both, ORIGIN, [LOG_PUB])
    assert (got.log_key, got.timestamp) == (LOG_PUB, None)
    got = verify_checkpoint(both, ORIGIN, [NEXT_LOG.public_key, LOG_PUB])
    assert (got.log_key, got.timestamp) == (NEXT_LOG.public_key, CP_TIME + 5)


def test_witness_cosignatures_counted() -> None:
    lines = [cosign(FINAL, "w1.example", W1, CP_TIME + 1), cosign(FINAL, "w2.example", W2, CP_TIME + 2)]
    note = add_signatures(CP_NOTE, [*lines, UNKNOWN_LINE])
    witnesses = (
        ("w1.example", W1.public_key),
        ("w2.example", W2.public_key),
        ("w3.example", OTHER.public_key),
    )
    got = verify_checkpoint(note, ORIGIN, [LOG_PUB], witnesses, require_witnesses=2)
    assert got.cosigners == ("w1.example", "w2.example")
    assert got.timestamp == CP_TIME and got.note == note
    # witnesses not configured: their lines are unknown and ignored
    assert verify_checkpoint(note, ORIGIN, [LOG_PUB]).cosigners == ()


@pytest.mark.parametrize("name", ["", "witness one", "a+b", "tab\there"])
def test_a_witness_grant_whose_name_cannot_be_a_key_name_is_ignored(name: str) -> None:
    """A grant name may hold spaces or '+'; a note key name may not. Such a witness
    can sign nothing verifiable, so it is ignored: it must never make every
    checkpoint of the ledger unacceptable (a denial of service by one grant)."""
    witnesses = ((name, W1.public_key), ("w2.example", W2.public_key))
    note = add_signatures(CP_NOTE, [cosign(FINAL, "w2.example", W2, CP_TIME + 1)])
    got = verify_checkpoint(note, ORIGIN, [LOG_PUB], witnesses, require_witnesses=1)
    assert got.cosigners == ("w2.example",) and got.timestamp == CP_TIME


def test_cosign_line_shape() -> None:
    line = cosign(FINAL, "w1.example", W1, 1679315147)
    assert line.startswith("— w1.example ") and line.endswith("\n")
    sig = parse_signature_line(line[:-1])
    assert sig.key_id == key_id("w1.example", SIG_ED25519_COSIGNATURE, W1.public_key)
    assert sig.payload[:8] == (1679315147).to_bytes(8, "big") and len(sig.payload) == 72


def test_add_signatures_replaces_same_key_and_refuses_garbage() -> None:
    first = add_signatures(CP_NOTE, [cosign(FINAL, "w1.example", W1, 1)])
    again = add_signatures(first, [cosign(FINAL, "w1.example", W1, 2).rstrip("\n")])
    assert again.count("— w1.example ") == 1
    got = verify_checkpoint(again, ORIGIN, [LOG_PUB], [("w1.example", W1.public_key)], 1)
    assert got.cosigners == ("w1.example",)
    assert add_signatures(CP_NOTE, []) == CP_NOTE
    for bad in ["garbage", "— w1.example", "— w1.example !!!", "— a b\n— c d", PLAIN_LINE + PLAIN_LINE]:
        with pytest.raises(BadNote):
            add_signatures(CP_NOTE, [bad])
    with pytest.raises(BadNote):
        add_signatures(CP_NOTE, [UNKNOWN_LINE, UNKNOWN_LINE])


def test_sign_note_refuses_bad_input() -> None:
    for body in ["no newline", "bad\x00\n", "bad\r\n"]:
        with pytest.raises(BadNote):
            sign_note(body, [("a", LOG)])
    with pytest.raises(BadNote):
        sign_note("ok\n", [])
    with pytest.raises(BadNote):
        sign_note("ok\n", [("bad name", LOG)])
    with pytest.raises(BadNote):
        sign_note("x" * (1 << 20) + "\n", [("a", LOG)])


def test_oversized_note_refused() -> None:
    huge = "x" * (1 << 20) + "\n\n" + PLAIN_LINE
    with pytest.raises(BadNote):
        parse_note(huge)
    with pytest.raises(BadNote):
        parse_note(huge.encode())
    with pytest.raises(BadNote):
        parse_note("\u20ac" * 400_000 + "\n\n" + PLAIN_LINE)  # under 1 Mi characters, over 1 MiB


# --- interoperability with tlog-scales, an independent C2SP implementation ----


def test_tlog_scales_accepts_our_vkeys_and_signatures() -> None:
    plain_vk, cosig_vk = (Vkey.from_string(v) for v in checkpoint_vkeys(ORIGIN, LOG_PUB))
    serialized = tuple(v.serialize() for v in (plain_vk, cosig_vk))  # type: ignore[no-untyped-call]
    assert serialized == checkpoint_vkeys(ORIGIN, LOG_PUB)
    assert isinstance(plain_vk.get_verifier(), PlainEd25519Verifier)
    assert isinstance(cosig_vk.get_verifier(), Ed25519CosignatureVerifier)

    witness_vk = Vkey.from_string(vkey("w1.example", SIG_ED25519_COSIGNATURE, W1.public_key))
    note = add_signatures(
        sign_checkpoint(FINAL, ORIGIN, LOG, CP_TIME), [cosign(FINAL, "w1.example", W1, CP_TIME + 7)]
    )
    cp = ScalesCheckpoint.from_text(note)
    assert (cp.origin, cp.size, cp.root_hash) == (FINAL.origin, FINAL.size, FINAL.root)
    assert cp.serialize() == note
    for vk in (plain_vk, cosig_vk, witness_vk):
        cp.verify(vk)  # raises on failure
    stamps = [Ed25519CosignatureVerifier.get_timestamp(s.payload) for s in cp.signatures[1:]]
    assert stamps == [CP_TIME, CP_TIME + 7]


def test_we_accept_tlog_scales_signed_checkpoint() -> None:
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(LEDGER["keys"]["log"]["seed"]))
    text = ScalesCheckpoint.make_signed(
        ORIGIN, FINAL.size, FINAL.root, [PlainEd25519Signer(ORIGIN, key)]
    ).serialize()
    got = verify_checkpoint(text, ORIGIN, [LOG_PUB])
    assert got.checkpoint == FINAL and got.timestamp is None
    assert text == _lines(CP_NOTE)[0] + "\n" + PLAIN_LINE  # Ed25519 is deterministic: same bytes as ours


# --- properties -------------------------------------------------------------

_fragments = st.sampled_from(
    [
        "\n",
        "\n\n",
        "— ",
        "—",
        " ",
        "+",
        "=",
        "A",
        "0",
        "10",
        ORIGIN,
        ROOT_B64,
        PLAIN_LINE,
        COSIG_LINE,
        "\x00",
        "é",
    ]
)
note_like = st.lists(_fragments | st.text(max_size=8), max_size=24).map("".join)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(st.text(), st.binary(), note_like, note_like.map(lambda s: s.encode("utf-8", "surrogatepass")))
)
def test_parsers_raise_only_writ_errors(data: str | bytes) -> None:
    for fn in (
        parse_note,
        lambda d: verify_checkpoint(d, ORIGIN, [LOG_PUB], [("w1.example", W1.public_key)], 1),
    ):
        with contextlib.suppress(WritError):
            fn(data)
    if isinstance(data, str):
        for parse in (parse_vkey, parse_signature_line, parse_checkpoint_body):
            with contextlib.suppress(WritError):
                parse(data)


@settings(max_examples=400, deadline=None)
@given(
    st.integers(0, len(CP_NOTE) - 1), st.sampled_from(["A", "B", "/", "+", "=", "\n", " ", "0", "9", "—", ""])
)
def test_single_character_mutation_never_yields_another_view(pos: int, char: str) -> None:
    mutated = CP_NOTE[:pos] + char + CP_NOTE[pos + 1 :]
    try:
        got = verify_checkpoint(mutated, ORIGIN, [LOG_PUB])
    except WritError:
        return
    # the only survivable mutations make the 0x04 line unknown (ignored): same view, maybe no time
    assert got.checkpoint == FINAL
    assert got.timestamp in (CP_TIME, None)


_body_text = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters=[chr(i) for i in range(32)]),
    max_size=40,
)
bodies = st.lists(_body_text, min_size=1, max_size=6).map(lambda lines: "".join(x + "\n" for x in lines))
names = st.text(
    alphabet=st.characters(exclude_categories=("Cs", "Cc", "Zs", "Zl", "Zp"), exclude_characters="+"),
    min_size=1,
    max_size=12,
).filter(lambda n: not any(c.isspace() for c in n))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies, st.lists(names, min_size=1, max_size=3, unique=True))
def test_sign_verify_round_trip(body: str, key_names: list[str]) -> None:
    signers = [(n, SeedSigner(bytes([i + 1]) * 32)) for i, n in enumerate(key_names)]
    text = sign_note(body, signers)
    note = parse_note(text)
    assert note.body == body and note.serialize() == text
    verifiers = [parse_vkey(vkey(n, SIG_ED25519, s.public_key)) for n, s in signers]
    assert [g.verifier for g in verify_note(note, verifiers)] == verifiers
    assert [g.verifier for g in verify_note(note, verifiers[-1:])] == verifiers[-1:]


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, (1 << 63) - 1),
    st.binary(min_size=32, max_size=32),
    st.integers(0, (1 << 63) - 1),
    st.lists(st.text(alphabet="abc —+/=", min_size=1, max_size=5), max_size=2),
)
def test_checkpoint_round_trip(size: int, root: bytes, ts: int, ext: list[str]) -> None:
    cp = Checkpoint(ORIGIN, size, root, tuple(ext))
    assert parse_checkpoint_body(cp.body()) == cp
    got = verify_checkpoint(sign_checkpoint(cp, ORIGIN, LOG, ts), ORIGIN, [LOG_PUB])
    assert (got.checkpoint, got.timestamp, got.log_key) == (cp, ts, LOG_PUB)


# --- the kept parses -----------------------------------------------------------


def test_a_kept_parse_is_the_parse_and_never_a_verification() -> None:
    """parse_note / parse_checkpoint_body keep the parse of the last few texts:
    the same text gives the same (immutable) value, str and bytes alike; a
    refused text is refused every time; and whoever verifies still verifies."""
    first, again = parse_note(CP_NOTE), parse_note(CP_NOTE)
    assert first is again and parse_note(CP_NOTE.encode()) == first
    assert parse_checkpoint_body(first.body) is parse_checkpoint_body(first.body)
    bad = CP_NOTE.replace("\n\n", "\n")
    for _ in range(2):
        with pytest.raises(BadNote):
            parse_note(bad)
    # the note parsed (and kept) above is still refused under a key that did not sign it
    with pytest.raises(UntrustedCheckpoint):
        verify_checkpoint(CP_NOTE, ORIGIN, [OTHER.public_key])
    assert verify_checkpoint(CP_NOTE, ORIGIN, [LOG_PUB]).note == CP_NOTE
    # a tampered signature in a text that differs by one character is parsed anew and refused
    body, sigs = CP_NOTE.split("\n\n", 1)
    line = sigs.splitlines()[0]
    name, b64sig = line.rsplit(" ", 1)
    raw = bytearray(base64.b64decode(b64sig))
    raw[-1] ^= 1
    forged = (
        body + "\n\n" + name + " " + b64(bytes(raw)) + "\n" + "".join(s + "\n" for s in sigs.splitlines()[1:])
    )
    with pytest.raises(UntrustedCheckpoint):
        verify_checkpoint(forged, ORIGIN, [LOG_PUB])
