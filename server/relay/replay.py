"""Answers from the response cache (`CacheReplay.replay`): the stored body, or replayed as an SSE stream when the
client asked for one; free (cost 0.0), and recorded as the other answers are."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from server import sse
from server.policy.cache import replay_chunks
from server.relay.accounting import Accounting
from server.relay.exchange import CLIENT_CLOSED, Exchange
from server.relay.stream import sse_response
from server.relay.whole import answer_headers


class CacheReplay:
    """Serves an answer the response cache (server.policy.cache) holds for the request (`replay`)."""

    def __init__(self, accounting: Accounting) -> None:
        self.accounting = accounting

    async def replay(self, request: web.Request, exchange: Exchange, cached: bytes) -> web.StreamResponse:
        """Serve a cached answer: the stored body, or replayed as a stream when the client asked for one."""
        if not exchange.streaming:
            self.accounting.finish(exchange, 200)
            return web.Response(body=cached, content_type="application/json", headers=answer_headers(exchange))
        response = sse_response(exchange)
        status, code = 200, None
        recorded = False
        try:
            await response.prepare(request)
            exchange.first_byte_at = time.monotonic()
            if exchange.responses is not None:
                frames = exchange.responses.replay(cached)
            else:
                payloads = replay_chunks(cached, chat=exchange.chat, include_usage=exchange.wants_usage)
                frames = b"".join(map(sse.frame, payloads)) + sse.DONE_FRAME
            self.accounting.finish(exchange, 200)  # before [DONE] can reach the client (see `Streams.stream`)
            recorded = True
            await response.write_eof(frames)
        except ConnectionResetError:
            status, code = CLIENT_CLOSED, "client_closed"
        except asyncio.CancelledError:
            status, code = CLIENT_CLOSED, "client_closed"
            raise
        finally:
            if not recorded:
                self.accounting.finish(exchange, status, code)
        return response
