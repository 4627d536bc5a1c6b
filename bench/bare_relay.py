"""The floor of any Python gateway: receive, forward on one pooled session, relay the bytes. Nothing else.

    python bench/bare_relay.py --upstream http://127.0.0.1:PORT [--port 0]

Every request's method, path, query, body, Authorization and Content-Type go to the upstream origin as they
came; an SSE answer is relayed chunk by chunk as it arrives, any other answer whole. No auth, routing,
limits, accounting or failover: what Hatchway adds on top of this is its own cost.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)
FORWARDED = ("Authorization", "Content-Type")


async def relay(request: web.Request) -> web.StreamResponse:
    session = request.app[SESSION]
    headers = {name: request.headers[name] for name in FORWARDED if name in request.headers}
    body = await request.read()
    async with session.request(
        request.method, request.app[UPSTREAM] + request.path_qs, data=body, headers=headers
    ) as upstream:
        content_type = upstream.headers.get("Content-Type", "application/octet-stream")
        if not content_type.startswith("text/event-stream"):
            return web.Response(status=upstream.status, body=await upstream.read(), content_type=content_type)
        response = web.StreamResponse(status=upstream.status, headers={"Content-Type": content_type})
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def session_ctx(app: web.Application) -> AsyncIterator[None]:
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=None)
    app[SESSION] = aiohttp.ClientSession(connector=connector, skip_auto_headers=("User-Agent",))
    yield
    await app[SESSION].close()


async def serve(upstream: str, host: str, port: int) -> None:
    app = web.Application()
    app[UPSTREAM] = upstream.rstrip("/")
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", relay)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=4096).start()
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stopping.set)
    print(f"bare relay listening on http://{host}:{runner.addresses[0][1]}", flush=True)
    try:
        await stopping.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", required=True, help="origin to forward to, e.g. http://127.0.0.1:8081")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    import uvloop

    uvloop.run(serve(args.upstream, args.host, args.port))


if __name__ == "__main__":
    main()
