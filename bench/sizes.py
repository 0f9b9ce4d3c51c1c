"""Sizes: records, what a device downloads per revocation, device state, vs X.509 CRLs and OpenSSH KRLs.

    python -m bench.sizes [--quick]

Measured, not computed from formulas: record bytes come from signed records;
the per-revocation download from a real ``writ serve`` (an SSE stream
``/v1/events?records=1`` and one ``?format=compact`` read off the socket,
``GET /checkpoint`` plus the partial entry bundle that holds the revoke, and
``GET /checkpoint`` plus ``GET /v1/records`` for just the new record, as a
polling device in sync fetches it); device state from
``LedgerState.snapshot()`` of a device that keeps operator grants (the
fleet's devices); the CRL built with ``cryptography`` (Ed25519-signed, CRL
number, a reason code per entry, random serials as CAs issue them); the KRL
with ``ssh-keygen -k`` (OpenSSH). All for N = 1, 100, 1,000, 10,000 revocations.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.harness import (
    Chain,
    Config,
    RawHttp,
    Result,
    figure,
    ledger_server,
    module_main,
    post_records,
    ref,
    table,
)
from ledger import records, tiles
from ledger.crypto import SeedSigner
from ledger.state import LedgerState

COMMAND = "python -m bench.sizes"


# --- records ----------------------------------------------------------------------------------


def record_sizes() -> dict[str, int]:
    ch = Chain(SeedSigner(b"\x02" * 32))
    ch.genesis()
    ch.grant(os.urandom(32), records.ROLE_LOG, "log")
    for i in range(5000):  # seqs and times of a ledger in use (a few bytes more than at seq 2)
        ch.grant(os.urandom(32), records.ROLE_DEVICE, f"plc-{i:05d}")
    grant = ch.grant(os.urandom(32), records.ROLE_OPERATOR, "tablet-07")
    revoke = ch.revoke(grant.seq, int(records.Reason.LOST))
    key_revoke = ch.revoke(os.urandom(32), int(records.Reason.KEY_COMPROMISE))
    return {
        "grant": len(grant.raw),
        "revoke": len(revoke.raw),
        "revoke_key": len(key_revoke.raw),
        "seq": revoke.seq,
    }


# --- one revocation, as a device in sync downloads it -----------------------------------------


class _SseWire:
    """One raw SSE connection (chunked HTTP/1.1): wire bytes counted chunk by chunk."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int, query: str, since: int) -> _SseWire:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(
            (
                f"GET /v1/events?{query} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n"
                f"Last-Event-ID: {since}\r\n\r\n"
            ).encode()
        )
        await reader.readuntil(b"\r\n\r\n")
        return cls(reader, writer)

    async def chunk(self) -> tuple[bytes, int]:
        line = await self.reader.readuntil(b"\r\n")
        n = int(line.strip(), 16)
        data = await self.reader.readexactly(n + 2)
        return data[:-2], len(line) + n + 2

    async def until(self, marker: bytes) -> tuple[bytes, int]:
        """(payload, wire bytes) up to the end of the event holding ``marker``."""
        payload, wire = b"", 0
        while not (marker in payload and payload.endswith(b"\n\n")):
            data, n = await asyncio.wait_for(self.chunk(), 10)
            wire += n
            payload += data
        return payload, wire


async def _sse_bytes(host: str, port: int, since: int, post: Any) -> dict[str, int]:
    """Wire bytes of the SSE streams, standard (``records=1``) and compact
    (``format=compact``), from the revoke's POST to the end of its checkpoint event."""
    std = await _SseWire.open(host, port, "records=1", since)
    cpt = await _SseWire.open(host, port, "format=compact", since)
    await std.until(b"event: checkpoint")  # the greetings: retry + the current checkpoint
    await cpt.until(f"id: {since}\n".encode())
    await asyncio.to_thread(post)
    payload, wire = await std.until(f"id: {since + 1}\nevent: checkpoint".encode())
    c_payload, c_wire = await cpt.until(f"id: {since + 1}\n".encode())
    for s in (std, cpt):
        s.writer.close()
    rec_ev = payload.split(b"\n\n")[0] if payload.startswith(b"event: records") else b""
    return {
        "sse_wire": wire,
        "sse_payload": len(payload),
        "sse_records_event": len(rec_ev) + 2,
        "sse_compact_wire": c_wire,
        "sse_compact_payload": len(c_payload),
    }


