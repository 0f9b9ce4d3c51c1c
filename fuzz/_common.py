"""Shared plumbing of the coverage-guided harnesses in ``fuzz/`` (atheris, libFuzzer).

Every harness is a script run as ``python fuzz/fuzz_<name>.py [libFuzzer flags] [corpus dirs]``
and calls :func:`main`. What this module gives them:

- :func:`require_atheris`: atheris, or a clean exit 0 with the reason when it is
  not installed (it is not a project dependency: ``pip install 'atheris>=2.3'``);
- the protocol vectors, read from ``tests/vectors/`` like the tests do;
- :func:`seed_inputs`: the seed inputs of each harness, built from the vectors
  and committed as small files under ``fuzz/corpus/<name>/`` (regenerate them
  with ``python fuzz/run.py --write-seeds``), and a libFuzzer dictionary of
  the byte strings a mutator cannot guess (vector keys, roots, role names) in
  ``fuzz/dicts/<name>.dict``, used unless ``-dict=`` is given;
- :func:`main`: when no corpus directory is named on the command line, the
  harness reads the committed seeds ``fuzz/corpus/<name>/`` but writes the
  inputs it finds into ``fuzz/work/<name>/`` (libFuzzer writes into its
  *first* corpus directory; the committed seeds must stay small, and the work
  directory, git-ignored, carries coverage from one local run to the next), and
  crash artifacts go to ``fuzz/artifacts/`` unless ``-artifact_prefix=`` says
  otherwise.

This module imports nothing from ``ledger`` at import time: a harness imports
the code under test inside ``atheris.instrument_imports()`` so that it is
instrumented for coverage, which only works for modules not yet imported.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

FUZZ_DIR = Path(__file__).resolve().parent
ROOT = FUZZ_DIR.parent
VECTORS = ROOT / "tests" / "vectors"
CORPUS = FUZZ_DIR / "corpus"
ARTIFACTS = FUZZ_DIR / "artifacts"
WORK = FUZZ_DIR / "work"
DICTS = FUZZ_DIR / "dicts"

#: every harness, by name: ``fuzz/fuzz_<name>.py`` with seeds in ``fuzz/corpus/<name>/``.
HARNESSES = ("record", "note", "messages", "tiles", "http")

#: the exit status of a harness that skipped because atheris is missing.
SKIPPED = 0


def load_atheris() -> Any:
    """The atheris module, or None when it is not installed."""
    try:
        return importlib.import_module("atheris")
    except ImportError:
        return None


def require_atheris(name: str) -> Any:
    """atheris, or exit 0 with the reason: the harnesses are optional tooling."""
    atheris = load_atheris()
    if atheris is None:
        print(f"fuzz_{name}: skipped: atheris is not installed (pip install 'atheris>=2.3')", file=sys.stderr)
        raise SystemExit(SKIPPED)
    return atheris


# --- vectors ------------------------------------------------------------------


@cache
def ledger_vectors() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / "ledger-v1.json").read_text())
    return data


@cache
def note_vectors() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / "signed-note.json").read_text())
    return data


def vector_records() -> list[bytes]:
    return [bytes.fromhex(r["record"]) for r in ledger_vectors()["ledger"]]


def invalid_records() -> list[bytes]:
    return [bytes.fromhex(r["record"]) for r in ledger_vectors()["invalid"]]


def public_key(name: str) -> bytes:
    return bytes.fromhex(ledger_vectors()["keys"][name]["public"])


def seed(name: str) -> bytes:
    return bytes.fromhex(ledger_vectors()["keys"][name]["seed"])


def anchor() -> bytes:
    return bytes.fromhex(ledger_vectors()["anchor"])


def origin() -> str:
    return str(ledger_vectors()["origin"])


def checkpoint_note() -> str:
    return str(ledger_vectors()["checkpoint"]["note"])


# --- seeds ----------------------------------------------------------------------


def _seeds_record() -> dict[str, bytes]:
    from ledger import encoding

    # first byte: 0 = the rest is a record, 1 = the rest is a body the harness signs (fuzz_record.py)
    out = {f"ledger-{i:02d}": b"\x00" + raw for i, raw in enumerate(vector_records())}
    out.update({f"invalid-{i:02d}": b"\x00" + raw for i, raw in enumerate(invalid_records())})
    for prefix, raws in (("body", vector_records()), ("invalid-body", invalid_records())):
        for i, raw in enumerate(raws):
            body, _sig = encoding.unpack(raw)
            out[f"{prefix}-{i:02d}"] = b"\x01" + body
    # bodies for rules the vectors do not exercise, on top of the whole vector ledger
    v = ledger_vectors()
    n, root = len(v["ledger"]), bytes.fromhex(v["final"]["root"])
    t = max(encoding.unpack(encoding.unpack(r)[0])[4] for r in vector_records())
    crafted = {
        "revoke-revoked-key": [1, 2, n, root, t, 0, public_key("stolen_laptop"), 1],
        "grant-long-name": [1, 1, n, root, t, 0, bytes(range(32)), "operator", "", "n" * 65, 0, 0],
        "grant-root-key": [1, 1, n, root, t, 0, public_key("root"), "operator", "", "r", 0, 0],
    }
    out.update({f"crafted-{k}": b"\x01" + encoding.pack(f) for k, f in crafted.items()})
    return out


def _seeds_note() -> dict[str, bytes]:
    v = ledger_vectors()["checkpoint"]
    out = {
        "checkpoint": checkpoint_note().encode(),
        "log-vkey": v["log_vkey"].encode(),
        "cosig-vkey": v["cosig_vkey"].encode(),
    }
    for i, case in enumerate(note_vectors()["cases"]):
        out[f"note-{i}"] = case["note"].encode()
        out[f"vkey-{i}"] = case["vkey"].encode()
    return out


def _seeds_messages() -> dict[str, bytes]:
    from ledger import messages

    v = ledger_vectors()
    return {
        "auth": bytes.fromhex(v["auth"]["message"]),
        "receipt": bytes.fromhex(v["receipt"]["message"]),
        "enroll": bytes.fromhex(v["enroll"]["message"]),
        "bundle": messages.make_bundle(0, vector_records()[:3], checkpoint_note()),
    }


def _seeds_tiles() -> dict[str, bytes]:
    from ledger import tiles

    recs = vector_records()
    return {
        "path-level0": b"tile/0/000",
        "path-partial": b"tile/0/000.p/10",
        "path-entries": b"tile/entries/x001/x234/067.p/255",
        "path-level2": b"tile/2/x123/456",
        "bundle-ledger": tiles.encode_entry_bundle(recs),
        "bundle-one": tiles.encode_entry_bundle(recs[:1]),
        "hash-tile": bytes(range(64)),
    }


def _seeds_http() -> dict[str, bytes]:
    from ledger import encoding

    v = ledger_vectors()
    recs = vector_records()
    return {
        # first byte: which endpoint (see fuzz_http.py), the rest: the request body
        "records-all": b"\x00" + encoding.pack_records(recs),
        "records-one": b"\x00" + encoding.pack_records(recs[:1]),
        "records-invalid": b"\x00" + encoding.pack_records(invalid_records()[:1]),
        "receipt": b"\x01" + bytes.fromhex(v["receipt"]["message"]),
    }


_SEEDS: dict[str, Callable[[], dict[str, bytes]]] = {
    "record": _seeds_record,
    "note": _seeds_note,
    "messages": _seeds_messages,
    "tiles": _seeds_tiles,
    "http": _seeds_http,
}


def seed_inputs(name: str) -> dict[str, bytes]:
    """The seed inputs of harness ``name``: file name -> bytes."""
    return _SEEDS[name]()


def _bin(value: bytes) -> list[bytes]:
    """A value as it appears in MessagePack: raw, and with its bin8 header."""
    return [value, bytes([0xC4, len(value)]) + value]


def dictionary_tokens(name: str) -> list[bytes]:
    """The libFuzzer dictionary of harness ``name``: byte strings worth splicing in."""
    import hashlib

    v = ledger_vectors()
    keys = [bytes.fromhex(k["public"]) for k in v["keys"].values()]
    digests = [hashlib.sha256(k).digest() for k in keys]
    roots = [bytes.fromhex(r["root_after"]) for r in v["ledger"]] + [hashlib.sha256(b"").digest()]
    if name == "tiles":
        return [b"tile/", b"entries/", b".p/", b"/x", b"x000/", b"255", b"256"]
    if name == "note":
        cp = v["checkpoint"]
        return [
            origin().encode(),
            "\n\n\u2014 ".encode(),
            f"\u2014 {origin()} ".encode(),
            str(v["final"]["root_b64"]).encode(),
            cp["log_vkey"].encode(),
            cp["cosig_vkey"].encode(),
        ]
    out: list[bytes] = []
    for value in keys + digests + roots:
        out += _bin(value)
    if name in ("record", "http"):
        out += [
            bytes([0xA0 + len(r)]) + r.encode() for r in ("device", "operator", "revoker", "log", "witness")
        ]
        out += [bytes([0xA0 + len(origin())]) + origin().encode()]
    if name == "messages":
        out += _bin(bytes.fromhex(v["auth"]["challenge"]))
    return out


def dictionary_text(name: str) -> str:
    """:func:`dictionary_tokens` in libFuzzer's ``-dict=`` file format."""
    lines = [f"# fuzz_{name}: generated from tests/vectors by fuzz/run.py --write-seeds"]
    for i, token in enumerate(dictionary_tokens(name)):
        lines.append(f'kw{i}="' + "".join(f"\\x{b:02x}" for b in token) + '"')
    return "\n".join(lines) + "\n"


