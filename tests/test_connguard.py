"""api/connguard.py's transport wrapper: a response head and its body leave in one ``send``."""

from __future__ import annotations

import asyncio
from typing import Any

from api.connguard import HOLD_MAX, JOIN_MAX, OneSend


class Recorder:
    """A transport that records what is written to it."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False
        self.extra = {"peername": ("127.0.0.1", 1)}

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def write_eof(self) -> None:
        self.writes.append(b"<eof>")

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> Any:
        return self.extra.get(name)


def wrap() -> tuple[Recorder, OneSend]:
    rec = Recorder()
    return rec, OneSend(rec, asyncio.get_running_loop())  # type: ignore[arg-type]


async def test_response_head_and_body_leave_in_one_write() -> None:
    rec, t = wrap()
    t.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    assert rec.writes == []
    t.write(b"{}")
    assert rec.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
    await asyncio.sleep(0)
    assert len(rec.writes) == 1  # nothing left over to flush


async def test_a_held_write_leaves_at_the_end_of_the_loop_pass_and_close_sends_it_first() -> None:
    rec, t = wrap()
    t.write(b"head")
    await asyncio.sleep(0)
    assert rec.writes == [b"head"]
    t.write(b"last words")
    t.close()
    assert rec.writes == [b"head", b"last words"] and rec.closed
    await asyncio.sleep(0)
    assert rec.writes == [b"head", b"last words"]


async def test_large_writes_are_neither_held_nor_copied_into_one() -> None:
    rec, t = wrap()
    big = b"x" * (JOIN_MAX + 1)
    t.write(b"head")
    t.write(big)
    assert rec.writes == [b"head", big]
    t.write(b"y" * (HOLD_MAX + 1))
    assert rec.writes[-1] == b"y" * (HOLD_MAX + 1)


async def test_writes_keep_their_order_and_the_rest_is_the_transports() -> None:
    rec, t = wrap()
    t.writelines([b"a", b"b"])
    t.write(b"c")
    t.write(b"d")
    t.write_eof()
    assert b"".join(rec.writes) == b"abcd<eof>"
    assert t.get_extra_info("peername") == ("127.0.0.1", 1)
    assert not t.is_closing()
