"""Is this credential valid on this device now? (docs/protocol.md, "Credentials on a device")

A pure function of the device's verified state, the holder's auth message,
the challenge the device issued and an explicit ``now``. It never raises for
a bad credential: it returns a :class:`Verdict` whose ``reason`` is one of
the refusal names of the conformance contract, the first that applies in
:data:`REFUSALS` order.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

from . import crypto, messages, records, tree
from .acceptance import MAX_AHEAD, AcceptedView
from .errors import CredentialRefusal, WritError
from .state import GrantInfo, LedgerState

MAX_SKEW = 300
DEFAULT_MAX_STALENESS = 24 * 3600

#: refusal reasons, in the order of precedence when several apply.
REFUSALS: tuple[CredentialRefusal, ...] = tuple(CredentialRefusal)


@dataclass(frozen=True, slots=True)
class Verdict:
    accepted: bool
    reason: CredentialRefusal | None = None
    grant_seq: int | None = None
    name: str | None = None
    role: str | None = None
    stale: bool = False

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"accepted": self.accepted}
        if self.reason is not None:
            out["reason"] = self.reason
        if self.grant_seq is not None:
            out.update(grant_seq=self.grant_seq, name=self.name, role=self.role)
        out["stale"] = self.stale
        return out


@dataclass(frozen=True, slots=True)
class Freshness:
    """How fresh the device's view is, and what it does when it is not.

    ``checkpoint_time`` is the timestamp freshness is judged by
    (:meth:`ledger.acceptance.AcceptedView.fresh_time`: the log's, or with ``k``
    required witnesses the k-th freshest witness timestamp on the device's
    tree). Fresh when it is at most ``max_staleness`` behind ``now``; a
    timestamp up to :data:`~ledger.acceptance.MAX_AHEAD` seconds ahead counts as
    ``now``, one further ahead is never fresh (protocol revision 1.1: docs/protocol.md, "Checkpoints").
    """

    checkpoint_time: int | None
    max_staleness: int = DEFAULT_MAX_STALENESS
    policy: str = "refuse"  # or "accept"

    @classmethod
    def of(
        cls,
        view: AcceptedView | None,
        *,
        require_witnesses: int = 0,
        max_staleness: int = DEFAULT_MAX_STALENESS,
        policy: str = "refuse",
    ) -> Freshness:
        """The freshness of an accepted view for a device requiring ``require_witnesses``."""
        t = None if view is None else view.fresh_time(require_witnesses)
        return cls(t, max_staleness, policy)

    def is_stale(self, now: int) -> bool:
        t = self.checkpoint_time
        if t is None or t > now + MAX_AHEAD:
            return True
        return now - min(t, now) > self.max_staleness


def check_credential(
    state: LedgerState,
    auth_bytes: bytes,
    *,
    device_key: bytes,
    challenge: bytes | None,
    now: int,
    roles: Iterable[str] = (records.ROLE_OPERATOR,),
    device_scope: str = "",
    freshness: Freshness,
) -> Verdict:
    try:
        auth = messages.parse_auth(auth_bytes)
    except WritError:
        return Verdict(False, CredentialRefusal.BAD_SIGNATURE)
    if challenge is None or auth.verifier_key != device_key or auth.challenge != challenge:
        return Verdict(False, CredentialRefusal.BAD_CHALLENGE)
    if abs(auth.time - now) > MAX_SKEW:
        return Verdict(False, CredentialRefusal.CLOCK_SKEW)
    try:
        env = records.parse(auth.grant_record)
        body = env.typed()
    except WritError:
        return Verdict(False, CredentialRefusal.BAD_SIGNATURE)
    if not isinstance(body, records.Grant) or env.signer != 0:
        return Verdict(False, CredentialRefusal.BAD_SIGNATURE)
    root = state.root_for(body.seq)
    if root is None or not crypto.check(root, crypto.RECORD_DOMAIN, env.body_bytes, env.signature):
        return Verdict(False, CredentialRefusal.BAD_SIGNATURE)
    if not crypto.check(body.subject, crypto.AUTH_DOMAIN, auth.body, auth.signature):
        return Verdict(False, CredentialRefusal.BAD_SIGNATURE)

    kept = state.grants.get(body.seq)
    leaf = tree.leaf_hash(auth.grant_record)
    if body.seq >= state.size or kept is None or kept.leaf_hash != leaf:
        return Verdict(False, CredentialRefusal.UNPUBLISHED, body.seq, body.name, body.role)
    return judge_grant(
        state, kept, now=now, roles=frozenset(roles), device_scope=device_scope, freshness=freshness
    )


def judge_grant(
    state: LedgerState,
    grant: GrantInfo,
    *,
    now: int,
    roles: Collection[str] = (records.ROLE_OPERATOR,),
    device_scope: str = "",
    freshness: Freshness,
) -> Verdict:
    """The verdict on a published grant the device kept (``state.grants``):
    the rules after ``unpublished`` in :data:`REFUSALS` order. The one place
    that decides whether a kept grant is honoured; :func:`check_credential`
    calls it once the holder has proved its key, and :func:`accepted_grants`
    (a device's list for sshd) calls it for every grant."""

    def refuse(reason: CredentialRefusal, stale: bool = False) -> Verdict:
        return Verdict(False, reason, grant.seq, grant.name, grant.role, stale)

    if state.is_revoked(grant.seq):
        return refuse(CredentialRefusal.REVOKED)
    if state.key_revoked(grant.subject):
        return refuse(CredentialRefusal.REVOKED_KEY)
    if grant.not_after != 0 and now >= grant.not_after:
        return refuse(CredentialRefusal.EXPIRED)
    if now < grant.not_before:
        return refuse(CredentialRefusal.NOT_YET_VALID)
    if grant.role not in roles:
        return refuse(CredentialRefusal.WRONG_ROLE)
    if not records.in_scope(grant.scope, device_scope):
        return refuse(CredentialRefusal.OUT_OF_SCOPE)
    stale = freshness.is_stale(now)
    if stale and freshness.policy != "accept":
        return refuse(CredentialRefusal.STALE, stale=True)
    return Verdict(True, None, grant.seq, grant.name, grant.role, stale)


def accepted_grants(
    state: LedgerState,
    *,
    now: int,
    roles: Iterable[str] = (records.ROLE_OPERATOR,),
    device_scope: str = "",
    freshness: Freshness,
) -> list[GrantInfo]:
    """Every kept grant whose holder the device would accept at ``now``
    (by :func:`judge_grant`), in seq order. Empty when the view is stale
    under the refuse policy."""
    if freshness.is_stale(now) and freshness.policy != "accept":
        return []
    wanted = frozenset(roles)
    return [
        g
        for seq, g in sorted(state.grants.items())
        if g.role in wanted
        and judge_grant(
            state, g, now=now, roles=wanted, device_scope=device_scope, freshness=freshness
        ).accepted
    ]