async def _poll_bytes(host: str, port: int, since: int) -> dict[str, int]:
    """A polling device in sync at ``since``: ``GET /checkpoint``, then only the new
    record, ``GET /v1/records?start=since&limit=1`` (what HttpSource fetches for a small gap)."""
    c = RawHttp(host, port)
    status, note = await c.request("GET", "/checkpoint")
    assert status == 200
    cp_head = c.last_head_bytes
    status, body = await c.request("GET", f"/v1/records?start={since}&limit=1")
    assert status == 200, status
    r_head = c.last_head_bytes
    await c.close()
    return {
        "poll_checkpoint_body": len(note),
        "poll_records_body": len(body),
        "poll_headers": cp_head + r_head,
    }


async def _tile_bytes(host: str, port: int, size: int) -> dict[str, int]:
    c = RawHttp(host, port)
    status, note = await c.request("GET", "/checkpoint")
    assert status == 200
    cp_head = c.last_head_bytes
    idx, w = (size - 1) // tiles.TILE_WIDTH, size - (size - 1) // tiles.TILE_WIDTH * tiles.TILE_WIDTH
    status, bundle = await c.request("GET", "/" + tiles.entries_path(idx, w))
    assert status == 200, status
    b_head = c.last_head_bytes
    await c.close()
    return {
        "checkpoint_body": len(note),
        "checkpoint_headers": cp_head,
        "bundle_body": len(bundle),
        "bundle_headers": b_head,
        "bundle_width": w,
    }


def download_per_revoke(cfg: Config) -> dict[str, Any]:
    """A real server; a device in sync at size S; the integrator revokes; what reaches the device."""
    with ledger_server(cfg.work, n_records=400, checkpoint_interval=3600) as srv:
        ch = srv.chain
        target = ch.grant(os.urandom(32), records.ROLE_OPERATOR, "tablet-07")
        post_records(srv.url, [target.raw])
        since = ch.state.size
        rev = ch.revoke(target.seq)
        sse = asyncio.run(_sse_bytes("127.0.0.1", srv.port, since, lambda: post_records(srv.url, [rev.raw])))
        tb = asyncio.run(_tile_bytes("127.0.0.1", srv.port, ch.state.size))
        poll = asyncio.run(_poll_bytes("127.0.0.1", srv.port, since))
    avg_w = (tiles.TILE_WIDTH + 1) / 2
    mean_bundle = round(avg_w * (len(rev.raw) + 2))
    return {**sse, **tb, **poll, "revoke_bytes": len(rev.raw), "bundle_mean_body": mean_bundle}


# --- device state -----------------------------------------------------------------------------


def state_growth(ns: list[int]) -> dict[int, dict[str, int]]:
    """Snapshot bytes added by N revocations, for a compact device and a full mirror."""
    top = max(ns)
    ch = Chain(SeedSigner(b"\x03" * 32))
    raws = [ch.genesis().raw, ch.grant(os.urandom(32), records.ROLE_LOG, "log").raw]
    grants = []
    for i in range(top):
        g = ch.grant(os.urandom(32), records.ROLE_OPERATOR, f"tablet-{i:05d}")
        raws.append(g.raw)
        grants.append(g.seq)
    base = len(raws)
    raws += [ch.revoke(s).raw for s in grants]
    root = ch.root.public_key
    out: dict[int, dict[str, int]] = {}
    for keep in (("device", {records.ROLE_OPERATOR}), ("full", None)):
        st = LedgerState(root, origin=ch.origin, keep_roles=keep[1])
        for r in raws[:base]:
            st.apply(r, prechecked=(root, True))
        s0 = len(st.snapshot())
        done = 0
        for n in sorted(ns):
            for r in raws[base + done : base + n]:
                st.apply(r, prechecked=(root, True))
            done = n
            out.setdefault(n, {})[keep[0]] = len(st.snapshot()) - s0
    return out


# --- X.509 CRL and OpenSSH KRL ----------------------------------------------------------------


def crl_sizes(ns: list[int]) -> dict[int, int]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.x509.oid import NameOID

    key = ed25519.Ed25519PrivateKey.generate()
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Plant 7 Device CA")])
    out: dict[int, int] = {}
    for n in ns:
        b = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(name)
            .last_update(now)
            .next_update(now + datetime.timedelta(days=7))
            .add_extension(x509.CRLNumber(n), critical=False)
        )
        for _ in range(n):
            b = b.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(x509.random_serial_number())
                .revocation_date(now)
                .add_extension(x509.CRLReason(x509.ReasonFlags.key_compromise), critical=False)
                .build()
            )
        crl = b.sign(key, None)
        out[n] = len(crl.public_bytes(serialization.Encoding.DER))
    return out


