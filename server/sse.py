"""Server-sent events: splitting an upstream byte stream into data payloads, and framing our own."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Mapping

import orjson

DONE = b"[DONE]"


async def iter_batches(chunks: AsyncIterable[bytes]) -> AsyncIterator[list[bytes]]:
    """The data payload of each event, in a list per network read: the events that arrived together, which a
    relay can forward in one write. Comments, `event:`/`id:` fields and empty events are skipped; a multi-line
    `data:` is joined with newlines as the SSE spec says."""
    buffer = b""
    async for chunk in chunks:
        buffer += chunk
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        *events, buffer = buffer.split(b"\n\n")
        batch = [data for event in events if (data := _event_data(event)) is not None]
        if batch:
            yield batch
    if buffer.strip():
        data = _event_data(buffer)
        if data is not None:
            yield [data]


def _event_data(event: bytes) -> bytes | None:
    if event.startswith(b"data: ") and b"\n" not in event:
        return event[6:]  # the usual event: one `data:` line
    lines = [line for line in event.split(b"\n") if line.startswith(b"data:")]
    if not lines:
        return None
    parts = [line[6:] if line.startswith(b"data: ") else line[5:] for line in lines]
    return b"\n".join(parts)


def frame(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


DONE_FRAME = frame(DONE)


def error_frame(envelope: Mapping[str, object]) -> bytes:
    return frame(orjson.dumps(envelope))
