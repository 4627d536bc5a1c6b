"""GET /openapi.json (the document, server.openapi.document) and GET /api-reference, a page that renders it.

The page is one static HTML file, a stylesheet and a vanilla ES module (static/), shipped in the package: the
module fetches /openapi.json and renders every operation, its parameters, body and answers. Nothing comes from
another host, and the page runs under a strict Content-Security-Policy (no inline script or style).
"""

from __future__ import annotations

import functools
from pathlib import Path

from aiohttp import web

from server.errors import NotFoundError

STATIC = Path(__file__).parent / "static"
PAGE = "/api-reference"

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # Small files that change with a release: revalidated on every load rather than versioned.
    "Cache-Control": "no-cache",
}
# The page's assets, by the name they are asked for: nothing else under static/ is served.
ASSETS = {"reference.js": "text/javascript", "reference.css": "text/css"}


async def openapi_json(request: web.Request) -> web.Response:
    # Imported on the first request, like the console's modules (server.console): the document names values of
    # every part of the plane, the console's included, which a plane nobody asks for it need not load at start.
    from server.openapi import document

    return web.Response(body=document.body(), content_type="application/json")


@functools.cache
def _file(name: str) -> bytes:
    """A file of static/, read on first use: a plane whose reference nobody opens never reads them."""
    return (STATIC / name).read_bytes()


async def page(request: web.Request) -> web.Response:
    return web.Response(body=_file("index.html"), content_type="text/html", charset="utf-8", headers=SECURITY_HEADERS)


async def asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in ASSETS:
        raise NotFoundError(f"no API reference asset {name!r}")
    return web.Response(body=_file(name), headers={**SECURITY_HEADERS, "Content-Type": ASSETS[name]})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/openapi.json", openapi_json)
    app.router.add_get(PAGE, page)
    app.router.add_get(f"{PAGE}/{{name}}", asset)
