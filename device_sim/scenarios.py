"""``python -m device_sim fleet --scenario stolen-log-key``: the log key is stolen.

Against a real ``writ serve --witness ...`` whose witnesses are granted in the
ledger, with the server's log key file in the attacker's hands (``--log-key
DIR/log.key``; reading it *is* the theft):

1. N devices requiring ``K`` witness cosignatures (``--require-witnesses``,
   default 1) and one control device requiring none are granted, with an
   operator tablet; all sync honestly and accept the tablet;
2. the tablet is lost and revoked; the witnesses cosign the tree holding the
   revoke;
3. ``max_staleness`` seconds later (``--max-staleness``, default 3: a short
   bound so that the run takes seconds), the attacker freezes half of the
   devices and the control on the tree before the revoke, re-signed with the
   stolen key at a fresh time and carrying that tree's old witness
   cosignatures (they still verify); the other half sync from the server (a
   split view);
4. every device is asked to accept the tablet; then the attacker shows the
   frozen tree to the half that saw the real one.

The verdict: with ``K >= 1`` every device refuses the tablet (the frozen
half as ``stale``: only the witnesses' timestamps make a view fresh, and no
witness cosigns the old tree again; the honest half as ``revoked``), and the
honest half refuses the rollback and keeps both signed notes as evidence;
the control device (``K = 0``) is fooled: the reason to turn witnesses on.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from ledger import acceptance, checkpoints, messages, notes, records
from ledger.crypto import SeedSigner
from ledger.errors import UsageError, VerificationError, WritError

from .device import Device
from .sources import HttpSource, sync

SCENARIOS = ("lost-tablet", "stolen-log-key")


def read_stolen_log_key(path: str) -> SeedSigner:
    """The server's ``log.key`` file (``{"version": 1, "seed": HEX32, ...}``), as the thief reads it."""
    try:
        doc: Any = json.loads(Path(path).read_text(encoding="utf-8")[:4096])
        return SeedSigner(bytes.fromhex(str(doc["seed"])))
    except (OSError, ValueError, KeyError, TypeError, WritError):
        raise UsageError(f"{path} is not a Writ log key file (the server's DIR/log.key)") from None


def _grant(subject: bytes, role: str, name: str) -> Callable[[int, bytes, int], records.Body]:
    return lambda s, p, t: records.Grant(s, p, t, subject, role, "", name, 0, 0)


def _witness_lines(note: str, names: set[str]) -> list[str]:
    return [s.line() for s in notes.parse_note(note).signatures if s.name in names]


