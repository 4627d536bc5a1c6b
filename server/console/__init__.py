"""The console: a browser front end for the admin API and a playground, served by the plane itself.

Plain HTML, CSS and ES modules shipped in the package (static/), no framework and no build step: the plane pays
nothing for it at start (the modules that serve it are imported on the first console request, the files read on
the first page load) and nothing on the request path (its routes are only matched when asked for). Every page
calls the same admin API the CLI calls, with the session cookie and the X-CSRF-Token header (server.accounts).
The few endpoints only the console needs (charts, the request a playground answer was, a provider's connection
test) live here, under /admin/v1/.

    pages.py   the shell and its assets, with the Content-Security-Policy and the other headers
    stats.py   GET /admin/v1/console/stats, /info, /requests/{id}
    probe.py   POST /admin/v1/providers/{ref}/test
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _on_first_use(module: str, name: str) -> Handler:
    """A handler that imports its module when first called: a plane nobody opens the console of never loads it."""

    async def handler(request: web.Request) -> web.StreamResponse:
        target: Handler = getattr(importlib.import_module(f"server.console.{module}"), name)
        return await target(request)

    handler.__name__ = handler.__qualname__ = name
    handler.__doc__ = f"server.console.{module}.{name}"
    return handler


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", _on_first_use("pages", "to_console"))
    app.router.add_get("/console", _on_first_use("pages", "to_console"))
    app.router.add_get("/console/", _on_first_use("pages", "index"))
    # Where invitation links point (server.accounts.http.INVITATION_PAGE): the same shell, which reads the token.
    app.router.add_get("/console/accept", _on_first_use("pages", "index"))
    app.router.add_get("/console/assets/{version}/{path:.+}", _on_first_use("pages", "asset"))
    app.router.add_get("/admin/v1/console/stats", _on_first_use("stats", "overview"))
    app.router.add_get("/admin/v1/console/info", _on_first_use("stats", "info"))
    app.router.add_get("/admin/v1/console/requests/{request_id}", _on_first_use("stats", "request_row"))
    app.router.add_post("/admin/v1/providers/{ref}/test", _on_first_use("probe", "test_provider"))
