"""A TCP proxy on loopback whose connections can be frozen: it stops forwarding in both directions without
closing anything, so neither end sees a reset or a FIN. That is a peer that vanished (a laptop lid shut, a NAT
that forgot the mapping, a cable pulled): only keepalive pings can tell.

Connections opened after a `freeze` forward normally, so a peer that reconnects gets through.
"""

from __future__ import annotations

import asyncio
import contextlib

CHUNK = 64 * 1024


class FreezingProxy:
    """Parameters: `target` (HOST:PORT) to forward to. Start on a running loop; `address` is where to dial."""

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.address = ""
        self.connections = 0
        self._server: asyncio.Server | None = None
        # One event per open connection: cleared, that connection forwards nothing.
        self._flowing: list[asyncio.Event] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.address = f"127.0.0.1:{port}"

    def freeze(self) -> None:
        """Stop forwarding on every open connection, leaving the sockets open."""
        for flowing in self._flowing:
            flowing.clear()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.close()
            return
        self._writers += [client_writer, upstream_writer]
        flowing = asyncio.Event()
        flowing.set()
        self._flowing.append(flowing)
        for reader, writer in ((client_reader, upstream_writer), (upstream_reader, client_writer)):
            task = asyncio.get_running_loop().create_task(self._pump(reader, writer, flowing))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, flowing: asyncio.Event) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(CHUNK):
                await flowing.wait()  # frozen: the bytes are held, and nothing more is read
                writer.write(data)
                await writer.drain()
            if flowing.is_set():
                writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            await self._server.wait_closed()