def write_seeds(name: str) -> Path:
    """(Re)write ``fuzz/corpus/<name>/`` from :func:`seed_inputs` and
    ``fuzz/dicts/<name>.dict``; returns the corpus directory."""
    DICTS.mkdir(exist_ok=True)
    (DICTS / f"{name}.dict").write_text(dictionary_text(name))
    d = CORPUS / name
    d.mkdir(parents=True, exist_ok=True)
    want = seed_inputs(name)
    for stale in d.iterdir():
        if stale.name not in want:
            stale.unlink()
    for fname, data in want.items():
        (d / fname).write_bytes(data)
    return d


# --- running ----------------------------------------------------------------------


def libfuzzer_argv(name: str, argv: list[str]) -> list[str]:
    """``argv`` with the default corpus directories (``fuzz/work/<name>/`` to write
    into, then the committed seeds) and artifact prefix, unless the caller gave their own."""

    flags = [a for a in argv[1:] if a.startswith("-")]
    dirs = [a for a in argv[1:] if not a.startswith("-")]
    if not any(a.startswith("-dict=") for a in flags) and (DICTS / f"{name}.dict").exists():
        flags.append(f"-dict={DICTS / f'{name}.dict'}")
    if not any(a.startswith("-artifact_prefix=") for a in flags):
        ARTIFACTS.mkdir(exist_ok=True)
        flags.append(f"-artifact_prefix={ARTIFACTS}/{name}-")
    if not dirs:
        work = WORK / name
        work.mkdir(parents=True, exist_ok=True)
        dirs = [str(work), str(CORPUS / name)]
    return [argv[0], *flags, *dirs]


def main(name: str, test_one_input: Callable[[bytes], None], argv: list[str] | None = None) -> None:
    """Run ``test_one_input`` under libFuzzer with the flags of ``argv`` (default ``sys.argv``)."""

    atheris = require_atheris(name)
    args = list(sys.argv if argv is None else argv)
    atheris.Setup(libfuzzer_argv(name, args), test_one_input)
    atheris.Fuzz()
