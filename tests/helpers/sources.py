"""A :class:`ledger.mirror.LedgerSource` over fixed records and a checkpoint note.

``ListSource(raws, note)`` serves ``note`` as the checkpoint and ``raws`` as
the records; ``calls`` counts record requests, ``page_limit`` caps what one
request returns (a server's page size).
"""

from __future__ import annotations

from collections.abc import Sequence


class ListSource:
    def __init__(self, raws: Sequence[bytes], note: str, *, page_limit: int | None = None) -> None:
        self.raws, self.note = list(raws), note
        self.page_limit = page_limit
        self.calls: list[tuple[int, int]] = []

    def checkpoint(self) -> str:
        return self.note

    def records(self, start: int, limit: int) -> list[bytes]:
        self.calls.append((start, limit))
        if self.page_limit is not None:
            limit = min(limit, self.page_limit)
        return self.raws[start : start + limit]
