"""Ed25519 keys on a PKCS#11 token (``--pkcs11 URI``), via python-pkcs11.

The token is named by an RFC 7512 URI, e.g.
``pkcs11:token=writ-root;object=root?module-path=/usr/lib/softhsm/libsofthsm2.so``.
The key is a ``CKK_EC_EDWARDS`` private key signing with ``CKM_EDDSA``; its
public key comes from the matching public key object's ``CKA_EC_POINT``.
Every signature is verified locally before it is returned.

A module is initialised (``C_Initialize``) while any signer or helper uses it
and finalised when the last one is closed, so a new process state (for
SoftHSM, a new ``SOFTHSM2_CONF``) is read by the next use.

Errors are :class:`~ledger.errors.TokenError` with a one-line explanation;
the PIN never appears in them nor in any ``repr``.
"""

from __future__ import annotations

import contextlib
import os
import threading
import urllib.parse
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final

import nacl.exceptions
import nacl.signing
import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11e

from ..crypto import PUBLIC_KEY_SIZE, SEED_SIZE, SIGNATURE_SIZE, SeedSigner
from ..errors import TokenError, UsageError

DEFAULT_MODULE: Final = "/usr/lib/softhsm/libsofthsm2.so"
MODULE_ENV: Final = "WRIT_PKCS11_MODULE"

#: DER of the Ed25519 curve OID 1.3.101.112 (RFC 8410), the CKA_EC_PARAMS this module writes.
ED25519_OID_DER: Final = bytes.fromhex("06032b6570")
#: DER PrintableString "edwards25519", the other CKA_EC_PARAMS spelling PKCS#11 3.0 allows.
ED25519_NAME_DER: Final = b"\x13\x0cedwards25519"
_ED25519_PARAMS: Final = frozenset({ED25519_OID_DER, ED25519_NAME_DER})

# --- RFC 7512 URIs ------------------------------------------------------------

_PATH_ATTRS: Final = frozenset(
    {
        "token",
        "manufacturer",
        "serial",
        "model",
        "library-manufacturer",
        "library-description",
        "library-version",
        "object",
        "type",
        "id",
        "slot-id",
        "slot-description",
        "slot-manufacturer",
    }
)
_QUERY_ATTRS: Final = frozenset({"pin-source", "pin-value", "module-name", "module-path"})
_TYPES: Final = frozenset({"public", "private", "cert", "secret-key", "data"})
# RFC 7512 section 2.3: pk11-pchar and pk11-qchar, less pct-encoded (handled apart).
_UNRESERVED: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_RES_AVAIL: Final = frozenset(":[]@!$'()*+,=")
_PATH_CHARS: Final = _UNRESERVED | _RES_AVAIL | frozenset("&")
_QUERY_CHARS: Final = _UNRESERVED | _RES_AVAIL | frozenset("/?|")


@dataclass(frozen=True)
class Pkcs11Uri:
    """The attributes of an RFC 7512 URI that Writ uses (``pin_value`` is never shown)."""

    token: str | None = None
    manufacturer: str | None = None
    serial: str | None = None
    model: str | None = None
    object: str | None = None
    type: str | None = None
    id: bytes | None = None
    slot_id: int | None = None
    module_path: str | None = None
    pin_value: str | None = field(default=None, repr=False)
    other: tuple[tuple[str, str], ...] = ()


def _pct_decode(raw: str, allowed: frozenset[str], what: str) -> bytes:
    out = bytearray()
    i = 0
    while i < len(raw):
        c = raw[i]
        if c == "%":
            pair = raw[i + 1 : i + 3]
            if len(pair) != 2 or any(ch not in "0123456789abcdefABCDEF" for ch in pair):
                raise UsageError(f"bad percent-encoding in the PKCS#11 URI {what}")
            out.append(int(pair, 16))
            i += 3
            continue
        if c not in allowed:
            shown = "a character" if what == "pin-value" else f"character {c!r}"
            raise UsageError(f"{shown} must be percent-encoded in the PKCS#11 URI {what}")
        out.append(ord(c))
        i += 1
    return bytes(out)


def _text(value: bytes, name: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"PKCS#11 URI attribute {name} is not UTF-8") from None


