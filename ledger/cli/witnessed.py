"""Is a record under a checkpoint the ledger's witnesses cosigned?

``writ grant`` and ``writ revoke`` add ``"witnessed": {...}`` to their output
when the ledger grants role ``witness``: the size of the served checkpoint,
which granted witnesses cosigned it, and ``"complete"``, true once every
unrevoked witness of the ledger cosigned a checkpoint that holds the record.
With ``--wait-witnessed [SECONDS]`` (default 60) the command waits for that;
if it does not come in time it exits 1 with ``{"error": "not-witnessed"}``
(the record *is* appended: only the witnessing is missing).

The served checkpoint is verified like any other (the log key and the witness
keys come from the verified mirror state); a checkpoint larger than the
record's ledger is tied to it by a consistency proof, so "cosigned" always
means "cosigned a tree that contains this record".
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from .. import checkpoints, records
from ..errors import BadProof, Fork, NotWitnessed, TransportError, WritError
from ..state import LedgerState
from ..tree import verify_consistency
from .common import Client, refuse, say

#: seconds --wait-witnessed waits when given no value.
DEFAULT_WAIT = 60.0
POLL = 0.5


def add_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--wait-witnessed",
        nargs="?",
        const=DEFAULT_WAIT,
        default=None,
        type=_seconds,
        metavar="SECONDS",
        help="wait until every witness of the ledger cosigned the record (default 60 s)",
    )


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expected a number of seconds") from None
    if not 0 < v <= 86400:
        raise argparse.ArgumentTypeError("expected a number of seconds in (0, 86400]")
    return v


def _witnesses(state: LedgerState) -> list[tuple[str, bytes]]:
    active = set(state.active_keys(records.ROLE_WITNESS))
    return [
        (g.name, g.subject)
        for g in state.grants.values()
        if g.role == records.ROLE_WITNESS and g.subject in active
    ]


def status(client: Client, state: LedgerState, seq: int) -> dict[str, Any]:
    """What the served checkpoint says about record ``seq`` of ``state`` (raises on a bad checkpoint)."""
    witnesses = _witnesses(state)
    assert state.origin is not None
    vc = checkpoints.verify_checkpoint(
        client.checkpoint(), state.origin, state.active_keys(records.ROLE_LOG), witnesses
    )
    cp = vc.checkpoint
    holds = cp.size > seq
    if holds and cp.size < state.size:
        holds = False  # an older checkpoint than the ledger we pushed to: not yet re-signed
    elif holds and cp.size == state.size and cp.root != state.root:
        raise Fork("the served checkpoint's root is not the root of the ledger the record was appended to")
    elif holds and cp.size > state.size:
        doc = client.get_json("/v1/proof/consistency", {"old": state.size, "new": cp.size})
        try:
            proof = [bytes.fromhex(h) for h in doc["proof"]]
        except (KeyError, TypeError, ValueError):
            raise BadProof("the server's consistency proof is malformed") from None
        verify_consistency(state.size, cp.size, proof, state.root, cp.root)
    names = {n for n, _ in witnesses}
    cosigners = sorted(set(vc.cosigners) & names)
    return {
        "size": cp.size,
        "witnesses": len({k for _, k in witnesses}),
        "cosigners": cosigners,
        "complete": bool(witnesses) and holds and len(vc.cosigners) >= len({k for _, k in witnesses}),
    }


def report(args: argparse.Namespace, state: LedgerState, seq: int) -> dict[str, Any] | None:
    """The ``"witnessed"`` field of ``grant``/``revoke`` (None when the ledger has no witness)."""
    wait: float | None = getattr(args, "wait_witnessed", None)
    if not _witnesses(state):
        if wait is not None:
            refuse(NotWitnessed.type, "the ledger grants no witness: there is nothing to wait for", seq=seq)
        return None
    deadline = time.monotonic() + (wait or 0.0)
    out: dict[str, Any] = {}
    said = False
    with Client(args.server) as client:
        while True:
            try:
                out = status(client, state, seq)
            except TransportError as exc:
                out = {"complete": False, "error": exc.message}
            except WritError as exc:
                refuse(exc.type, f"the served checkpoint does not verify: {exc.message}", code=3, seq=seq)
            if out["complete"] or wait is None:
                return out
            if time.monotonic() >= deadline:
                refuse(
                    NotWitnessed.type,
                    f"record {seq} is appended but not cosigned by every witness within {wait:g} s",
                    seq=seq,
                    witnessed=out,
                )
            if not said:
                say(f"writ: waiting for the witnesses to cosign record {seq}…")
                said = True
            time.sleep(POLL)