async def run_stolen_log_key(
    integ: Any,
    n: int,
    *,
    log_key: SeedSigner,
    require_witnesses: int = 1,
    max_staleness: int = 3,
    timeout: float = 30.0,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Play the scenario (module docstring) with ``integ``, a :class:`device_sim.fleet.Integrator`."""
    await integ.ensure_ready()
    st = integ.state
    if log_key.public_key not in st.active_keys(records.ROLE_LOG):
        raise UsageError("--log-key is not the ledger's log key (give the server's DIR/log.key)")
    wgrants = {
        g.name
        for g in st.grants.values()
        if g.role == records.ROLE_WITNESS and g.subject in st.active_keys(records.ROLE_WITNESS)
    }
    if len(wgrants) < max(1, require_witnesses):
        raise UsageError(
            f"the ledger grants {len(wgrants)} witness(es); grant at least {max(1, require_witnesses)}"
            " and serve with --witness URL first"
        )
    now = int(time.time())
    devices = [
        Device.create(
            integ.anchor,
            integ.origin,
            now=now,
            name=f"scenario-{i}",
            require_witnesses=require_witnesses,
            max_staleness=max_staleness,
        )
        for i in range(n)
    ]
    control = Device.create(
        integ.anchor, integ.origin, now=now, name="control-k0", max_staleness=max_staleness
    )
    tablet = SeedSigner.generate()
    makers = [
        (_grant(d.public_key, records.ROLE_DEVICE, f"scenario-{i}"), integ.root)
        for i, d in enumerate(devices)
    ]
    makers.append((_grant(control.public_key, records.ROLE_DEVICE, "control-k0"), integ.root))
    makers.append((_grant(tablet.public_key, records.ROLE_OPERATOR, "scenario-tablet"), integ.root))
    pushed = await integ.push(makers)
    tablet_grant = pushed.records[-1]
    tablet_seq = pushed.seqs[-1]
    everyone = [*devices, control]

    async with httpx.AsyncClient(trust_env=False) as client:
        source = HttpSource(client, integ.server)

        async def cosigned_note(size: int) -> str:
            deadline = time.monotonic() + timeout
            while True:
                note = (await client.get(integ.server + "/checkpoint")).text
                if acceptance.checkpoint_size(note) >= size and len(_witness_lines(note, wgrants)) >= max(
                    1, require_witnesses
                ):
                    return note
                if time.monotonic() > deadline:
                    raise UsageError(f"the witnesses did not cosign size {size} within {timeout:g} s")
                await asyncio.sleep(0.1)

        def check(d: Device, at: int) -> tuple[bool, str | None]:
            auth = messages.make_auth(tablet_grant, tablet, d.public_key, d.challenge(), at)
            v = d.check(auth, at)
            return v.accepted, v.reason

        # 1. everyone honest and witnessed: the tablet works
        frozen_note = await cosigned_note(tablet_seq + 1)
        frozen_size = acceptance.checkpoint_size(frozen_note)
        for d in everyone:
            await sync(d, source, int(time.time()))
        before = [check(d, int(time.time())) for d in everyone]
        log(f"{sum(ok for ok, _ in before)} of {len(everyone)} devices accept the tablet")

        # 2. the tablet is lost: revoke, witnessed
        await integ.push([(lambda s, p, t: records.Revoke(s, p, t, 0, tablet_seq, 2), integ.root)])
        await cosigned_note(integ.state.size)
        log("the revoke is cosigned by the witnesses; the log key is stolen")

        # 3. later: the split view
        await asyncio.sleep(max_staleness + 1.5)
        at = int(time.time())
        cp = checkpoints.Checkpoint(integ.origin, frozen_size, _root_of(frozen_note))
        forged = notes.add_signatures(
            checkpoints.sign_checkpoint(cp, integ.origin, log_key, at), _witness_lines(frozen_note, wgrants)
        )
        frozen_half, honest_half = devices[: (n + 1) // 2], devices[(n + 1) // 2 :]
        for d in [*frozen_half, control]:
            d.apply_update([], d.size, forged, at)
        for d in honest_half:
            await sync(d, source, at)
        frozen_v = [check(d, at) for d in frozen_half]
        honest_v = [check(d, at) for d in honest_half]
        control_v = check(control, at)

        # 4. the attacker shows the old tree to the half that saw the real one
        evidence = 0
        for d in honest_half:
            kept = len(d.evidence)
            try:
                d.apply_update([], d.size, forged, at)
            except VerificationError:
                evidence += len(d.evidence) > kept

    def tally(vs: list[tuple[bool, str | None]]) -> dict[str, Any]:
        return {
            "accepted": sum(ok for ok, _ in vs),
            "refused": sum(not ok for ok, _ in vs),
            "reasons": dict(Counter(r for ok, r in vs if not ok)),
        }

    all_refused = not any(ok for ok, _ in frozen_v + honest_v)
    return {
        "scenario": "stolen-log-key",
        "devices": n,
        "require_witnesses": require_witnesses,
        "witnesses": sorted(wgrants),
        "accepted_before": sum(ok for ok, _ in before),
        "frozen": tally(frozen_v),
        "honest": tally(honest_v),
        "all_refused": all_refused,
        "rollback_evidence": evidence,
        "control_k0": {"accepted": control_v[0], "reason": control_v[1], "fooled": control_v[0]},
    }


def _root_of(note: str) -> bytes:
    return checkpoints.parse_checkpoint_body(notes.parse_note(note).body).root
