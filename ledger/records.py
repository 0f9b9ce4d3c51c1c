"""Typed ledger records (docs/protocol.md, "Records").

Three layers, each a frozen value:

* :class:`Envelope` -- what steps 1-6 of the validity table establish: the
  record decodes canonically, has a known version and kind, the right arity,
  and a well-typed header. The kind's own fields are still untyped here,
  because the table checks them (step 12) only after the signature.
* the body classes :class:`Genesis`, :class:`Grant`, :class:`Revoke`,
  :class:`Rotate` -- an instance can only exist with valid fields (step 12's
  stateless part); construction raises :class:`~ledger.errors.InvalidField`.
* :class:`SignedRecord` -- the verbatim bytes with their typed body. Nothing
  re-encodes a record after it was signed: ``raw`` is what gets stored and
  served.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar, NamedTuple

from . import crypto, encoding
from .errors import InvalidField, NotCanonical, UnknownKind, UnsupportedVersion
from .tree import EMPTY_ROOT
from .tree import leaf_hash as _leaf_hash

VERSION = 1
EMPTY_HASH = EMPTY_ROOT  # the tree of no records (ledger/tree.py)

ROLE_PATTERN = re.compile(r"[a-z][a-z0-9-]{0,31}")
# Roles that the protocol gives power to; any other matching name has none.
ROLE_DEVICE = "device"
ROLE_OPERATOR = "operator"
ROLE_REVOKER = "revoker"
ROLE_LOG = "log"
ROLE_WITNESS = "witness"
PROTOCOL_ROLES = frozenset({ROLE_DEVICE, ROLE_OPERATOR, ROLE_REVOKER, ROLE_LOG, ROLE_WITNESS})

MAX_SCOPE = 64
MAX_NAME = 64
MAX_ORIGIN = 128
_U64 = 1 << 64


class Kind(IntEnum):
    GENESIS = 0
    GRANT = 1
    REVOKE = 2
    ROTATE = 3


ARITY = {Kind.GENESIS: 9, Kind.GRANT: 12, Kind.REVOKE: 8, Kind.ROTATE: 8}
# the members as plain module names: ``Kind.GRANT`` goes through the enum class's lookup each time
_GENESIS, _GRANT, _REVOKE = Kind.GENESIS, Kind.GRANT, Kind.REVOKE


class Reason(IntEnum):
    UNSPECIFIED = 0
    KEY_COMPROMISE = 1
    LOST = 2
    SUPERSEDED = 3
    RETIRED = 4

    @classmethod
    def parse(cls, name: str) -> Reason:
        try:
            return cls[name.upper()]
        except KeyError:
            raise InvalidField(
                f"unknown reason {name!r}; one of: " + ", ".join(r.name.lower() for r in cls)
            ) from None

    @classmethod
    def label(cls, value: int) -> str:
        try:
            return cls(value).name.lower()
        except ValueError:
            return f"reason-{value}"


# --- field rules ------------------------------------------------------------


#: Unicode general category Cc, exactly: C0, DEL and C1 (U+0000..U+001F, U+007F..U+009F).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
#: the code points with the Unicode White_Space property (stable since Unicode 6.3), spelled out
#: so that the verdict never depends on the Python's Unicode database.
WHITE_SPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680"
    "\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)


def _has_control(text: str) -> bool:
    """Any code point of general category Cc (C0, DEL or C1)."""
    return _CONTROL.search(text) is not None


def check_text(what: str, value: object, max_bytes: int, *, min_bytes: int = 0) -> str:
    if type(value) is not str:
        raise InvalidField(f"{what} must be text")
    ascii = value.isascii()
    try:
        n = len(value) if ascii else len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidField(f"{what} must be valid UTF-8 text") from None
    if n > max_bytes or n < min_bytes:
        raise InvalidField(f"{what} must be {min_bytes} to {max_bytes} bytes")
    # in ASCII, the non-printable characters are exactly the Cc ones (U+0000..U+001F, U+007F)
    if (not value.isprintable()) if ascii else _has_control(value):
        raise InvalidField(f"{what} must not contain control characters")
    return value


def check_origin(value: object) -> str:
    """1..128 bytes of text, no control character, no White_Space code point, no '+'."""
    origin = check_text("origin", value, MAX_ORIGIN, min_bytes=1)
    if "+" in origin or not WHITE_SPACE.isdisjoint(origin):
        raise InvalidField("origin must not contain spaces or '+'")
    return origin


def check_key(what: str, value: object) -> bytes:
    if type(value) is not bytes or len(value) != 32:
        raise InvalidField(f"{what} must be 32 bytes")
    return value


def check_digest(what: str, value: object) -> bytes | None:
    if value is None:
        return None
    return check_key(what, value)


def check_uint(what: str, value: object) -> int:
    if type(value) is not int or value < 0 or value >= 1 << 64:
        raise InvalidField(f"{what} must be an unsigned integer")
    return value


def check_role(value: object) -> str:
    if type(value) is not str or (value not in PROTOCOL_ROLES and ROLE_PATTERN.fullmatch(value) is None):
        raise InvalidField("role must match ^[a-z][a-z0-9-]{0,31}$")
    return value


def valid_between(not_before: int, not_after: int, now: int) -> bool:
    """A grant's validity window (docs/protocol.md, "Records"): ``not_before <= now``, and before
    ``not_after`` unless that is 0 (no expiry)."""
    return not_before <= now and (not_after == 0 or now < not_after)


def in_scope(credential_scope: str, device_scope: str) -> bool:
    """docs/protocol.md, "Records": a credential of scope s is in scope on a device of scope d."""
    s, d = credential_scope, device_scope
    return s == "" or s == d or d.startswith(s + "/")


# --- bodies -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Header:
    seq: int
    prev: bytes
    time: int

    KIND: ClassVar[Kind]

    def _check_header(self) -> None:
        check_uint("seq", self.seq)
        check_uint("time", self.time)
        check_key("prev", self.prev)

    def fields(self) -> list[Any]:
        raise NotImplementedError

    def _head(self, signer: int) -> list[Any]:
        """The fields every body opens with (docs/protocol.md, "Records"): version, kind, seq,
        prev, time, signer."""
        return [VERSION, int(self.KIND), self.seq, self.prev, self.time, signer]

    def encode(self) -> bytes:
        return encoding.pack(self.fields())


@dataclass(frozen=True, slots=True)
class Genesis(_Header):
    origin: str
    root: bytes
    next_root_digest: bytes | None
    signer: int = 0
    KIND: ClassVar[Kind] = Kind.GENESIS

    def __post_init__(self) -> None:
        self._check_header()
        check_origin(self.origin)
        check_key("root", self.root)
        check_digest("next_root_digest", self.next_root_digest)

    def fields(self) -> list[Any]:
        return [*self._head(self.signer), self.origin, self.root, self.next_root_digest]


@dataclass(frozen=True, slots=True, init=False)
class Grant(_Header):
    subject: bytes
    role: str
    scope: str
    name: str
    not_before: int
    not_after: int
    signer: int = 0
    KIND: ClassVar[Kind] = Kind.GRANT

    def __init__(
        self,
        seq: int,
        prev: bytes,
        time: int,
        subject: bytes,
        role: str,
        scope: str,
        name: str,
        not_before: int,
        not_after: int,
        signer: int = 0,
    ) -> None:
        # the generated frozen __init__, with the fields set through their slots directly
        # (one grant per record on the in-order path: this halves its cost)
        s = _GRANT_SLOTS
        s[0](self, seq)
        s[1](self, prev)
        s[2](self, time)
        s[3](self, subject)
        s[4](self, role)
        s[5](self, scope)
        s[6](self, name)
        s[7](self, not_before)
        s[8](self, not_after)
        s[9](self, signer)
        # the common case in one expression: when it holds, every check of _check passes;
        # anything else runs them in order, and the first that fails names the field
        if not (
            type(seq) is int
            and type(time) is int
            and type(not_before) is int
            and type(not_after) is int
            and 0 <= seq < _U64
            and 0 <= time < _U64
            and 0 <= not_before < _U64
            and 0 <= not_after < _U64
            and (not_after == 0 or not_after > not_before)
            and type(prev) is bytes
            and len(prev) == 32
            and type(subject) is bytes
            and len(subject) == 32
            and type(role) is str
            and role in PROTOCOL_ROLES
            and type(scope) is str
            and type(name) is str
            and len(scope) <= MAX_SCOPE
            and len(name) <= MAX_NAME
            and scope.isascii()
            and name.isascii()
            and scope.isprintable()
            and name.isprintable()
        ):
            self._check()

    def _check(self) -> None:
        self._check_header()
        check_key("subject", self.subject)
        check_role(self.role)
        check_text("scope", self.scope, MAX_SCOPE)
        check_text("name", self.name, MAX_NAME)
        check_uint("not_before", self.not_before)
        check_uint("not_after", self.not_after)
        if self.not_after != 0 and self.not_after <= self.not_before:
            raise InvalidField("not_after must be 0 (no expiry) or later than not_before")

    def fields(self) -> list[Any]:
        return [
            *self._head(self.signer),
            self.subject,
            self.role,
            self.scope,
            self.name,
            self.not_before,
            self.not_after,
        ]

    def valid_at(self, now: int) -> bool:
        return valid_between(self.not_before, self.not_after, now)


@dataclass(frozen=True, slots=True, init=False)
class Revoke(_Header):
    signer: int
    target: int | bytes
    reason: int
    KIND: ClassVar[Kind] = Kind.REVOKE

    def __init__(
        self, seq: int, prev: bytes, time: int, signer: int, target: int | bytes, reason: int
    ) -> None:
        # as Grant.__init__: the slots set directly, the common case checked in one expression
        s = _REVOKE_SLOTS
        s[0](self, seq)
        s[1](self, prev)
        s[2](self, time)
        s[3](self, signer)
        s[4](self, target)
        s[5](self, reason)
        if not (
            type(seq) is int
            and type(time) is int
            and type(signer) is int
            and type(reason) is int
            and 0 <= seq < _U64
            and 0 <= time < _U64
            and 0 <= signer < _U64
            and 0 <= reason < _U64
            and type(prev) is bytes
            and len(prev) == 32
            and (
                (type(target) is int and 0 <= target < _U64) or (type(target) is bytes and len(target) == 32)
            )
        ):
            self._check()

    def _check(self) -> None:
        self._check_header()
        check_uint("signer", self.signer)
        if type(self.target) is int:
            check_uint("target", self.target)
        else:
            check_key("target", self.target)
        check_uint("reason", self.reason)

    def fields(self) -> list[Any]:
        return [*self._head(self.signer), self.target, self.reason]


@dataclass(frozen=True, slots=True)
class Rotate(_Header):
    new_root: bytes
    next_root_digest: bytes | None
    signer: int = 0
    KIND: ClassVar[Kind] = Kind.ROTATE

    def __post_init__(self) -> None:
        self._check_header()
        check_key("new_root", self.new_root)
        check_digest("next_root_digest", self.next_root_digest)

    def fields(self) -> list[Any]:
        return [*self._head(self.signer), self.new_root, self.next_root_digest]


Body = Genesis | Grant | Revoke | Rotate


# --- envelope (steps 1-6) ---------------------------------------------------


class Envelope(NamedTuple):
    """A record that passed steps 1-6: canonical, known version and kind, right
    arity, typed header. ``extra`` holds the kind's fields, not yet checked.

    A named tuple, not a frozen dataclass: one is made per record on the
    in-order path, and a tuple is built in one step, not a field at a time."""

    raw: bytes
    body_bytes: bytes
    signature: bytes
    kind: Kind
    seq: int
    prev: bytes
    time: int
    signer: int
    extra: tuple[Any, ...]

    def typed(self) -> Body:
        """Step 12's stateless part: the kind's fields, or InvalidField."""
        _, _, _, kind, seq, prev, time, signer, e = self
        if kind is _GRANT:
            return Grant(seq, prev, time, e[0], e[1], e[2], e[3], e[4], e[5], signer)
        if kind is _GENESIS:
            return Genesis(seq, prev, time, e[0], e[1], e[2], signer)
        if kind is _REVOKE:
            if type(e[0]) is not int and type(e[0]) is not bytes:
                raise InvalidField("target must be a uint or bin(32)")
            return Revoke(seq, prev, time, signer, e[0], e[1])
        return Rotate(seq, prev, time, e[0], e[1], signer)


def parse(raw: bytes) -> Envelope:
    """Steps 1-6 of docs/protocol.md, "Validity rules", in order."""

    body, sig, f = encoding.split_record(raw)  # steps 1, 2
    version, kind = f[0], f[1]
    if type(version) is not int or version != VERSION:  # step 3
        raise UnsupportedVersion(f"version {version!r} is not supported")
    if type(kind) is not int or kind not in _KINDS:  # step 4
        raise UnknownKind(f"kind {kind!r} is unknown")
    k, arity = _KINDS[kind]
    if len(f) != arity:  # step 5
        raise NotCanonical(f"a {k.name.lower()} body has {arity} elements, not {len(f)}")
    seq, prev, time, signer = f[2], f[3], f[4], f[5]  # step 6
    if type(seq) is not int or type(time) is not int or type(signer) is not int:
        raise InvalidField(
            "seq, time and signer must be unsigned integers", seq=seq if type(seq) is int else None
        )
    if type(prev) is not bytes or len(prev) != 32:
        raise InvalidField("prev must be 32 bytes", seq=seq)
    # tuple.__new__: Envelope's own __new__ is a Python function around this very call
    return _new_tuple(Envelope, (raw, body, sig, k, seq, prev, time, signer, tuple(f[6:])))


_KINDS = {int(k): (k, ARITY[k]) for k in Kind}
_new_tuple = tuple.__new__


@dataclass(frozen=True, slots=True, init=False)
class SignedRecord:
    """A verified record: its exact bytes and typed body."""

    raw: bytes
    body: Body
    signature: bytes
    leaf_hash: bytes = b""

    def __init__(self, raw: bytes, body: Body, signature: bytes, leaf_hash: bytes = b"") -> None:
        # the generated frozen __init__, with the fields set through their slots directly
        s = _SIGNED_SLOTS
        s[0](self, raw)
        s[1](self, body)
        s[2](self, signature)
        s[3](self, leaf_hash or _leaf_hash(raw))

    @property
    def seq(self) -> int:
        return self.body.seq


def _slot_setters(cls: type, names: str) -> tuple[Callable[[object, Any], None], ...]:
    """The ``__set__`` of the slots ``names`` of ``cls``: what a frozen dataclass's generated
    __init__ reaches through ``object.__setattr__`` one lookup at a time, bound once."""
    return tuple(getattr(cls, n).__set__ for n in names.split())


_GRANT_SLOTS = _slot_setters(Grant, "seq prev time subject role scope name not_before not_after signer")
_REVOKE_SLOTS = _slot_setters(Revoke, "seq prev time signer target reason")
_SIGNED_SLOTS = _slot_setters(SignedRecord, "raw body signature leaf_hash")


def sign(body: Body, signer: crypto.Signer) -> bytes:
    """Encode and sign ``body``; returns the record bytes (to be checked by
    :meth:`ledger.state.LedgerState.apply` like any other record)."""

    body_bytes = body.encode()
    sig = crypto.sign(signer, crypto.RECORD_DOMAIN, body_bytes)
    return encoding.join_record(body_bytes, sig)


def decode_unverified(raw: bytes) -> SignedRecord:
    """Steps 1-6 and the stateless part of 12, with no signature check: for
    display of bytes that were verified elsewhere (the server's store)."""

    env = parse(raw)
    return SignedRecord(raw, env.typed(), env.signature)


def describe(body: Body) -> dict[str, Any]:
    """A JSON-friendly view of a body (hex for bytes)."""

    out: dict[str, Any] = {"kind": body.KIND.name.lower(), "seq": body.seq, "time": body.time}
    if isinstance(body, Genesis):
        out.update(
            origin=body.origin,
            root=body.root.hex(),
            next_root_digest=body.next_root_digest.hex() if body.next_root_digest else None,
        )
    elif isinstance(body, Grant):
        out.update(
            subject=body.subject.hex(),
            role=body.role,
            scope=body.scope,
            name=body.name,
            not_before=body.not_before,
            not_after=body.not_after,
        )
    elif isinstance(body, Revoke):
        out.update(
            signer=body.signer,
            target=body.target if isinstance(body.target, int) else body.target.hex(),
            reason=Reason.label(body.reason),
        )
    else:
        out.update(
            new_root=body.new_root.hex(),
            next_root_digest=body.next_root_digest.hex() if body.next_root_digest else None,
        )
    return out
