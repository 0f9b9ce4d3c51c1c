"""Secrets out of every URI that Writ echoes.

A PKCS#11 URI may carry the token PIN (``pkcs11:token=writ;object=root?pin-value=1234``)
and a server URL may carry a password (``https://user:secret@host``). Whatever
prints, logs or returns a URI (or a message quoting one, such as argparse's
complaint about an argument) passes it through :func:`redact` first: the
value of every attribute whose name looks secret, and the password of a URL's
user information, become ``REDACTED``. It is the only implementation of this
job; it works on whole messages, not just on a single URI.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["REDACTED", "redact", "redact_fields"]

REDACTED = "REDACTED"

#: an attribute name that looks secret (PKCS#11 ``pin-value``, ``password``, ``token=`` is a label)
_HIDDEN_ATTR = (
    r"(?:[a-z0-9_.-]*(?:pin|pass(?:word|wd|phrase)?|pwd|secret|private|credential|auth"
    r"|api[_-]?key|access[_-]?key)[a-z0-9_.-]*)"
)
#: ``name=value`` after a URI separator (``?``, ``&``, ``;``) or at the start of a word
_ATTRIBUTE = re.compile(rf"(?i)(^|[?&;:\s\"'])({_HIDDEN_ATTR})(=)([^&;#\s\"']*)")
#: the password in ``scheme://user:password@host``
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@\"']*):([^@\s/\"']*)@")


def redact(text: str) -> str:
    """``text`` with the secret parts of every URI in it replaced by ``REDACTED``."""
    out = _USERINFO.sub(lambda m: f"{m.group(1)}:{REDACTED}@", text)
    return _ATTRIBUTE.sub(lambda m: f"{m.group(1)}{m.group(2)}={REDACTED}", out)


def redact_fields(obj: dict[str, Any]) -> dict[str, Any]:
    """A copy of a JSON object (an error) with :func:`redact` applied to its text values."""
    return {k: redact(v) if isinstance(v, str) else v for k, v in obj.items()}
