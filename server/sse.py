"""Server-sent events: splitting an upstream byte stream into data payloads, and framing our own."""

from __future__ import annotations

from collections.abc import Mapping

import orjson

DONE = b"[DONE]"


class EventSplitter:
    """The data payload of each event, from bytes fed as they arrive: `feed` returns the events a read completed
    (those that arrived together, which a relay can forward in one write), `end` what the stream's end completes.
    Comments, `event:`/`id:` fields and empty events are skipped; a multi-line `data:` is joined with newlines as
    the SSE spec says. Plain code rather than a generator over the reads: a stream's events pass through several
    layers, and each generator layer cost more per event than the splitting itself."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[bytes]:
        buffer = self._buffer + data if self._buffer else data
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        *events, self._buffer = buffer.split(b"\n\n")
        payloads = [event[6:] for event in events if event[:6] == b"data: "]
        # The usual events, one `data:` line each, are done; anything else (comments, fields, multi-line data)
        # takes the general path.
        if len(payloads) == len(events) and buffer.count(b"\n", 0, len(buffer) - len(self._buffer)) == 2 * len(events):
            return payloads
        return [payload for event in events if (payload := _event_data(event)) is not None]

    def end(self) -> list[bytes]:
        rest, self._buffer = self._buffer, b""
        payload = _event_data(rest) if rest.strip() else None
        return [] if payload is None else [payload]


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