def x509_leaf_size() -> int:
    """DER bytes of an Ed25519 device certificate an Ed25519 CA would issue (the grant's counterpart)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca = ed25519.Ed25519PrivateKey.generate()
    leaf = ed25519.Ed25519PrivateKey.generate().public_key()
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Plant 7 Device CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tablet-07")]))
        .issuer_name(issuer)
        .public_key(leaf)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(leaf), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key()), critical=False)
        .sign(ca, None)
    )
    return len(cert.public_bytes(serialization.Encoding.DER))


def _ssh_key_line() -> str:
    def s(b: bytes) -> bytes:
        return len(b).to_bytes(4, "big") + b

    blob = s(b"ssh-ed25519") + s(os.urandom(32))
    return "ssh-ed25519 " + base64.b64encode(blob).decode()


def krl_sizes(ns: list[int], work: Path) -> dict[int, dict[str, int]] | None:
    exe = shutil.which("ssh-keygen")
    if exe is None:
        return None
    d = work / "krl"
    d.mkdir(exist_ok=True)
    ca = d / "ca"
    subprocess.run(
        [exe, "-q", "-t", "ed25519", "-N", "", "-C", "ca", "-f", str(ca)], check=True, capture_output=True
    )
    out: dict[int, dict[str, int]] = {}
    for n in ns:
        out[n] = {}
        specs = {
            "serial_random": "".join(
                f"serial: {int.from_bytes(os.urandom(8), 'big') >> 1}\n" for _ in range(n)
            ),
            "serial_sequential": f"serial: 1-{n}\n" if n > 1 else "serial: 1\n",
            "key": "".join(f"key: {_ssh_key_line()}\n" for _ in range(n)),
        }
        for kind, text in specs.items():
            spec = d / f"{kind}-{n}.txt"
            spec.write_text(text)
            krl = d / f"{kind}-{n}.krl"
            krl.unlink(missing_ok=True)
            args = [exe, "-k", "-f", str(krl)]
            if kind != "key":
                args += ["-s", str(ca) + ".pub"]
            subprocess.run([*args, str(spec)], check=True, capture_output=True, timeout=120)
            out[n][kind] = krl.stat().st_size
    return out


# --- the module -------------------------------------------------------------------------------


def run(cfg: Config) -> Result:
    from bench.harness import module_result

    res = module_result("sizes", "Sizes on the wire and at rest", COMMAND + (" --quick" if cfg.quick else ""))
    cmd = res["command"]
    ns: list[int] = cfg.pick([1, 100, 1000], [1, 100, 1000, 10_000])
    t0 = time.monotonic()
    rs = record_sizes()
    dl = download_per_revoke(cfg)
    growth = state_growth(ns)
    crl = crl_sizes(ns)
    krl = krl_sizes(ns, cfg.work)
    res["raw"] = {
        "records": rs,
        "download": dl,
        "state": {str(k): v for k, v in growth.items()},
        "crl": crl,
        "krl": krl,
        "seconds": round(time.monotonic() - t0, 1),
    }
    big = max(ns)
    per_crl_entry = round((crl[big] - crl[1]) / (big - 1), 1)
    res["figures"].append(
        figure(
            "sizes.revoke_record",
            "a revoke record (by grant seq, reason, signed)",
            rs["revoke"],
            "bytes",
            command=cmd,
            comparable=ref(
                "one entry of an Ed25519-signed X.509 CRL (random serial, date, reason code), DER",
                per_crl_entry,
                "bytes",
                f"measured in this run: (CRL({big:,}) - CRL(1)) / {big - 1:,}, built with pyca/cryptography",
            ),
            note=(
                f"a revoke by key (32-byte subject) is {rs['revoke_key']} bytes; "
                "a CRL entry carries no signature of its own"
            ),
        )
    )
    res["figures"].append(
        figure(
            "sizes.grant_record",
            'a grant record (operator "tablet-07", 32-byte key, signed)',
            rs["grant"],
            "bytes",
            command=cmd,
            comparable=ref(
                "the X.509 certificate it stands in for: Ed25519 leaf signed by an Ed25519 CA (CN, "
                "key usage, "
                "EKU clientAuth, SKI, AKI), DER",
                x509_leaf_size(),
                "bytes",
                "measured in this run (pyca/cryptography)",
            ),
        )
    )
    res["figures"].append(
        figure(
            "sizes.download_sse",
            "a device in sync downloads one revocation over SSE (records event + checkpoint event, "
            "wire bytes)",
            dl["sse_wire"],
            "bytes",
            command=cmd,
            comparable=ref(
                "the full X.509 CRL a device re-downloads for one more revocation when 1,000 are listed",
                crl.get(1000),
                "bytes",
                "measured in this run (pyca/cryptography, Ed25519)",
            ),
            note=f"of which the records event is {dl['sse_records_event']} bytes (base64 in JSON)",
        )
    )
    res["figures"].append(
        figure(
            "sizes.download_sse_compact",
            "... over SSE in the compact format (?format=compact: one event, records + checkpoint), "
            "wire bytes",
            dl["sse_compact_wire"],
            "bytes",
            command=cmd,
            comparable=ref(
                "the standard format for the same revocation (records event + checkpoint event)",
                dl["sse_wire"],
                "bytes",
                "measured in this run, on the same server, for the same revoke",
            ),
            note=(
                f"of which the event is {dl['sse_compact_payload']} bytes; the rest is chunked "
                "transfer framing; no witnesses configured (one signature line)"
            ),
        )
    )
    tiles_total = dl["checkpoint_body"] + dl["bundle_body"]
    res["figures"].append(
        figure(
            "sizes.download_tiles",
            f"... via tiles: GET /checkpoint + the partial entry bundle (width {dl['bundle_width']}), bodies",
            tiles_total,
            "bytes",
            command=cmd,
            comparable=ref(
                "the OpenSSH KRL of 1,000 revoked keys a host re-downloads",
                krl[1000]["key"] if krl and 1000 in krl else None,
                "bytes",
                "measured in this run (ssh-keygen -k)",
            ),
            note=(
                f"checkpoint {dl['checkpoint_body']} B + bundle {dl['bundle_body']} B; HTTP headers add "
                f"{dl['checkpoint_headers']} + {dl['bundle_headers']} B. The partial bundle "
                "carries every record of "
                f"its 256-record tile so far: {dl['checkpoint_body'] + dl['bundle_mean_body']} B "
                "on average over "
                "positions in the tile"
            ),
        )
    )
    poll_total = dl["poll_checkpoint_body"] + dl["poll_records_body"]
    res["figures"].append(
        figure(
            "sizes.download_poll",
            "... polling in sync: GET /checkpoint + GET /v1/records?start=S&limit=1 (a small gap), bodies",
            poll_total,
            "bytes",
            command=cmd,
            comparable=ref(
                "the same poll through tiles (checkpoint + partial entry bundle), bodies",
                tiles_total,
                "bytes",
                "measured in this run, same server, same revoke",
            ),
            note=(
                f"checkpoint {dl['poll_checkpoint_body']} B + records {dl['poll_records_body']} B; "
                f"HTTP headers add {dl['poll_headers']} B. Gaps of a tile width or more are read as tiles"
            ),
        )
    )
    per1000 = growth[1000]["device"] if 1000 in growth else None
    res["figures"].append(
        figure(
            "sizes.state_per_revocation",
            "device state growth per revoked credential (snapshot, device keeping operator grants)",
            (per1000 or 0) / 1000,
            "bytes",
            command=cmd,
            comparable=ref(
                "the same credential as a CRL entry (the CRL is the relying party's whole state)",
                per_crl_entry,
                "bytes",
                "measured in this run",
            ),
            note=f"{per1000} bytes per 1,000 revocations; a full mirror grows {growth[1000]['full']} bytes",
        )
    )
    rows: list[list[Any]] = []
    for n in ns:
        rows.append(
            [
                f"{n:,}",
                f"{n * rs['revoke']:,}",
                f"{growth[n]['device']:,}",
                f"{crl[n]:,}",
                f"{krl[n]['serial_random']:,}" if krl else "n/a",
                f"{krl[n]['serial_sequential']:,}" if krl else "n/a",
                f"{krl[n]['key']:,}" if krl else "n/a",
            ]
        )
    res["tables"].append(
        table(
            "N revocations, side by side (bytes)",
            [
                "N",
                "Writ revoke records",
                "Writ device state growth",
                "X.509 CRL (DER, Ed25519)",
                "OpenSSH KRL, random 64-bit serials",
                "OpenSSH KRL, serials 1..N",
                "OpenSSH KRL, N keys",
            ],
            rows,
            note=(
                "A CRL or KRL is re-downloaded whole at every update (delta CRLs aside); a Writ device in "
                f"sync downloads only the new records and one checkpoint (~{dl['sse_wire']} B over "
                "SSE for one "
                "revoke). The CRL carries a reason code per entry, as the Baseline Requirements "
                "require since "
                "2023; the KRL carries none. Writ revokes by grant seq, so the sequential-serial "
                "KRL (a bitmap) "
                "is the like-for-like compact encoding; the device state keeps the revoked seq as "
                "one bit plus "
                "the revocation's details for credentials it tracks."
            ),
        )
    )
    if krl is None:
        res["notes"].append("ssh-keygen is not installed: the KRL columns are missing")
    return res


def main(argv: list[str] | None = None) -> Result:
    return module_main("sizes", run, argv, __doc__)


if __name__ == "__main__":
    main()
