"""How each device of a template-booted fleet verifies its OWN grant.

The bootstrap model of :mod:`device_sim.fleet` (step 2): one template device
verifies the whole ledger, the others start from a copy of its state, and
each then checks its own grant by itself: ``leaf`` (the record it was handed,
signed by the root and equal to the leaf the verified computation found at
that seq) or ``proof`` (an inclusion proof from ``GET /v1/proof/inclusion``
checked against its own accepted checkpoint).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ledger import crypto, records, tree
from ledger.client import AsyncClient
from ledger.errors import BadMessage, BadProof
from ledger.records import Grant, Kind

from ..device import OwnGrant
from ..sources import Update
from .model import Member

__all__ = ["Found", "device_grants", "verify_own_by_leaf", "verify_own_by_proof"]


@dataclass(frozen=True, slots=True)
class Found:
    """A device grant the verified scan found."""

    seq: int
    leaf_hash: bytes
    scope: str
    name: str


def device_grants(upd: Update) -> dict[bytes, Found]:
    """Device grants among verified records: subject -> the newest grant."""
    out: dict[bytes, Found] = {}
    for i, raw in enumerate(upd.records):
        env = records.parse(raw)
        if env.kind is not Kind.GRANT or env.extra[1] != records.ROLE_DEVICE:
            continue
        subject, scope, name = env.extra[0], env.extra[2], env.extra[3]
        if type(subject) is bytes and type(scope) is str and type(name) is str:
            out[subject] = Found(upd.start + i, tree.leaf_hash(raw), scope, name)
    return out


def _own_record(m: Member, found: dict[bytes, Found]) -> tuple[bytes, Found]:
    f = found.get(m.public_key)
    if f is None:
        raise BadMessage(f"the ledger holds no device grant of {m.public_key.hex()[:16]}…")
    raw = m.grant_record
    if raw is None:  # no record handed over (tests with a prepared ledger): the scan is the check
        return b"", f
    env = records.parse(raw)
    body = env.typed()
    st = m.device.state
    root = st.root_for(body.seq)
    if (
        not isinstance(body, Grant)
        or body.role != records.ROLE_DEVICE
        or body.subject != m.public_key
        or env.signer != 0
        or root is None
    ):
        raise BadMessage("the grant handed to the device is not a device grant of its key")
    crypto.verify(root, crypto.RECORD_DOMAIN, env.body_bytes, env.signature, what="own grant")
    if body.seq != f.seq:
        raise BadMessage(f"the grant handed to the device says seq {body.seq}, the ledger has {f.seq}")
    return raw, f


def verify_own_by_leaf(m: Member, found: dict[bytes, Found]) -> None:
    """``own_grant="leaf"``: the record handed over is the leaf the scan found."""
    raw, f = _own_record(m, found)
    if raw and tree.leaf_hash(raw) != f.leaf_hash:
        raise BadMessage(f"the grant handed to the device is not the record at seq {f.seq}")
    m.device.own_grants = [OwnGrant(f.seq, f.scope, f.name)]


async def verify_own_by_proof(m: Member, found: dict[bytes, Found], http: AsyncClient) -> None:
    """``own_grant="proof"``: an inclusion proof from ``http``'s server,
    checked against the device's own accepted checkpoint."""
    raw, f = _own_record(m, found)
    leaf = tree.leaf_hash(raw) if raw else f.leaf_hash
    accepted = m.device.view
    if accepted is None:
        raise BadMessage("no accepted checkpoint to check an inclusion proof against")
    body = await http.get(
        f"v1/proof/inclusion?index={f.seq}&size={accepted.size}",
        cap=65536,
        headers={"Accept": "application/json"},
    )
    m.own_bytes += len(body)
    try:
        doc = json.loads(body)
        proof = [bytes.fromhex(h) for h in doc["proof"]]
    except (ValueError, KeyError, TypeError):
        raise BadProof("the inclusion proof is not the JSON expected") from None
    tree.verify_inclusion(leaf, f.seq, accepted.size, proof, accepted.root)
    m.device.own_grants = [OwnGrant(f.seq, f.scope, f.name)]
