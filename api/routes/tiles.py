"""The C2SP tlog-tiles read paths: ``/checkpoint``, hash tiles, entry bundles."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ledger import tiles
from ledger.errors import BadTilePath

from . import _common as c

IMMUTABLE = "public, max-age=31536000, immutable"


async def get_checkpoint(request: Request) -> Response:
    """The latest signed checkpoint note."""
    svc = c.service(request)
    return Response(
        svc.checkpoint.note.encode("utf-8"),
        media_type="text/plain; charset=utf-8",
        headers={"Cache-Control": "no-cache, max-age=2"},
    )


async def get_tile(request: Request) -> Response:
    """``/tile/<L>/<N>[.p/<W>]`` or ``/tile/entries/<N>[.p/<W>]``; 404 beyond the tree."""
    svc = c.service(request)
    path = "tile/" + str(request.path_params["path"])
    tp = tiles.parse_tile_path(path)
    size = svc.checkpoint.size  # serve only what the published checkpoint covers
    if tp.level is None:
        if tiles.tile_width(size, None, tp.index) < tp.width:
            raise BadTilePath(f"entry bundle {tp.index} of width {tp.width} is beyond the tree (size {size})")
        start = tp.index * tiles.TILE_WIDTH
        raws = await svc.read_records(start, start + tp.width)
        if len(raws) != tp.width:
            raise BadTilePath("entry bundle not available")
        data = tiles.encode_entry_bundle(raws)
    else:
        if tiles.tile_width(size, tp.level, tp.index) < tp.width:
            raise BadTilePath(
                f"tile {tp.level}/{tp.index} of width {tp.width} is beyond the tree (size {size})"
            )
        data = svc.levels.tile(tp.level, tp.index, tp.width)
    return Response(data, media_type="application/octet-stream", headers={"Cache-Control": IMMUTABLE})


ROUTES = [
    Route("/checkpoint", get_checkpoint, methods=["GET"]),
    Route("/tile/{path:path}", get_tile, methods=["GET"]),
]
