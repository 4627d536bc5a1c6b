"""The console's files: one HTML shell and its assets, served from the package with strict headers.

The shell names its assets under a version (a hash of every file in static/), so assets can be cached for good
(`immutable`) and a new release is fetched at once; the shell itself is revalidated on every load. The hash is
computed at the first page load, not at start: a plane whose console nobody opens never reads these files.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from aiohttp import web

from server.errors import NotFoundError

STATIC = Path(__file__).parent / "static"

# No inline script or style anywhere, no host but the plane, never framed (clickjacking), no <base> games, forms
# post only here. data: images are the SVG charts' exported copies.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
}
# Asset URLs change with their content: a browser keeps them for a year without asking again.
ASSET_CACHE = "public, max-age=31536000, immutable"
# An asset asked for under another version (an older shell still open): served, but not kept.
STALE_ASSET_CACHE = "no-cache"
SHELL_CACHE = "no-cache"
ASSET_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml", ".png": "image/png"}


class _Assets:
    """What static/ holds, read once on first use: the shell (with the version filled in) and the version."""

    def __init__(self) -> None:
        self._version: str | None = None
        self._shell: bytes | None = None

    def _load(self) -> None:
        digest = hashlib.sha256()
        for path in sorted(p for p in STATIC.rglob("*") if p.is_file()):
            digest.update(path.relative_to(STATIC).as_posix().encode())
            digest.update(path.read_bytes())
        self._version = digest.hexdigest()[:12]
        template = (STATIC / "index.html").read_text(encoding="utf-8")
        self._shell = template.replace("{{assets}}", f"/console/assets/{self._version}").encode()

    @property
    def version(self) -> str:
        if self._version is None:
            self._load()
        assert self._version is not None
        return self._version

    @property
    def shell(self) -> bytes:
        if self._shell is None:
            self._load()
        assert self._shell is not None
        return self._shell


ASSETS = _Assets()


async def to_console(request: web.Request) -> web.Response:
    # Returned, not raised: the middleware renders raised HTTP exceptions as API errors.
    return web.Response(status=302, headers={"Location": "/console/", **SECURITY_HEADERS})


async def index(request: web.Request) -> web.Response:
    headers = {**SECURITY_HEADERS, "Cache-Control": SHELL_CACHE}
    return web.Response(body=ASSETS.shell, content_type="text/html", charset="utf-8", headers=headers)


async def asset(request: web.Request) -> web.FileResponse:
    relative = request.match_info["path"]
    path = (STATIC / relative).resolve()
    # Only files under static/, never the shell by another name, never a dotfile or a path that climbs out.
    if (
        not path.is_relative_to(STATIC.resolve())
        or not path.is_file()
        or path.suffix not in ASSET_TYPES
        or any(part.startswith(".") for part in Path(relative).parts)
    ):
        raise NotFoundError(f"no console asset {relative!r}")
    cache = ASSET_CACHE if request.match_info["version"] == ASSETS.version else STALE_ASSET_CACHE
    headers = {**SECURITY_HEADERS, "Cache-Control": cache, "Content-Type": ASSET_TYPES[path.suffix]}
    return web.FileResponse(path, headers=headers)
