"""The Responses event stream: built from a chat completion chunk stream (a target without the Responses API),
or from a whole Response (a cached answer replayed as a stream).

Events, in OpenAI's order, each with its `sequence_number` from 0:

    response.created, response.in_progress                      once the first chunk is in (its model, created)
    per output item, one at a time:
      response.output_item.added
      message:       response.content_part.added, response.output_text.delta ... (response.refusal.delta ...),
                     response.output_text.done (refusal.done), response.content_part.done
      function_call: response.function_call_arguments.delta ..., response.function_call_arguments.done
      reasoning:     response.reasoning_text.delta ..., response.reasoning_text.done
      response.output_item.done
    response.completed (or response.incomplete, after finish_reason length or content_filter)

An item is done when the next one begins (reasoning, then text, then tool calls, as chat servers send them) or
when the choice finishes. The closing event waits for the usage chunk that follows the finish, and goes out at the
end of the stream when none comes. Chat tool calls arrive one after another (OpenAI's, vLLM's, llama.cpp's
streams): one that resumes after the next began cannot be placed in the Responses order and fails the stream.

A chunk that is not JSON, or an error event, is passed on as it came: the relay counts and skips the one, and
fails over or ends the stream on the other, exactly as for chat.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from server.errors import UpstreamProtocolError
from server.responses import answer
from server.targets.base import TargetStream


def frame(payload: bytes, kind: Any) -> bytes:
    """One SSE event in OpenAI's Responses framing: `event: TYPE` then the data. A type that could break the
    framing (not a string, or holding a line break) goes without its event line; the data still names it."""
    if isinstance(kind, str) and "\n" not in kind and "\r" not in kind:
        return b"event: " + kind.encode() + b"\ndata: " + payload + b"\n\n"
    return b"data: " + payload + b"\n\n"


@dataclass
class _Item:
    """An output item being streamed."""

    index: int
    item: dict[str, Any]
    # The text streamed so far: the current content part's (a message), the arguments (a call), the reasoning.
    text: list[str] = field(default_factory=list)
    # A message's finished content parts, and the type of the one open (output_text or refusal; None: none open).
    parts: list[dict[str, Any]] = field(default_factory=list)
    part: str | None = None
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    # A function call's index among the chat tool calls.
    call: int | None = None


class Translator:
    """Chat completion chunks in, Responses events out (as dicts, numbered). One per stream."""

    def __init__(self, body: dict[str, Any], response_id: str) -> None:
        self.body = body
        self.response_id = response_id
        self.sequence = 0
        self.response: dict[str, Any] | None = None
        self.output: list[dict[str, Any]] = []
        self.open: _Item | None = None
        # Chat tool call index -> whether its item is still open (a closed one cannot take more arguments).
        self.calls: dict[int, _Item] = {}
        self.finish: str | None = None
        self.usage: dict[str, Any] | None = None
        self.ended = False

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, **fields, "sequence_number": self.sequence}
        self.sequence += 1
        return event

    # -- chunks in -------------------------------------------------------------------------------------

    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if self.response is None:
            self.response = answer.shell(self.body, self.response_id, chunk.get("model"), chunk.get("created"))
            events.append(self._event("response.created", response=self.response))
            events.append(self._event("response.in_progress", response=self.response))
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue  # a translated request asks for one choice
            delta = answer.mapping(choice.get("delta"))
            reasoning = answer.reasoning_text(delta)
            if reasoning:
                events += self._reasoning(reasoning)
            content, refusal = delta.get("content"), delta.get("refusal")
            if isinstance(content, str) and content:
                events += self._text("output_text", content, answer.logprobs(choice.get("logprobs")))
            if isinstance(refusal, str) and refusal:
                events += self._text("refusal", refusal, [])
            for call in delta.get("tool_calls") or ():
                if isinstance(call, dict):
                    events += self._call(call)
            if isinstance(delta.get("function_call"), dict):
                events += self._call({"index": 0, "function": delta["function_call"]})
            if choice.get("finish_reason"):
                self.finish = str(choice["finish_reason"])
        if self.finish is not None and self.usage is not None and not self.ended:
            events += self._end()
        return events

    def close(self) -> list[dict[str, Any]]:
        """The chunk stream ended: the closing events, when the choice finished and they are still due."""
        if self.finish is None or self.ended:
            return []
        return self._end()

    # -- items -----------------------------------------------------------------------------------------

    def _begin(self, item: dict[str, Any]) -> tuple[_Item, list[dict[str, Any]]]:
        events = self._close_open()
        opened = _Item(len(self.output), item)
        self.output.append(item)
        self.open = opened
        events.append(self._event("response.output_item.added", output_index=opened.index, item=dict(item)))
        return opened, events

    def _reasoning(self, text: str) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        item = self.open
        if item is None or item.item["type"] != "reasoning":
            item, events = self._begin(answer.reasoning_item(answer.new_id("rs"), "", "in_progress"))
        item.text.append(text)
        events.append(
            self._event(
                "response.reasoning_text.delta",
                item_id=item.item["id"],
                output_index=item.index,
                content_index=0,
                delta=text,
            )
        )
        return events

    def _text(self, part: str, text: str, logprobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        item = self.open
        if item is None or item.item["type"] != "message":
            item, events = self._begin(answer.message_item(answer.new_id("msg"), [], "in_progress"))
        if item.part != part:
            events += self._close_part(item)
            item.part = part
            empty = answer.text_part("") if part == "output_text" else answer.refusal_part("")
            events.append(
                self._event(
                    "response.content_part.added",
                    item_id=item.item["id"],
                    output_index=item.index,
                    content_index=len(item.parts),
                    part=empty,
                )
            )
        item.text.append(text)
        where = {"item_id": item.item["id"], "output_index": item.index, "content_index": len(item.parts)}
        if part == "output_text":
            item.logprobs += logprobs
            events.append(self._event("response.output_text.delta", **where, delta=text, logprobs=logprobs))
        else:
            events.append(self._event("response.refusal.delta", **where, delta=text))
        return events

    def _call(self, call: dict[str, Any]) -> list[dict[str, Any]]:
        index = call.get("index", 0)
        function = answer.mapping(call.get("function"))
        arguments = answer.string(function.get("arguments"))
        events: list[dict[str, Any]] = []
        item = self.calls.get(index) if isinstance(index, int) else None
        if item is None:
            call_id = answer.string(call.get("id")) or answer.new_id("call")
            fresh = answer.function_call_item(
                answer.new_id("fc"), call_id, answer.string(function.get("name")), "", "in_progress"
            )
            item, events = self._begin(fresh)
            item.call = index if isinstance(index, int) else len(self.calls)
            self.calls[item.call] = item
        elif item is not self.open:
            raise UpstreamProtocolError("tool call deltas resumed a call after the next one began")
        elif isinstance(function.get("name"), str) and function["name"]:
            item.item["name"] += function["name"]  # a server that streams the name in pieces
        if arguments:
            item.text.append(arguments)
            events.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=item.item["id"],
                    output_index=item.index,
                    delta=arguments,
                )
            )
        return events

    def _close_part(self, item: _Item) -> list[dict[str, Any]]:
        if item.part is None:
            return []
        text = "".join(item.text)
        index = len(item.parts)
        where = {"item_id": item.item["id"], "output_index": item.index, "content_index": index}
        if item.part == "output_text":
            part = answer.text_part(text, item.logprobs)
            done = self._event("response.output_text.done", **where, text=text, logprobs=item.logprobs)
        else:
            part = answer.refusal_part(text)
            done = self._event("response.refusal.done", **where, refusal=text)
        item.parts.append(part)
        item.part, item.text, item.logprobs = None, [], []
        return [done, self._event("response.content_part.done", **where, part=part)]

    def _close_open(self) -> list[dict[str, Any]]:
        item, self.open = self.open, None
        if item is None:
            return []
        status = "incomplete" if self.finish in ("length", "content_filter") else "completed"
        kind = item.item["type"]
        where = {"item_id": item.item["id"], "output_index": item.index}
        events: list[dict[str, Any]] = []
        if kind == "message":
            events += self._close_part(item)
            finished = answer.message_item(item.item["id"], item.parts, status)
        elif kind == "function_call":
            arguments = "".join(item.text)
            events.append(
                self._event(
                    "response.function_call_arguments.done", **where, name=item.item["name"], arguments=arguments
                )
            )
            fields = item.item
            finished = answer.function_call_item(fields["id"], fields["call_id"], fields["name"], arguments, status)
        else:
            text = "".join(item.text)
            events.append(self._event("response.reasoning_text.done", **where, content_index=0, text=text))
            finished = answer.reasoning_item(item.item["id"], text, status)
        self.output[item.index] = finished
        events.append(self._event("response.output_item.done", output_index=item.index, item=finished))
        return events

    def _end(self) -> list[dict[str, Any]]:
        events = self._close_open()
        self.ended = True
        status, incomplete = answer.status_of(self.finish)
        assert self.response is not None  # set by the first chunk, before any finish
        final = {
            **self.response,
            "status": status,
            "incomplete_details": incomplete,
            "output": self.output,
            "usage": answer.usage(self.usage),
        }
        events.append(
            self._event("response.completed" if status == "completed" else "response.incomplete", response=final)
        )
        return events


class TranslatedStream(TargetStream):
    """A target's chat completion chunk stream, read as the Responses event stream (Translator)."""

    def __init__(self, inner: TargetStream, translator: Translator) -> None:
        self.inner = inner
        self.translator = translator
        self._batches = self._read()

    def __aiter__(self) -> AsyncIterator[list[bytes]]:
        return self._batches

    async def _read(self) -> AsyncGenerator[list[bytes], None]:
        translator = self.translator
        async for batch in self.inner:
            out: list[bytes] = []
            for payload in batch:
                try:
                    chunk = orjson.loads(payload)
                except orjson.JSONDecodeError:
                    chunk = None
                if not isinstance(chunk, dict) or "error" in chunk:
                    out.append(payload)  # for the relay to skip (not JSON) or to fail on (an error event)
                    continue
                out += map(orjson.dumps, translator.feed(chunk))
            if self.inner.done:
                out += map(orjson.dumps, translator.close())
                self.done = True
            if out:
                yield out
        if not self.done:
            # Ended without [DONE]: a finished answer still gets its closing events (the relay accepts a stream
            # whose answer finished), an unfinished one none.
            closing = [orjson.dumps(event) for event in translator.close()]
            if closing:
                yield closing

    async def aclose(self) -> None:
        await self._batches.aclose()
        await self.inner.aclose()


