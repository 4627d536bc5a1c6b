"""The upstream HTTP/1.1 client (server/targets/http.py) against scripted servers on loopback sockets: each server
answers with exact bytes, so framing, keep-alive and failure cases are the real thing, not a library's idea of it.

The plane-level behaviour built on it (failover, timeouts, streams cut short) is covered through the plane in
test_failover.py and test_openai_sdk.py; these pin down the client's own contract (under asyncio's loop, and the
last one under uvloop's, which the plane runs on)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import uvloop

from server.nodes.tls import load_or_create
from server.targets.http import (
    READ_AHEAD_BYTES,
    BodyTooLargeError,
    ConnectError,
    DisconnectedError,
    Endpoint,
    HTTPClient,
    ProtocolError,
)

# What a scripted server does with each connection: the server (to read requests, count them), then the streams.
Script = Callable[["Server", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"ok":true}'


class Server:
    """A loopback server that runs `script` for every connection and counts connections."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []
        self.url = ""
        self.writers: list[asyncio.StreamWriter] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await self.script(self, reader, writer)
        writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.startswith(b"Content-Length"))
        request = head + await reader.readexactly(length)
        self.requests.append(request)
        return request


@contextlib.asynccontextmanager
async def serving(script: Script, tls: ssl.SSLContext | None = None) -> AsyncIterator[Server]:
    server = Server(script)
    listener = await asyncio.start_server(server._serve, "127.0.0.1", 0, ssl=tls)
    port = listener.sockets[0].getsockname()[1]
    server.url = f"{'https' if tls else 'http'}://{'localhost' if tls else '127.0.0.1'}:{port}/v1/chat/completions"
    try:
        yield server
    finally:
        listener.close()
        for writer in server.writers:
            writer.close()
        await listener.wait_closed()
        await asyncio.sleep(0)  # let the handlers see their connections close


@contextlib.asynccontextmanager
async def client(limit_per_origin: int = 256, tls: ssl.SSLContext | None = None) -> AsyncIterator[HTTPClient]:
    http = HTTPClient(limit_per_origin=limit_per_origin, tls=tls)
    try:
        yield http
    finally:
        await http.close()


async def post(http: HTTPClient, url: str, header_timeout_s: float = 5.0) -> tuple[int, bytes]:
    response = await http.post(
        Endpoint.parse(url),
        [("Content-Type", "application/json")],
        b"{}",
        connect_timeout_s=5,
        header_timeout_s=header_timeout_s,
    )
    try:
        return response.status, await response.read(5.0)
    finally:
        response.release()


