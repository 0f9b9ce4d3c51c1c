"""Durable storage of the ledger.

- :mod:`.contract`: the :class:`Storage` protocol and its value types;
- :mod:`.checks`: the rules every backend shares (:func:`prepare`, the CAS conflict, ...);
- :mod:`.memory`: :class:`MemoryStorage`, the in-memory twin;
- :mod:`.sqlite`: :class:`~ledger.storage.sqlite.SqliteStorage`, the real one
  (WAL, ``synchronous = FULL``, one ``BEGIN IMMEDIATE`` transaction per append);
- :mod:`.load`: :func:`~ledger.storage.load.load_ledger`, the full re-verification
  that ``writ serve`` runs before serving and ``writ audit --data`` runs on a backup.

The same test suite (``tests/test_storage.py``) runs on both backends.
"""

from __future__ import annotations

from .checks import receipt_is_newer
from .contract import EMPTY_HEAD, FAULT_STEPS, Fault, Head, Meta, PreparedRecord, ReceiptRow, Storage
from .memory import MemoryStorage

__all__ = [
    "EMPTY_HEAD",
    "FAULT_STEPS",
    "Fault",
    "Head",
    "MemoryStorage",
    "Meta",
    "PreparedRecord",
    "ReceiptRow",
    "Storage",
    "receipt_is_newer",
]