def replay(response: dict[str, Any]) -> list[dict[str, Any]]:
    """A whole Response as the events that would have streamed it: each item added, its content in one delta,
    done; then the closing event."""
    sequence = iter(range(1 << 62))

    def event(kind: str, **fields: Any) -> dict[str, Any]:
        return {"type": kind, **fields, "sequence_number": next(sequence)}

    begun = {**response, "status": "in_progress", "output": [], "usage": None, "incomplete_details": None}
    events = [event("response.created", response=begun), event("response.in_progress", response=begun)]
    for index, item in enumerate(response.get("output") or ()):
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        where = {"item_id": item.get("id"), "output_index": index}
        events.append(event("response.output_item.added", output_index=index, item=_opening(item)))
        if kind == "message":
            for position, part in enumerate(item.get("content") or ()):
                events += _replay_part(event, {**where, "content_index": position}, part)
        elif kind == "function_call":
            arguments = item.get("arguments") or ""
            events.append(event("response.function_call_arguments.delta", **where, delta=arguments))
            events.append(
                event("response.function_call_arguments.done", **where, name=item.get("name"), arguments=arguments)
            )
        events.append(event("response.output_item.done", output_index=index, item=item))
    status = response.get("status")
    closing = status if status in ("completed", "incomplete", "failed") else "completed"
    events.append(event(f"response.{closing}", response=response))
    return events


def _opening(item: dict[str, Any]) -> dict[str, Any]:
    """An item as its `output_item.added` shows it: in progress, its content still to come."""
    opened = {**item, "status": "in_progress"}
    if item.get("type") == "message":
        opened["content"] = []
    elif item.get("type") == "function_call":
        opened["arguments"] = ""
    return opened


def _replay_part(event: Any, where: dict[str, Any], part: Any) -> list[dict[str, Any]]:
    if not isinstance(part, dict):
        return []
    if part.get("type") == "output_text":
        text, logprobs = part.get("text") or "", part.get("logprobs") or []
        return [
            event("response.content_part.added", **where, part=answer.text_part("")),
            event("response.output_text.delta", **where, delta=text, logprobs=logprobs),
            event("response.output_text.done", **where, text=text, logprobs=logprobs),
            event("response.content_part.done", **where, part=part),
        ]
    if part.get("type") == "refusal":
        refusal = part.get("refusal") or ""
        return [
            event("response.content_part.added", **where, part=answer.refusal_part("")),
            event("response.refusal.delta", **where, delta=refusal),
            event("response.refusal.done", **where, refusal=refusal),
            event("response.content_part.done", **where, part=part),
        ]
    return []
