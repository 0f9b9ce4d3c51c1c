"""``GET /v1/proof/inclusion`` and ``GET /v1/proof/consistency`` (RFC 9162 proofs).

JSON by default. ``Accept: text/plain`` gives, for inclusion, a C2SP
``tlog-proof@v1`` text against the current checkpoint (only for its size),
and for consistency the witness-style lines (one base64 hash per line).
"""

from __future__ import annotations

import base64

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ledger.errors import BadProof

from ..problems import bad_request
from . import _common as c


def _wants_text(request: Request) -> bool:
    accept = request.headers.get("accept", "").lower()
    return "text/plain" in accept and "application/json" not in accept


def _b64(h: bytes) -> str:
    return base64.b64encode(h).decode("ascii")


async def get_inclusion(request: Request) -> Response:
    """The audit path of leaf ``index`` in the tree of ``size`` leaves (default: the checkpoint's)."""
    svc = c.service(request)
    cp = svc.checkpoint
    index = c.query_int(request, "index")
    size = c.query_int(request, "size", cp.size)
    levels = svc.levels
    if size > levels.size:
        raise bad_request(f"size {size} is beyond the tree (size {cp.size})")
    if index >= size:
        raise bad_request(f"leaf {index} is not in a tree of size {size}")
    try:
        proof = levels.inclusion_proof(index, size)
        root = levels.root(size)
        leaf = levels.leaf(index)
    except BadProof as exc:
        raise bad_request(exc.message) from None
    if _wants_text(request):
        if size != cp.size:
            raise bad_request("the text form is for the current checkpoint's size only; ask for JSON")
        text = f"c2sp.org/tlog-proof@v1\nindex {index}\n" + "".join(_b64(h) + "\n" for h in proof)
        text += "\n" + cp.note
        return Response(text.encode("utf-8"), media_type="text/plain; charset=utf-8")
    return c.json_response(
        {
            "index": index,
            "size": size,
            "root": root.hex(),
            "leaf_hash": leaf.hex(),
            "proof": [h.hex() for h in proof],
        }
    )


async def get_consistency(request: Request) -> Response:
    """The proof that the tree of ``old`` leaves is a prefix of the tree of ``new`` (default: now)."""
    svc = c.service(request)
    cp = svc.checkpoint
    old = c.query_int(request, "old", lo=1)
    new = c.query_int(request, "new", cp.size)
    levels = svc.levels
    if new > levels.size or old > new:
        raise bad_request(f"need 1 <= old <= new <= {cp.size}")
    try:
        proof = levels.consistency_proof(old, new)
        old_root, new_root = levels.root(old), levels.root(new)
    except BadProof as exc:
        raise bad_request(exc.message) from None
    if _wants_text(request):
        return Response(
            "".join(_b64(h) + "\n" for h in proof).encode("ascii"), media_type="text/plain; charset=utf-8"
        )
    return c.json_response(
        {
            "old": old,
            "new": new,
            "old_root": old_root.hex(),
            "new_root": new_root.hex(),
            "proof": [h.hex() for h in proof],
        }
    )


ROUTES = [
    Route("/v1/proof/inclusion", get_inclusion, methods=["GET"]),
    Route("/v1/proof/consistency", get_consistency, methods=["GET"]),
]
