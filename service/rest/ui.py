"""The web page at ``/ui``: static assets served by propserve itself (no build step, no CDN).

The page calls the same ``/v1`` API as any client, with the token the user enters; the
assets themselves hold no data, so they are served without a token (see docs/ui.md).
Only the files named in :data:`ASSETS` are served: a name from the path is looked up in that
table, never joined to a folder, so no path can reach another file.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib.resources import files

from fastapi import APIRouter, Request, Response
from starlette.exceptions import HTTPException

#: The page's files (package data beside this module, in ui/) and their content types.
ASSETS: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}

#: Everything the page loads comes from this server: no inline script, no other origin.
_HEADERS = {
    "content-security-policy": (
        "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
        "form-action 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    # NOTE: revalidate every time (a 304 when unchanged), so an upgraded server never runs
    # an old app.js against a new API.
    "cache-control": "no-cache",
}


@dataclass(frozen=True)
class _Asset:
    body: bytes
    media_type: str
    etag: str


@cache
def _asset(name: str) -> _Asset:
    body = files("propserve.service.rest").joinpath("ui", name).read_bytes()
    return _Asset(body, ASSETS[name], f'"{hashlib.sha256(body).hexdigest()[:32]}"')


def _answer(name: str, request: Request) -> Response:
    asset = _asset(name)
    headers = {**_HEADERS, "etag": asset.etag}
    if asset.etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    # A HEAD's body is dropped by the server, which keeps the length.
    return Response(asset.body, media_type=asset.media_type, headers=headers)


router = APIRouter(prefix="/ui", include_in_schema=False)


@router.api_route("", methods=["GET", "HEAD"])
@router.api_route("/", methods=["GET", "HEAD"])
async def page(request: Request) -> Response:
    return _answer("index.html", request)


@router.api_route("/{asset}", methods=["GET", "HEAD"])
async def asset(asset: str, request: Request) -> Response:
    if asset not in ASSETS:
        raise HTTPException(404, f"no such file: /ui/{asset:.80}")
    return _answer(asset, request)
