"""Fuzz the C2SP signed-note, checkpoint and vkey parsers (docs/protocol.md, "Checkpoints").

Each input is a note (bytes, as fetched from ``<prefix>/checkpoint``). Oracles:

- ``notes.parse_note`` raises only :class:`~ledger.errors.BadNote`, and a parsed
  note serializes back to exactly the bytes parsed (one note, one reading);
- ``verify_note`` against the vector verifiers, ``parse_checkpoint_body`` on the
  parsed text and ``parse_vkey`` on the input as text raise only ``BadNote``; a
  parsed vkey re-parses from its own ``vkey()`` to the same verifier;
- ``verify_checkpoint`` with the vector log key and one witness key raises only
  ``BadNote`` or :class:`~ledger.errors.CheckpointRejected`; when it accepts,
  the checkpoint is the one the vector log signed (origin, size, root, no
  extension lines), its 0x04 timestamp is the vector's or absent, and no
  witness is counted (the witness never signed anything).

Run: ``python fuzz/fuzz_note.py -runs=100000`` (libFuzzer flags).
"""

from __future__ import annotations

import contextlib

import _common as common

atheris = common.require_atheris("note")

with atheris.instrument_imports(include=["ledger"]):
    from ledger import checkpoints, notes
    from ledger.errors import BadNote, CheckpointRejected

ORIGIN = common.origin()
LOG_KEY = common.public_key("log")
WITNESSES = [("witness.example/w1", common.public_key("plc_3"))]
VECTOR_NOTE = notes.parse_note(common.checkpoint_note())
VECTOR_CHECKPOINT = checkpoints.parse_checkpoint_body(VECTOR_NOTE.body)
VECTOR_TIMESTAMP = int(common.ledger_vectors()["checkpoint"]["timestamp"])
VERIFIERS = [
    *checkpoints.checkpoint_verifiers(ORIGIN, LOG_KEY),
    *(notes.parse_vkey(case["vkey"]) for case in common.note_vectors()["cases"]),
]


def _note(data: bytes) -> None:
    try:
        note = notes.parse_note(data)
    except BadNote:
        return
    if note.serialize().encode("utf-8") != data:
        raise AssertionError("a parsed note does not serialize back to its bytes")
    with contextlib.suppress(BadNote):
        notes.verify_note(note, VERIFIERS)
    with contextlib.suppress(BadNote):
        checkpoints.parse_checkpoint_body(note.body)


def _checkpoint(data: bytes) -> None:
    try:
        vc = checkpoints.verify_checkpoint(data, ORIGIN, [LOG_KEY], WITNESSES, require_witnesses=0)
    except (BadNote, CheckpointRejected):
        return
    if vc.checkpoint != VECTOR_CHECKPOINT or vc.log_key != LOG_KEY:
        raise AssertionError(f"accepted a checkpoint the log never signed: {vc.checkpoint}")
    if vc.timestamp not in (None, VECTOR_TIMESTAMP) or vc.cosigners:
        raise AssertionError(f"accepted a timestamp or a cosigner nobody signed: {vc}")


def _vkey(data: bytes) -> None:
    try:
        text = data.decode("utf-8")
        v = notes.parse_vkey(text)
    except (UnicodeDecodeError, BadNote):
        return
    if notes.parse_vkey(v.vkey()) != v:
        raise AssertionError(f"vkey {text!r} does not round trip")


def test_one_input(data: bytes) -> None:
    _note(data)
    _checkpoint(data)
    _vkey(data)


if __name__ == "__main__":
    common.main("note", test_one_input)