def parse_pkcs11_uri(uri: str) -> Pkcs11Uri:
    """Parse an RFC 7512 URI strictly (unknown, repeated or empty attributes are errors).

    Vendor attributes (``x-...``) are kept in ``other``. ``pin-source`` and
    ``module-name`` are refused: give the PIN with ``--pin-env`` and the
    module with ``module-path``.
    """

    if not isinstance(uri, str) or uri[:7].lower() != "pkcs11:":
        raise UsageError("a PKCS#11 URI starts with pkcs11:")
    rest = uri[7:]
    path, sep, query = rest.partition("?")
    if sep and not query:
        raise UsageError("empty query in the PKCS#11 URI")
    values: dict[str, Any] = {}
    other: list[tuple[str, str]] = []

    where = {";": "path", "&": "query"}

    seen: set[str] = set()

    def parts(
        text: str, separator: str, chars: frozenset[str], known: frozenset[str]
    ) -> Iterator[tuple[str, bytes]]:
        """The (name, decoded value) of each known attribute of ``text``; a vendor
        (``x-``) attribute goes to ``other``; repeated or unknown ones are refused."""
        if not text:
            return
        for position, item in enumerate(text.split(separator), start=1):
            name, eq, raw = item.partition("=")
            if not eq or not name:
                # not echoed: a mistyped pin-value must not end up in a log
                raise UsageError(f"part {position} of the PKCS#11 URI {where[separator]} is not name=value")
            name = name.lower()
            if not name.isascii() or not all(c.isalnum() or c == "-" for c in name):
                raise UsageError(
                    f"part {position} of the PKCS#11 URI {where[separator]} has a malformed name"
                )
            if name in seen:
                raise UsageError(f"PKCS#11 URI attribute {name} is repeated")
            seen.add(name)
            value = _pct_decode(raw, chars, name)
            if name.startswith("x-"):
                other.append((name, _text(value, name)))
            elif name not in known:
                in_query = " query" if separator == "&" else ""
                raise UsageError(f"unknown PKCS#11 URI{in_query} attribute {name}")
            else:
                yield name, value

    for name, value in parts(path, ";", _PATH_CHARS, _PATH_ATTRS):
        if name == "id":
            if not value:
                raise UsageError("PKCS#11 URI attribute id is empty")
            values["id"] = value
        elif name == "slot-id":
            text = _text(value, name)
            if not text.isdigit() or not text.isascii() or len(text) > 20:
                raise UsageError("PKCS#11 URI slot-id is a decimal number")
            values["slot_id"] = int(text)
        elif name == "type":
            text = _text(value, name)
            if text not in _TYPES:
                raise UsageError(f"PKCS#11 URI type must be one of {', '.join(sorted(_TYPES))}")
            values["type"] = text
        elif name in {"token", "manufacturer", "serial", "model", "object"}:
            values[name] = _text(value, name)
        else:  # library-*, slot-description, slot-manufacturer: accepted, not used for matching
            other.append((name, _text(value, name)))
    for name, value in parts(query, "&", _QUERY_CHARS, _QUERY_ATTRS):
        if name == "pin-source":
            raise UsageError("pin-source is not supported in a PKCS#11 URI: pass the PIN with --pin-env")
        if name == "module-name":
            raise UsageError("module-name is not supported in a PKCS#11 URI: give module-path")
        text = _text(value, name)
        if name == "module-path":
            if not text:
                raise UsageError("PKCS#11 URI module-path is empty")
            values["module_path"] = text
        else:
            values["pin_value"] = text
    return Pkcs11Uri(other=tuple(other), **values)


def format_pkcs11_uri(*, token: str | None = None, object: str | None = None, id: bytes | None = None) -> str:
    """A ``pkcs11:`` URI naming a token and key (percent-encoding what must be)."""

    attrs: list[str] = []
    if token is not None:
        attrs.append("token=" + urllib.parse.quote(token, safe=""))
    if object is not None:
        attrs.append("object=" + urllib.parse.quote(object, safe=""))
    if id is not None:
        attrs.append("id=" + "".join(f"%{b:02x}" for b in id))
    return "pkcs11:" + ";".join(attrs)


def resolve_module(uri: Pkcs11Uri, pkcs11_module: str | None = None) -> str:
    """The module path: URI ``module-path``, else the argument, else ``$WRIT_PKCS11_MODULE``,
    else SoftHSM's."""

    if uri.module_path is not None and pkcs11_module is not None and uri.module_path != pkcs11_module:
        raise UsageError("the PKCS#11 URI's module-path and the module option disagree")
    return uri.module_path or pkcs11_module or os.environ.get(MODULE_ENV) or DEFAULT_MODULE


