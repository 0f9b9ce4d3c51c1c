"""Key custody backends for the root key (and any other Writ signing key).

Every signing command takes exactly one key source; :func:`open_signer` is
the one entry point the CLI calls. All backends return objects satisfying
:class:`ledger.crypto.Signer`:

- ``--key FILE``: :mod:`ledger.signers.file`, a passphrase-sealed key file;
- ``--pkcs11 URI``: :mod:`ledger.signers.pkcs11`, a key on a PKCS#11 token;
- ``--ssh-agent FINGERPRINT``: :mod:`ledger.signers.agent`, a key in ssh-agent.

:mod:`ledger.signers.shares` splits and recovers successor seeds with SLIP-39.
This package (with ``ledger.storage``) is where the pure core meets I/O.
"""

from __future__ import annotations

from ..crypto import Signer
from ..errors import UsageError
from .agent import AgentSigner, fingerprint, list_agent_keys
from .file import FileSigner, load_key_file, read_public_key, write_key_file
from .pkcs11 import (
    Pkcs11Signer,
    Pkcs11Uri,
    format_pkcs11_uri,
    generate_on_token,
    import_to_token,
    parse_pkcs11_uri,
)
from .shares import parse_threshold, recover_secret, recover_successor, share_sheet, split_secret

__all__ = [
    "AgentSigner",
    "FileSigner",
    "Pkcs11Signer",
    "Pkcs11Uri",
    "fingerprint",
    "format_pkcs11_uri",
    "generate_on_token",
    "import_to_token",
    "list_agent_keys",
    "load_key_file",
    "open_signer",
    "parse_pkcs11_uri",
    "parse_threshold",
    "read_public_key",
    "recover_secret",
    "recover_successor",
    "share_sheet",
    "split_secret",
    "write_key_file",
]


def open_signer(
    *,
    key_file: str | None = None,
    passphrase: bytes | None = None,
    pkcs11_uri: str | None = None,
    pin: str | None = None,
    pkcs11_module: str | None = None,
    ssh_agent: str | None = None,
) -> Signer:
    """Open the one key source given. ``passphrase`` goes with ``key_file``;
    ``pin`` and ``pkcs11_module`` go with ``pkcs11_uri``. Anything else is a
    :class:`~ledger.errors.UsageError`.

    A :class:`Pkcs11Signer` holds a token session: call its ``close()`` (or
    use it in a ``with`` block) when done.
    """

    given = [
        name
        for name, value in (("--key", key_file), ("--pkcs11", pkcs11_uri), ("--ssh-agent", ssh_agent))
        if value is not None
    ]
    if len(given) != 1:
        which = ", ".join(given) if given else "none"
        raise UsageError(f"give exactly one key source (--key, --pkcs11 or --ssh-agent); got {which}")
    if passphrase is not None and key_file is None:
        raise UsageError("a passphrase goes with --key only")
    if (pin is not None or pkcs11_module is not None) and pkcs11_uri is None:
        raise UsageError("a PIN or PKCS#11 module goes with --pkcs11 only")
    if key_file is not None:
        if passphrase is None:
            raise UsageError("--key needs a passphrase (--passphrase-env VAR, or the prompt)")
        return load_key_file(key_file, passphrase)
    if pkcs11_uri is not None:
        return Pkcs11Signer(pkcs11_uri, pin, pkcs11_module=pkcs11_module)
    assert ssh_agent is not None
    return AgentSigner(ssh_agent)
