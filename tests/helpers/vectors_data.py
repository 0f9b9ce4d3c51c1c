"""Loading the protocol vectors copied into tests/vectors/ (the tests read only this copy)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from ledger.crypto import SeedSigner

VECTORS = Path(__file__).resolve().parent.parent / "vectors"


@dataclass(frozen=True)
class LedgerVectors:
    raw: dict[str, Any]

    @property
    def origin(self) -> str:
        return str(self.raw["origin"])

    @property
    def anchor(self) -> bytes:
        return bytes.fromhex(self.raw["anchor"])

    def seed(self, name: str) -> bytes:
        return bytes.fromhex(self.raw["keys"][name]["seed"])

    def public(self, name: str) -> bytes:
        return bytes.fromhex(self.raw["keys"][name]["public"])

    def signer(self, name: str) -> SeedSigner:
        return SeedSigner(self.seed(name))

    @property
    def records(self) -> list[bytes]:
        return [bytes.fromhex(r["record"]) for r in self.raw["ledger"]]

    @property
    def invalid(self) -> list[dict[str, Any]]:
        return list(self.raw["invalid"])


@cache
def ledger_vectors() -> LedgerVectors:
    return LedgerVectors(json.loads((VECTORS / "ledger-v1.json").read_text()))