# --- module lifetime ------------------------------------------------------------

_lock = threading.Lock()
_users: dict[str, int] = {}
_libs: dict[str, Any] = {}


def _acquire(module: str) -> Any:
    with _lock:
        if not os.path.exists(module):
            raise TokenError(f"no PKCS#11 module at {module} (install it or set {MODULE_ENV})")
        try:
            lib = pkcs11.lib(module)
        except p11e.PKCS11Error as e:
            hint = " (check SOFTHSM2_CONF and its tokendir)" if "softhsm" in module.lower() else ""
            raise TokenError(
                f"cannot load or initialise the PKCS#11 module {module}: {type(e).__name__}{hint}"
            ) from None
        _users[module] = _users.get(module, 0) + 1
        _libs[module] = lib
        return lib


def _release(module: str) -> None:
    with _lock:
        left = _users.get(module, 0) - 1
        if left > 0:
            _users[module] = left
            return
        _users.pop(module, None)
        lib = _libs.get(module)
        if lib is not None and lib.initialized:
            with contextlib.suppress(p11e.PKCS11Error):
                lib.finalize()


def _explain(e: p11e.PKCS11Error) -> str:
    if isinstance(e, p11e.PinIncorrect):
        return "the token rejected the PIN"
    if isinstance(e, p11e.PinLocked):
        return "the token's PIN is locked (too many wrong PINs); the security officer must reset it"
    if isinstance(e, (p11e.PinLenRange, p11e.PinInvalid)):
        return "the PIN has a length or characters the token does not accept"
    if isinstance(e, p11e.PinExpired):
        return "the token's PIN has expired; change it with the token's tools"
    if isinstance(e, p11e.UserPinNotInitialized):
        return "the token has no user PIN yet; initialise it first"
    if isinstance(e, (p11e.TokenNotPresent, p11e.DeviceRemoved)):
        return "the token is not present"
    if isinstance(e, p11e.MechanismInvalid):
        return "the token does not support Ed25519 (CKM_EDDSA / CKM_EC_EDWARDS_KEY_PAIR_GEN)"
    if isinstance(e, p11e.TokenWriteProtected):
        return "the token is write-protected"
    return f"PKCS#11 call failed ({type(e).__name__})"


def _describe(uri: Pkcs11Uri) -> str:
    bits = [
        f"{k}={v}" for k, v in (("token", uri.token), ("serial", uri.serial), ("slot-id", uri.slot_id)) if v
    ]
    return ";".join(bits) or "any token"


def _find_token(lib: Any, uri: Pkcs11Uri) -> Any:
    matches = []
    try:
        for slot in lib.get_slots(token_present=True):
            if uri.slot_id is not None and slot.slot_id != uri.slot_id:
                continue
            try:
                token = slot.get_token()
            except (p11e.TokenNotPresent, p11e.TokenNotRecognised):
                continue
            if uri.token is not None and token.label != uri.token:
                continue
            if uri.manufacturer is not None and token.manufacturer_id != uri.manufacturer:
                continue
            if uri.model is not None and token.model != uri.model:
                continue
            if uri.serial is not None and token.serial.decode("utf-8", "replace").strip() != uri.serial:
                continue
            matches.append(token)
    except p11e.PKCS11Error as e:
        raise TokenError(f"cannot list PKCS#11 tokens: {_explain(e)}") from None
    if not matches:
        raise TokenError(f"no PKCS#11 token matching {_describe(uri)}")
    if len(matches) > 1:
        raise TokenError(f"{len(matches)} PKCS#11 tokens match {_describe(uri)}: name one with token=")
    return matches[0]


def _open_session(lib: Any, uri: Pkcs11Uri, pin: str | None, *, rw: bool) -> Any:
    pin = pin if pin is not None else uri.pin_value
    if pin is None:
        raise TokenError("no PIN for the PKCS#11 token (use --pin-env)")
    token = _find_token(lib, uri)
    try:
        return token.open(rw=rw, user_pin=pin)
    except p11e.PKCS11Error as e:
        raise TokenError(f"cannot log in to token {token.label!r}: {_explain(e)}") from None


