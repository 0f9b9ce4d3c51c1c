"""Helpers shared by the reliability runners and tests: reading a server back, the machine."""

from __future__ import annotations

import json
import secrets
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from bench.harness import Chain
from bench.harness import machine as bench_machine
from device_sim.server_process import run_writ, writ_command
from ledger import checkpoints, encoding, records, tiles
from ledger.crypto import SeedSigner
from ledger.records import Grant
from ledger.state import LedgerState
from ledger.tree import MerkleLevels, leaf_hash

PAGE = 1000


def base_ledger(root: SeedSigner, origin: str, log_key: bytes) -> list[bytes]:
    """A new ledger's first records: the genesis signed by ``root`` and the grant of the log key."""
    chain = Chain(root, origin)
    return [chain.genesis().raw, chain.grant(log_key, records.ROLE_LOG, "log").raw]


def grant_batch(
    state: LedgerState, root: SeedSigner, names: Sequence[str]
) -> tuple[LedgerState, list[bytes]]:
    """One operator grant per name (to a fresh random key) signed by ``root`` on top of
    ``state``: the state they lead to (a copy; ``state`` is untouched) and the records."""
    work = state.copy()
    raws: list[bytes] = []
    for name in names:
        t = max(int(time.time()), work.last_time)
        body = Grant(work.size, work.root, t, secrets.token_bytes(32), records.ROLE_OPERATOR, "", name, 0, 0)
        raw = records.sign(body, root)
        work.apply(raw)
        raws.append(raw)
    return work, raws


def init_server(data_dir: Path, root: SeedSigner, origin: str) -> bytes:
    """``writ server init`` for a new ledger rooted at ``root``; the new log public key."""
    code, doc, err = run_writ(
        "server", "init", "--data", str(data_dir), "--anchor", root.public_key.hex(), "--origin", origin
    )
    if code != 0:
        raise RuntimeError(f"writ server init failed: {doc} {err}")
    return bytes.fromhex(doc["log_public_key"])


def fetch_records(client: httpx.Client, url: str, start: int = 0) -> list[bytes]:
    """Every record the server at ``url`` serves from ``start`` on (``GET /v1/records``, paged)."""
    out: list[bytes] = []
    pos = start
    while True:
        r = client.get(f"{url}/v1/records", params={"start": pos, "limit": PAGE})
        r.raise_for_status()
        page = encoding.unpack_records(r.content, max_count=PAGE)
        out.extend(page)
        pos += len(page)
        if len(page) < PAGE:
            return out


def verify_checkpoint(
    client: httpx.Client, url: str, origin: str, log_key: bytes, size: int, root: bytes
) -> checkpoints.VerifiedCheckpoint:
    """``GET /checkpoint`` verifies under ``log_key`` and names exactly (``size``, ``root``)."""
    r = client.get(f"{url}/checkpoint")
    r.raise_for_status()
    vc = checkpoints.verify_checkpoint(r.text, origin, [log_key])
    if (vc.checkpoint.size, vc.checkpoint.root) != (size, root):
        raise AssertionError(
            f"torn checkpoint: it names size {vc.checkpoint.size}, the records make {size}"
            + ("" if vc.checkpoint.size != size else " (same size, other root)")
        )
    return vc


def check_tiles(
    client: httpx.Client, url: str, served: Sequence[bytes], levels: MerkleLevels, index: int
) -> None:
    """Entry bundle and level-0 hash tile ``index`` of the tree of ``len(served)`` match the records."""
    size = len(served)
    first = index * tiles.TILE_WIDTH
    width = min(tiles.TILE_WIDTH, size - first)
    if width <= 0:
        return
    r = client.get(f"{url}/{tiles.entries_path(index, width)}")
    if r.status_code != 200:
        raise AssertionError(f"entry bundle {index} (width {width}) answered {r.status_code}")
    if tiles.decode_entry_bundle(r.content, width) != list(served[first : first + width]):
        raise AssertionError(f"entry bundle {index} does not hold the records served")
    r = client.get(f"{url}/{tiles.tile_path(0, index, width)}")
    if r.status_code != 200:
        raise AssertionError(f"hash tile 0/{index} (width {width}) answered {r.status_code}")
    want = [levels.leaf(i) for i in range(first, first + width)]
    if tiles.decode_hash_tile(r.content, width) != want:
        raise AssertionError(f"hash tile 0/{index} does not hold the leaf hashes of the records")
    assert want == [leaf_hash(x) for x in served[first : first + width]]


def writ_audit_data(data_dir: Path, anchor: bytes, timeout: float = 300.0) -> dict[str, Any]:
    """``writ audit --data DIR --anchor HEX --json``: its JSON (raises when it does not exit 0)."""
    p = subprocess.run(
        [*writ_command(), "audit", "--data", str(data_dir), "--anchor", anchor.hex(), "--json"],
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    lines = p.stdout.decode().strip().splitlines()
    doc: dict[str, Any] = json.loads(lines[-1]) if lines else {}
    if p.returncode != 0 or not doc.get("ok"):
        raise AssertionError(f"writ audit --data failed ({p.returncode}): {doc} {p.stderr.decode()[-2000:]}")
    return doc


def machine() -> str:
    """The machine a run was made on, in one line (from the benchmarks' description)."""
    m = bench_machine()
    return (
        f"{time.strftime('%Y-%m-%d')}, {m['cores']} CPUs ({m['cpu'] or '?'}), {m['memory_mib']} MiB, "
        f"Linux {m['kernel']}, Python {m['python']}"
    )