def answering(*answers: bytes) -> Script:
    """Answer each request, on whichever connection it comes, with the next of `answers`; keep connections open."""
    queue = list(answers)

    async def script(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while queue:
            await server.read_request(reader)
            writer.write(queue.pop(0))
            await writer.drain()
        await reader.read()

    return script


async def test_a_request_is_one_post_with_host_length_and_the_callers_headers() -> None:
    async with serving(answering(OK)) as server, client() as http:
        assert await post(http, server.url) == (200, b'{"ok":true}')
    head, _, body = server.requests[0].partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /v1/chat/completions HTTP/1.1"
    assert b"Host: 127.0.0.1:" + server.url.split(":")[2].split("/")[0].encode() in lines
    assert b"Content-Type: application/json" in lines and b"Content-Length: 2" in lines
    assert b"Accept-Encoding: identity" in lines
    assert body == b"{}"


async def test_a_finished_answer_leaves_its_connection_for_the_next_request() -> None:
    async with serving(answering(OK, OK, OK)) as server, client() as http:
        for _ in range(3):
            assert (await post(http, server.url))[0] == 200
    assert server.connections == 1


async def test_a_chunked_answer_is_read_whole() -> None:
    chunked = b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{"a"\r\n3\r\n:1}\r\n0\r\n\r\n'
    async with serving(answering(chunked, OK)) as server, client() as http:
        assert await post(http, server.url) == (200, b'{"a":1}')
        assert (await post(http, server.url))[0] == 200
    assert server.connections == 1


async def test_an_answer_without_length_ends_where_the_connection_does() -> None:
    async def script(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b'HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{"till":')
        await writer.drain()
        writer.write(b'"close"}')

    async with serving(script) as server, client() as http:
        assert await post(http, server.url) == (200, b'{"till":"close"}')
        assert await post(http, server.url) == (200, b'{"till":"close"}')
    assert server.connections == 2


async def test_a_body_cut_short_is_an_error_not_an_answer() -> None:
    cut = b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"partial":'

    async def script(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(cut)
        await writer.drain()

    async with serving(script) as server, client() as http:
        with pytest.raises(DisconnectedError):
            await post(http, server.url)


async def test_a_connection_closed_before_any_answer_is_a_disconnect() -> None:
    async def script(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)

    async with serving(script) as server, client() as http:
        with pytest.raises(DisconnectedError, match="before the answer's headers"):
            await post(http, server.url)


async def test_bytes_that_are_not_http_are_a_protocol_error() -> None:
    async with serving(answering(b"SMTP ready\r\n\r\n")) as server, client() as http:
        with pytest.raises(ProtocolError):
            await post(http, server.url)


async def test_headers_that_do_not_come_in_time_time_out_and_close_the_connection() -> None:
    closed = asyncio.Event()

    async def script(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        await reader.read()  # until the client closes
        closed.set()

    async with serving(script) as server, client() as http:
        with pytest.raises(TimeoutError):
            await post(http, server.url, header_timeout_s=0.2)
        await asyncio.wait_for(closed.wait(), 5)


async def test_a_port_nobody_listens_on_is_a_connect_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with client() as http:
        with pytest.raises(ConnectError):
            await post(http, f"http://127.0.0.1:{port}/v1/chat/completions")


async def test_an_answer_given_up_half_read_closes_its_connection() -> None:
    half = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    async with serving(answering(half, OK)) as server, client() as http:
        response = await http.post(Endpoint.parse(server.url), [], b"{}", connect_timeout_s=5, header_timeout_s=5)
        async for chunk in response.chunks(5.0):
            assert chunk == b"hello"
            break
        response.release()
        assert (await post(http, server.url))[0] == 200
    assert server.connections == 2


async def test_a_connection_the_server_closed_while_idle_is_not_reused() -> None:
    # Answers, then closes: the server's keep-alive timeout, at its shortest.
    async def script(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(OK)
        await writer.drain()

    async with serving(script) as server, client() as http:
        assert (await post(http, server.url))[0] == 200
        await asyncio.sleep(0.1)
        assert (await post(http, server.url))[0] == 200
    assert server.connections == 2


async def test_requests_beyond_the_connection_limit_wait_for_a_connection() -> None:
    async with serving(answering(OK, OK, OK)) as server, client(limit_per_origin=1) as http:
        results = await asyncio.gather(*(post(http, server.url) for _ in range(3)))
    assert [status for status, _ in results] == [200, 200, 200]
    assert server.connections == 1


async def test_a_cancelled_request_gives_its_place_in_the_pool_back() -> None:
    async def script(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        if server.connections == 1:
            await reader.read()  # the first request never gets an answer
            return
        writer.write(OK)
        await writer.drain()
        await reader.read()

    async with serving(script) as server, client(limit_per_origin=1) as http:
        stuck = asyncio.create_task(post(http, server.url))
        await asyncio.sleep(0.1)
        stuck.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stuck
        assert (await post(http, server.url))[0] == 200


async def test_a_stream_arrives_as_it_is_sent() -> None:
    release = asyncio.Event()

    async def script(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nfirst\n\r\n")
        await writer.drain()
        await release.wait()
        writer.write(b"7\r\nsecond\n\r\n0\r\n\r\n")
        await writer.drain()

    async with serving(script) as server, client() as http:
        response = await http.post(Endpoint.parse(server.url), [], b"{}", connect_timeout_s=5, header_timeout_s=5)
        chunks = []
        async for chunk in response.chunks(5.0):
            chunks.append(chunk)
            release.set()
        response.release()
    assert chunks == [b"first\n", b"second\n"]


async def test_a_stream_that_stalls_times_out() -> None:
    async def script(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nfirst\n\r\n")
        await writer.drain()
        await reader.read()

    async with serving(script) as server, client() as http:
        response = await http.post(Endpoint.parse(server.url), [], b"{}", connect_timeout_s=5, header_timeout_s=5)
        with pytest.raises(TimeoutError):
            async for _ in response.chunks(0.2):
                pass
        response.release()


def stream_ending_late(end_after_s: float) -> Script:
    """The first request gets a chunked stream whose terminating chunk comes `end_after_s` after its last event;
    later ones get OK."""

    async def script(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await server.read_request(reader)
            if len(server.requests) > 1:
                writer.write(OK)
                await writer.drain()
                continue
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nlast\n\r\n")
            await writer.drain()
            await asyncio.sleep(end_after_s)
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    return script


async def read_first_chunk_and_finish(http: HTTPClient, url: str, grace_s: float) -> None:
    response = await http.post(Endpoint.parse(url), [], b"{}", connect_timeout_s=5, header_timeout_s=5)
    async for chunk in response.chunks(5.0):
        assert chunk == b"last\n"
        break
    response.finish(grace_s)


async def test_a_finished_stream_whose_end_comes_late_keeps_its_connection() -> None:
    async with serving(stream_ending_late(0.1)) as server, client(limit_per_origin=1) as http:
        await read_first_chunk_and_finish(http, server.url, grace_s=2.0)
        assert (await post(http, server.url))[0] == 200  # waited for the connection, then reused it
    assert server.connections == 1


async def test_a_finished_stream_whose_end_never_comes_closes_and_frees_its_place() -> None:
    async with serving(stream_ending_late(30)) as server, client(limit_per_origin=1) as http:
        await read_first_chunk_and_finish(http, server.url, grace_s=0.1)
        assert (await post(http, server.url))[0] == 200
    assert server.connections == 2


async def test_a_header_value_with_a_line_break_is_refused_before_sending() -> None:
    async with serving(answering(OK)) as server, client() as http:
        with pytest.raises(ValueError, match="line break"):
            await http.post(
                Endpoint.parse(server.url),
                [("Authorization", "Bearer x\r\nX-Evil: 1")],
                b"{}",
                connect_timeout_s=5,
                header_timeout_s=5,
            )
    assert server.requests == []


async def test_a_body_larger_than_the_read_ahead_bound_is_read_whole() -> None:
    big = b"x" * (4 * READ_AHEAD_BYTES + 17)
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big) + big
    async with serving(answering(answer, OK)) as server, client() as http:
        assert await post(http, server.url) == (200, big)
        assert (await post(http, server.url))[0] == 200  # read to the end: the connection is reused
    assert server.connections == 1


async def read_limited(http: HTTPClient, url: str, limit: int) -> bytes:
    response = await http.post(Endpoint.parse(url), [], b"{}", connect_timeout_s=5, header_timeout_s=5)
    try:
        return await response.read(5.0, limit=limit)
    finally:
        response.release()


@pytest.mark.parametrize("framing", ["content-length", "chunked", "until-close"])
async def test_a_body_past_the_readers_limit_is_refused_and_its_connection_closed(framing: str) -> None:
    big = b"x" * (4 * READ_AHEAD_BYTES)
    if framing == "content-length":
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big) + big
    elif framing == "chunked":
        answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n" % len(big) + big + b"\r\n0\r\n\r\n"
    else:
        answer = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + big
    async with serving(answering(answer, OK)) as server, client() as http:
        with pytest.raises(BodyTooLargeError):
            await read_limited(http, server.url, limit=READ_AHEAD_BYTES)
        assert (await post(http, server.url))[0] == 200
    assert server.connections == 2


async def test_a_body_within_the_readers_limit_is_read_whole() -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n" + b'{"ok":true}'
    async with serving(answering(answer)) as server, client() as http:
        assert await read_limited(http, server.url, limit=11) == b'{"ok":true}'


def certificate(tmp_path: Path) -> Path:
    """A self-signed certificate for localhost (the one the plane makes for its node service)."""
    load_or_create(tmp_path)
    return tmp_path / "node-ca.pem"


async def test_https_upstreams_are_reached_over_verified_tls(tmp_path: Path) -> None:
    cert = certificate(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, tmp_path / "node-ca.key")
    async with (
        serving(answering(OK, OK), tls=server_tls) as server,
        client(tls=ssl.create_default_context(cafile=str(cert))) as http,
    ):
        assert await post(http, server.url) == (200, b'{"ok":true}')
        assert (await post(http, server.url))[0] == 200
    assert server.connections == 1


async def test_a_certificate_nobody_vouches_for_is_a_connect_error(tmp_path: Path) -> None:
    cert = certificate(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, tmp_path / "node-ca.key")
    async with serving(answering(OK), tls=server_tls) as server, client() as http:
        with pytest.raises(ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await post(http, server.url)
    assert server.requests == []


def test_only_http_urls_are_endpoints() -> None:
    with pytest.raises(ValueError):
        Endpoint.parse("ftp://example.com/v1")
    assert Endpoint.parse("https://api.example.com/v1/chat/completions").origin.port == 443
    assert b"Host: example.com:8080\r\n" in Endpoint.parse("http://example.com:8080/v1?x=1").head
    assert Endpoint.parse("http://example.com:8080/v1?x=1").head.startswith(b"POST /v1?x=1 HTTP/1.1\r\n")


def test_under_uvloop_answers_keep_alive_streams_and_timeouts_behave_the_same() -> None:
    async def scenario() -> None:
        await test_a_finished_answer_leaves_its_connection_for_the_next_request()
        await test_a_chunked_answer_is_read_whole()
        await test_a_body_cut_short_is_an_error_not_an_answer()
        await test_headers_that_do_not_come_in_time_time_out_and_close_the_connection()
        await test_a_port_nobody_listens_on_is_a_connect_error()
        await test_a_cancelled_request_gives_its_place_in_the_pool_back()
        await test_a_stream_arrives_as_it_is_sent()

    uvloop.run(scenario())