def _key_query(uri: Pkcs11Uri, object_class: Any, label: str | None, key_id: bytes | None) -> dict[Any, Any]:
    attrs: dict[Any, Any] = {Attribute.CLASS: object_class, Attribute.KEY_TYPE: KeyType.EC_EDWARDS}
    if label is not None:
        attrs[Attribute.LABEL] = label
    if key_id is not None:
        attrs[Attribute.ID] = key_id
    return attrs


def _one(session: Any, attrs: dict[Any, Any], what: str) -> Any:
    try:
        found = list(session.get_objects(attrs))
    except p11e.PKCS11Error as e:
        raise TokenError(f"cannot search the token: {_explain(e)}") from None
    if not found:
        raise TokenError(f"no {what} on the token")
    if len(found) > 1:
        raise TokenError(f"{len(found)} objects match {what}: add id= or object= to the URI")
    return found[0]


def _point_to_public_key(point: bytes) -> bytes:
    """CKA_EC_POINT: DER OCTET STRING around the 32 bytes (PKCS#11 3.0), or the 32 bytes raw."""
    if len(point) == PUBLIC_KEY_SIZE:
        return point
    if len(point) == PUBLIC_KEY_SIZE + 2 and point[0] == 0x04 and point[1] == PUBLIC_KEY_SIZE:
        return point[2:]
    raise TokenError("the token's public key is not a 32-byte Ed25519 point")


def _what(uri: Pkcs11Uri) -> str:
    parts = []
    if uri.object is not None:
        parts.append(f"object={uri.object}")
    if uri.id is not None:
        parts.append(f"id={uri.id.hex()}")
    return "Ed25519 key " + (";".join(parts) if parts else "(any)")


def _public_key_of(session: Any, uri: Pkcs11Uri, private: Any) -> bytes:
    try:
        key_id = private[Attribute.ID] or None
        label = private[Attribute.LABEL]
        params = private[Attribute.EC_PARAMS]
    except p11e.PKCS11Error as e:
        raise TokenError(f"cannot read the key's attributes: {_explain(e)}") from None
    if bytes(params) not in _ED25519_PARAMS:
        raise TokenError("the token key is an Edwards key but not Ed25519")
    query = _key_query(uri, ObjectClass.PUBLIC_KEY, None if key_id else label, key_id)
    public = _one(session, query, f"public key object for {_what(uri)}")
    try:
        point = bytes(public[Attribute.EC_POINT])
    except p11e.PKCS11Error as e:
        raise TokenError(f"cannot read the public key: {_explain(e)}") from None
    return _point_to_public_key(point)


def _close(module: str, session: Any) -> None:
    with contextlib.suppress(p11e.PKCS11Error):
        session.close()
    _release(module)


class Pkcs11Signer:
    """Signs with an Ed25519 private key on a PKCS#11 token.

    Holds a logged-in session until :meth:`close` (or the end of a ``with``
    block, or garbage collection).
    """

    def __init__(self, uri: str, pin: str | None = None, *, pkcs11_module: str | None = None) -> None:
        parsed = parse_pkcs11_uri(uri)
        if parsed.type not in (None, "private"):
            raise UsageError("the PKCS#11 URI of a signing key names a private key (type=private)")
        self._uri = parsed
        self._module = resolve_module(parsed, pkcs11_module)
        lib = _acquire(self._module)
        try:
            session = _open_session(lib, parsed, pin, rw=False)
        except BaseException:
            _release(self._module)
            raise
        self._session = session
        self._closer = weakref.finalize(self, _close, self._module, session)
        try:
            self._key = _one(
                session, _key_query(parsed, ObjectClass.PRIVATE_KEY, parsed.object, parsed.id), _what(parsed)
            )
            self._public = _public_key_of(session, parsed, self._key)
            self._verify_key = nacl.signing.VerifyKey(self._public)
        except BaseException:
            self.close()
            raise

    @property
    def public_key(self) -> bytes:
        return self._public

    @property
    def module(self) -> str:
        return self._module

    def sign(self, message: bytes) -> bytes:
        if not self._closer.alive:
            raise TokenError("the PKCS#11 session is closed")
        try:
            sig = bytes(self._key.sign(message, mechanism=Mechanism.EDDSA))
        except p11e.PKCS11Error as e:
            raise TokenError(f"the token could not sign: {_explain(e)}") from None
        if len(sig) != SIGNATURE_SIZE:
            raise TokenError("the token returned a signature that is not 64 bytes")
        try:
            self._verify_key.verify(message, sig)
        except (nacl.exceptions.BadSignatureError, ValueError):
            raise TokenError(
                "the token returned a signature that does not verify under its public key"
            ) from None
        return sig

    def close(self) -> None:
        self._closer()

    def __enter__(self) -> Pkcs11Signer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        uri = self._uri
        return f"Pkcs11Signer(token={uri.token!r}, object={uri.object!r}, public_key={self._public.hex()})"


