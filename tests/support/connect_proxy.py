"""A real HTTP proxy on loopback for tests: CONNECT tunnels and absolute-form forwarding, recording what it carried.

It does what an egress proxy (squid, tinyproxy) does for the plane: a CONNECT opens a tunnel to the named host
and port and pipes bytes both ways; a request in absolute form (`POST http://host:port/path`) is forwarded to its
origin in origin form, without its `Proxy-Authorization`. With `credentials`, everything without the matching
`Proxy-Authorization: Basic` gets 407; with `refuse`, every CONNECT gets that status instead of a tunnel.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from types import TracebackType
from urllib.parse import quote, urlsplit


class ConnectProxy:
    def __init__(self, credentials: tuple[str, str] | None = None, refuse: int | None = None) -> None:
        self.credentials = credentials
        self.refuse = refuse
        # `host:port` of every tunnel opened, and the absolute target of every request forwarded.
        self.tunnels: list[str] = []
        self.forwarded: list[str] = []
        # The Proxy-Authorization of every CONNECT and forwarded request, as it arrived (None: absent).
        self.authorizations: list[str | None] = []
        self.connections = 0
        self._server: asyncio.Server | None = None
        self.port = 0
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        # Kept after `stop`: a test may name the proxy that was there.
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> ConnectProxy:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        """The proxy's URL, with its credentials (percent-encoded) when it requires some."""
        userinfo = ""
        if self.credentials:
            userinfo = f"{quote(self.credentials[0], safe='')}:{quote(self.credentials[1], safe='')}@"
        return f"http://{userinfo}127.0.0.1:{self.port}"

    # -- serving ------------------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                head = await reader.readuntil(b"\r\n\r\n")
                if head.startswith(b"CONNECT "):
                    await self._tunnel(head, reader, writer)
                else:
                    await self._forward(head, reader, writer)
        finally:
            self._writers.discard(writer)
            writer.close()

    def _admit(self, headers: dict[str, str], writer: asyncio.StreamWriter) -> bool:
        authorization = headers.get("proxy-authorization")
        self.authorizations.append(authorization)
        if self.credentials is None:
            return True
        expected = "Basic " + base64.b64encode(":".join(self.credentials).encode()).decode()
        if authorization == expected:
            return True
        writer.write(
            b'HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm="test"\r\n'
            b"Content-Length: 0\r\nConnection: close\r\n\r\n"
        )
        return False

    async def _tunnel(self, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, target, headers = _parse(head)
        if not self._admit(headers, writer):
            return
        if self.refuse is not None:
            writer.write(b"HTTP/1.1 %d Refused\r\nContent-Length: 0\r\nConnection: close\r\n\r\n" % self.refuse)
            return
        host, _, port = target.rpartition(":")
        upstream_reader, upstream_writer = await asyncio.open_connection(host.strip("[]"), int(port))
        self.tunnels.append(target)
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await _both_ways(reader, writer, upstream_reader, upstream_writer)

    async def _forward(self, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: tuple[asyncio.StreamWriter, asyncio.Task[None]] | None = None
        try:
            while True:
                method, target, headers = _parse(head)
                if not self._admit(headers, writer):
                    return
                self.forwarded.append(target)
                parts = urlsplit(target)
                if upstream is None:
                    upstream_reader, upstream_writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
                    # Answers go back as they come, unparsed: HTTP/1.1 answers arrive in the order of the requests.
                    upstream = upstream_writer, asyncio.create_task(_pipe(upstream_reader, writer))
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                lines = [f"{method} {parts.path or '/'}{'?' + parts.query if parts.query else ''} HTTP/1.1"]
                lines += [
                    f"{name}: {value}" for name, value in _header_lines(head) if name.lower() != "proxy-authorization"
                ]
                upstream[0].write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
                head = await reader.readuntil(b"\r\n\r\n")
        finally:
            if upstream is not None:
                upstream[0].close()
                upstream[1].cancel()


def _parse(head: bytes) -> tuple[str, str, dict[str, str]]:
    method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
    return method, target, {name.lower(): value for name, value in _header_lines(head)}


def _header_lines(head: bytes) -> list[tuple[str, str]]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    return [(name.strip(), value.strip()) for name, _, value in (line.partition(":") for line in lines if line)]


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


async def _both_ways(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    upstream_reader: asyncio.StreamReader,
    upstream_writer: asyncio.StreamWriter,
) -> None:
    tasks = [asyncio.create_task(_pipe(reader, upstream_writer)), asyncio.create_task(_pipe(upstream_reader, writer))]
    try:
        # One side closing ends the tunnel.
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        upstream_writer.close()
