"""Run by tests/test_witness_e2e.py under a Python >= 3.12 venv with aics-tlog.

An independent C2SP implementation plays the log: aics-tlog builds the tree,
signs the checkpoints and computes the consistency proofs; the request bodies
follow the text of c2sp.org/tlog-witness; aics-tlog verifies the witness's
cosignatures (type 0x04). Nothing of Writ is imported here.

    python aics_witness_interop.py keys ORIGIN            -> {"seed", "log_vkey"}
    python aics_witness_interop.py run ORIGIN SEED URL WITNESS_VKEY -> {"results": [...]}
"""

from __future__ import annotations

import base64
import json
import os
import sys
import urllib.error
import urllib.request

from aics_tlog import MerkleTree
from aics_tlog.checkpoint import Checkpoint, sign_checkpoint, verify_checkpoint
from aics_tlog.note import Note, SignatureLine, format_vkey, parse_note, parse_vkey, vkey_from_ed25519
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def post(url: str, body: bytes) -> tuple[int, str, str]:
    req = urllib.request.Request(url + "/add-checkpoint", data=body, method="POST")  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - a local test URL
            status: int = resp.status
            return status, resp.headers.get("Content-Type", ""), resp.read().decode("utf-8")
    except urllib.error.HTTPError as e:
        return e.code, str(e.headers.get("Content-Type", "")), e.read().decode("utf-8")


def main() -> None:
    mode, origin = sys.argv[1], sys.argv[2]
    if mode == "keys":
        new_seed = os.urandom(32)
        new_key = Ed25519PrivateKey.from_private_bytes(new_seed)
        vkey = vkey_from_ed25519(origin, new_key.public_key().public_bytes_raw())
        print(json.dumps({"seed": new_seed.hex(), "log_vkey": format_vkey(vkey)}))
        return
    seed, url, witness_vkey = sys.argv[3], sys.argv[4], sys.argv[5]
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(seed))
    log_vkey = vkey_from_ed25519(origin, key.public_key().public_bytes_raw())
    wkey = parse_vkey(witness_vkey)
    tree = MerkleTree()
    results: list[dict[str, object]] = []
    old = 0
    for size in (3, 10, 10, 37):
        while tree.size < size:
            tree.append(os.urandom(20))
        cp = Checkpoint(origin=origin, size=tree.size, root=tree.root())
        note = sign_checkpoint(cp, key, origin)
        proof = [] if old in (0, tree.size) else tree.consistency_proof(old, tree.size)
        # "an old size line, zero or more consistency proof lines, and an empty line,
        # followed by a checkpoint"
        body = f"old {old}\n" + "".join(b64(h) + "\n" for h in proof) + "\n" + note.serialise()
        status, ctype, text = post(url, body.encode("utf-8"))
        entry: dict[str, object] = {"size": size, "old": old, "status": status, "content_type": ctype}
        if status == 200:
            # "the client MAY concatenate it to the checkpoint, and use a note verification function"
            full = parse_note(note.serialise() + text)
            res = verify_checkpoint(full, log_vkey, [wkey], 1)
            entry.update(ok=res.ok, error=res.error, witnesses=res.witnesses, timestamps=res.timestamps)
            old = tree.size
        results.append(entry)
    # a wrong old size: 409 text/x.tlog.size with the witness's size
    head = sign_checkpoint(Checkpoint(origin=origin, size=tree.size, root=tree.root()), key, origin)
    status, ctype, text = post(url, ("old 5\n\n" + head.serialise()).encode())
    results.append({"status": status, "content_type": ctype, "body": text})
    # a tampered cosignature must fail under aics-tlog: the check is not vacuous
    note = sign_checkpoint(Checkpoint(origin=origin, size=tree.size, root=tree.root()), key, origin)
    status, _, text = post(url, f"old {old}\n\n{note.serialise()}".encode())
    line = parse_note(note.serialise() + text).signatures[-1]
    bad = SignatureLine(line.name, line.key_id, line.signature[:8] + bytes(64))
    res = verify_checkpoint(Note(note.text, (*note.signatures, bad)), log_vkey, [wkey], 1)
    results.append({"tampered_ok": res.ok, "status": status})
    print(json.dumps({"results": results}))


if __name__ == "__main__":
    main()