@contextlib.contextmanager
def _rw_session(uri: str, pin: str | None, pkcs11_module: str | None) -> Iterator[tuple[Pkcs11Uri, Any]]:
    parsed = parse_pkcs11_uri(uri)
    module = resolve_module(parsed, pkcs11_module)
    lib = _acquire(module)
    try:
        session = _open_session(lib, parsed, pin, rw=True)
        try:
            yield parsed, session
        finally:
            with contextlib.suppress(p11e.PKCS11Error):
                session.close()
    finally:
        _release(module)


def _check_new_label(session: Any, parsed: Pkcs11Uri, label: str) -> str:
    if parsed.object is not None and parsed.object != label:
        raise UsageError("the URI's object= and the label disagree")
    if not label:
        raise UsageError("a token key needs a label")
    try:
        taken = any(True for _ in session.get_objects({Attribute.LABEL: label}))
    except p11e.PKCS11Error as e:
        raise TokenError(f"cannot search the token: {_explain(e)}") from None
    if taken:
        raise TokenError(f"the token already holds an object labelled {label!r}")
    return label


def generate_on_token(
    uri: str, pin: str | None, label: str, *, pkcs11_module: str | None = None, key_id: bytes | None = None
) -> bytes:
    """Generate a non-extractable Ed25519 key pair on the token; return its public key."""

    with _rw_session(uri, pin, pkcs11_module) as (parsed, session):
        _check_new_label(session, parsed, label)
        key_id = key_id or parsed.id or os.urandom(8)
        try:
            public, _private = session.generate_keypair(
                KeyType.EC_EDWARDS,
                store=True,
                label=label,
                id=key_id,
                mechanism=Mechanism.EC_EDWARDS_KEY_PAIR_GEN,
                public_template={Attribute.EC_PARAMS: ED25519_OID_DER, Attribute.VERIFY: True},
                private_template={
                    Attribute.SIGN: True,
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.PRIVATE: True,
                },
            )
            point = bytes(public[Attribute.EC_POINT])
        except p11e.PKCS11Error as e:
            raise TokenError(f"cannot generate an Ed25519 key on the token: {_explain(e)}") from None
        return _point_to_public_key(point)


def import_to_token(
    uri: str,
    pin: str | None,
    seed: bytes,
    label: str,
    *,
    pkcs11_module: str | None = None,
    key_id: bytes | None = None,
) -> bytes:
    """Put an existing Ed25519 seed on the token (non-extractable, sensitive); return its public key.

    This is how a successor key recovered from SLIP-39 shares goes onto a token.
    """

    if not isinstance(seed, bytes) or len(seed) != SEED_SIZE:
        raise UsageError("an Ed25519 seed is 32 bytes")
    public_key = SeedSigner(seed).public_key
    with _rw_session(uri, pin, pkcs11_module) as (parsed, session):
        _check_new_label(session, parsed, label)
        key_id = key_id or parsed.id or public_key[:8]
        common = {
            Attribute.KEY_TYPE: KeyType.EC_EDWARDS,
            Attribute.TOKEN: True,
            Attribute.LABEL: label,
            Attribute.ID: key_id,
            Attribute.EC_PARAMS: ED25519_OID_DER,
        }
        try:
            private = session.create_object(
                {
                    **common,
                    Attribute.CLASS: ObjectClass.PRIVATE_KEY,
                    Attribute.PRIVATE: True,
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.SIGN: True,
                    Attribute.VALUE: seed,
                }
            )
            try:
                session.create_object(
                    {
                        **common,
                        Attribute.CLASS: ObjectClass.PUBLIC_KEY,
                        Attribute.PRIVATE: False,
                        Attribute.VERIFY: True,
                        Attribute.EC_POINT: b"\x04\x20" + public_key,
                    }
                )
            except p11e.PKCS11Error:
                with contextlib.suppress(p11e.PKCS11Error):
                    private.destroy()
                raise
        except p11e.PKCS11Error as e:
            raise TokenError(f"cannot import the Ed25519 key to the token: {_explain(e)}") from None
        return public_key
