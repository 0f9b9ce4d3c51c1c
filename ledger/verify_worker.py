"""The worker process of :class:`ledger.verifier.ProcessVerifier`.

Run as ``python -P -m ledger.verify_worker``. It reads length-prefixed batches
of Ed25519 checks on stdin and answers each with one byte per check (1: the
signature verifies, 0: it does not) on stdout, in order, until stdin closes.
It imports nothing of Writ but this file, holds no key material (public keys
only) and never writes anything else to stdout.

A batch (all integers big-endian)::

    u8 ndomains, then per domain: u16 length, bytes
    u8 nkeys, then per key: 32 bytes
    then per check: u8 domain index, u8 key index (255: nothing to check, 0),
                    64-byte signature, u16 message length, message

An answer is ``u32 length`` then that many bytes; a batch that does not parse
gets an empty answer, which the parent treats as "check these yourself".
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import BinaryIO

NOTHING = 255
#: the workers yield the CPU to the process that feeds them (its in-order rules
#: are the pipeline's critical path)
NICENESS = 5


def check_frame(data: bytes) -> bytes:
    """The answer to one batch (empty when the batch is malformed)."""
    import nacl.bindings
    import nacl.exceptions

    open_ = nacl.bindings.crypto_sign_open
    try:
        domains: list[bytes] = []
        p = 1
        for _ in range(data[0]):
            n = int.from_bytes(data[p : p + 2], "big")
            domains.append(data[p + 2 : p + 2 + n])
            p += 2 + n
        nkeys = data[p]
        keys = [data[p + 1 + 32 * i : p + 33 + 32 * i] for i in range(nkeys)]
        p += 1 + 32 * nkeys
        if any(len(k) != 32 for k in keys):
            return b""
        out = bytearray()
        end = len(data)
        while p < end:
            di, ki = data[p], data[p + 1]
            sig = data[p + 2 : p + 66]
            n = int.from_bytes(data[p + 66 : p + 68], "big")
            msg = data[p + 68 : p + 68 + n]
            p += 68 + n
            if p > end:
                return b""
            if ki == NOTHING:
                out.append(0)
                continue
            try:
                open_(sig + domains[di] + msg, keys[ki])
            except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError, TypeError):
                out.append(0)
            else:
                out.append(1)
        return bytes(out)
    except IndexError:
        return b""


def serve(inp: BinaryIO, out: BinaryIO) -> None:
    while True:
        head = inp.read(4)
        if len(head) < 4:
            return
        n = int.from_bytes(head, "big")
        data = inp.read(n)
        if len(data) < n:
            return
        answer = check_frame(data)
        out.write(len(answer).to_bytes(4, "big") + answer)
        out.flush()


def main() -> int:
    with contextlib.suppress(OSError):
        os.nice(NICENESS)
    with contextlib.suppress(BrokenPipeError, KeyboardInterrupt):
        serve(sys.stdin.buffer, sys.stdout.buffer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
