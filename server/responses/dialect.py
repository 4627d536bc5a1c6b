"""What the relay asks of a /v1/responses request (server.relay): the same attempt loop, limits, accounting and
cache as for chat, with each attempt sent as its target needs and the answer read as a Response.

    send        a target that speaks the Responses API (a provider added with `--responses`) gets the client's
                body as it came, with `store: false`; any other target (a chat-only provider, a node pool) gets
                its chat completions form (server.responses.request), and its answer is translated back
                (server.responses.answer, .stream). Failover may go from one kind to the other: each attempt is
                sent in its own target's form, and the client sees Responses objects either way
    account     the plane's metering reads chat-shaped parts (server.usage.metering): `answer_view` and `event_view`
                show a Response and its events that way (text, refusals, reasoning and tool calls delivered, the
                finish, the usage as prompt/completion tokens); a usage the relay had to clamp is written back
                into the Response (`with_usage`)
    commit      a stream is committed to the client at its first text, refusal or tool call, or its end, as for chat
    frame       events go out as `event: TYPE` / `data: JSON`, with no `[DONE]` (OpenAI's Responses framing)
    fail        a committed stream that breaks ends with `response.failed`: the response as streamed so far, its
                error, the next sequence number. Streams are not rescued mid-way (server.routing.continuation continues
                chat text)
    cache       the whole Response is what is stored: a streamed one is taken from its `response.completed`
                (or `response.incomplete`) event, and replayed as events (`stream.replay`)
"""

from __future__ import annotations

from typing import Any

import orjson

from server.errors import UpstreamProtocolError
from server.responses import answer, stream
from server.responses.request import relay_body, to_chat
from server.targets.base import Attempt, Call, Target, TargetStream

ENDPOINT = "responses"
# What a translated request is metered as: its chat form is what the target generates from.
CHAT_ENDPOINT = "chat/completions"
# Events that commit a stream to the client: the answer itself, or its end.
_SUBSTANTIVE = frozenset(
    {"response.output_text.delta", "response.refusal.delta", "response.completed", "response.incomplete"}
)
_CLOSING = ("response.completed", "response.incomplete")


class ResponsesDialect:
    """One /v1/responses request's way through the relay (module doc). Raises InvalidRequestError when the
    request has no chat form (server.responses.request)."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        self.chat_body = to_chat(body)
        self.relayed_body = relay_body(body)
        # One id for whatever attempt serves: the client sees one response.
        self.response_id = answer.new_id("resp")
        # What the client was sent of a stream: for its `response.failed`, and for the cache.
        self.record = Record()

    # -- send ------------------------------------------------------------------------------------------

    def call(self, target: Target, request_id: str) -> Call:
        if target.speaks_responses:
            return Call(ENDPOINT, self.relayed_body, request_id)
        return Call(CHAT_ENDPOINT, self.chat_body, request_id)

    async def complete(self, target: Target, attempt: Attempt, request_id: str) -> bytes:
        """The Response JSON of a whole answer."""
        call = self.call(target, request_id)
        body = await target.complete(call, attempt)
        if call.endpoint == ENDPOINT:
            return body
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise UpstreamProtocolError(f"{target.id}: answer is not JSON") from exc
        if not isinstance(doc, dict) or "error" in doc:
            raise UpstreamProtocolError(f"{target.id}: answer is not an OpenAI object")
        return orjson.dumps(answer.from_chat(doc, self.body, self.response_id))

    async def stream(self, target: Target, attempt: Attempt, request_id: str) -> TargetStream:
        """The Responses event stream of an answer."""
        call = self.call(target, request_id)
        upstream = await target.stream(call, attempt)
        if call.endpoint == ENDPOINT:
            return upstream
        return stream.TranslatedStream(upstream, stream.Translator(self.body, self.response_id))

    # -- read back -------------------------------------------------------------------------------------

    @staticmethod
    def failure(doc: dict[str, Any]) -> str | None:
        """What went wrong, when a Response, an event or an error envelope reports a failure; None otherwise."""
        kind = doc.get("type")
        if kind == "response.failed":
            source, fallback = doc.get("response"), "the response failed"
        elif kind == "error" or doc.get("error"):
            source, fallback = doc, "an error event"
        else:
            return None
        error = source.get("error") if isinstance(source, dict) else None
        message = error.get("message") if isinstance(error, dict) else error
        if not message and isinstance(source, dict):
            message = source.get("message")
        return str(message or fallback)

    @staticmethod
    def substantive(event: dict[str, Any]) -> bool:
        """Whether an event carries the answer itself, which commits a stream (module doc)."""
        kind = event.get("type")
        if kind in _SUBSTANTIVE:
            return True
        item = event.get("item")
        return kind == "response.output_item.added" and isinstance(item, dict) and item.get("type") == "function_call"

    @staticmethod
    def answer_view(doc: dict[str, Any]) -> dict[str, Any]:
        """A whole Response as the chat answer the plane's metering reads: what it delivered, and its usage."""
        text: list[str] = []
        refusal: list[str] = []
        reasoning: list[str] = []
        calls: list[dict[str, Any]] = []
        for item in doc.get("output") or ():
            if not isinstance(item, dict):
                continue
            kind = item.get("type")
            if kind == "message":
                for part in item.get("content") or ():
                    if isinstance(part, dict):
                        text.append(answer.string(part.get("text")))
                        refusal.append(answer.string(part.get("refusal")))
            elif kind == "function_call":
                function = {"name": answer.string(item.get("name")), "arguments": answer.string(item.get("arguments"))}
                calls.append({"id": item.get("call_id"), "function": function})
            elif kind == "reasoning":
                for part in (*(item.get("content") or ()), *(item.get("summary") or ())):
                    if isinstance(part, dict):
                        reasoning.append(answer.string(part.get("text")))
        message: dict[str, Any] = {
            "content": "".join(text),
            "refusal": "".join(refusal),
            "reasoning": "".join(reasoning),
        }
        if calls:
            message["tool_calls"] = calls
        view: dict[str, Any] = {"choices": [{"index": 0, "message": message, "finish_reason": _finish(doc)}]}
        chat_usage = usage_view(doc.get("usage"))
        if chat_usage is not None:
            view["usage"] = chat_usage
        return view

    @staticmethod
    def event_view(event: dict[str, Any]) -> dict[str, Any] | None:
        """An event as the chat chunk the plane's metering and stream progress read; None when it delivers
        nothing new (lifecycle events, and the `done` events that repeat what the deltas delivered)."""
        kind = event.get("type")
        if kind == "response.output_text.delta":
            return _chunk({"content": answer.string(event.get("delta"))})
        if kind == "response.refusal.delta":
            return _chunk({"refusal": answer.string(event.get("delta"))})
        if kind in ("response.reasoning_text.delta", "response.reasoning_summary_text.delta"):
            return _chunk({"reasoning": answer.string(event.get("delta"))})
        if kind == "response.function_call_arguments.delta":
            arguments = answer.string(event.get("delta"))
            return _chunk({"tool_calls": [{"index": event.get("output_index"), "function": {"arguments": arguments}}]})
        if kind == "response.output_item.added":
            item = event.get("item")
            if isinstance(item, dict) and item.get("type") == "function_call":
                function = {"name": answer.string(item.get("name")), "arguments": answer.string(item.get("arguments"))}
                call = {"index": event.get("output_index"), "id": item.get("call_id"), "function": function}
                return _chunk({"tool_calls": [call]})
            return None
        if kind in _CLOSING:
            response = answer.mapping(event.get("response"))
            view: dict[str, Any] = {"choices": [{"index": 0, "delta": {}, "finish_reason": _finish(response)}]}
            chat_usage = usage_view(response.get("usage"))
            if chat_usage is not None:
                view["usage"] = chat_usage
            return view
        return None

    @staticmethod
    def with_usage(doc: dict[str, Any], shown: dict[str, Any]) -> dict[str, Any]:
        """A Response, or its closing event, showing the usage the client is billed (a clamped claim)."""
        if doc.get("type") in _CLOSING and isinstance(doc.get("response"), dict):
            return {**doc, "response": ResponsesDialect.with_usage(doc["response"], shown)}
        claimed = answer.mapping(doc.get("usage"))
        billed = answer.usage(shown) or {}
        details = claimed.get("output_tokens_details")
        if isinstance(details, dict):
            reasoning = details.get("reasoning_tokens")
            limit = billed["output_tokens"]
            billed["output_tokens_details"] = {
                **details,
                "reasoning_tokens": min(reasoning, limit) if type(reasoning) is int and reasoning >= 0 else 0,
            }
        return {**doc, "usage": {**claimed, **billed}}

    # -- frame, fail, replay -----------------------------------------------------------------------------

    def frame(self, payload: bytes | None, event: dict[str, Any]) -> bytes:
        """One event for the client, noted in the record (`failed`, the cache)."""
        self.record.observe(event)
        return stream.frame(payload if payload is not None else orjson.dumps(event), event.get("type"))

    def failed(self, message: str) -> bytes:
        """The `response.failed` event that ends a committed stream which broke. Its error code is always
        `server_error`: the SDKs accept only OpenAI's own codes there (the plane's code is in its usage row)."""
        record = self.record
        base = record.response or answer.shell(self.body, self.response_id, None)
        output = [record.items[index] for index in sorted(record.items)]
        response = {
            **base,
            "status": "failed",
            "error": {"code": "server_error", "message": message},
            "output": output,
            "usage": None,
        }
        event = {"type": "response.failed", "response": response, "sequence_number": record.sequence + 1}
        return stream.frame(orjson.dumps(event), event["type"])

    @staticmethod
    def replay(cached: bytes) -> bytes:
        """A cached Response as the frames of its stream."""
        return b"".join(stream.frame(orjson.dumps(e), e["type"]) for e in stream.replay(orjson.loads(cached)))


class Record:
    """What a client was sent of a Responses stream: the response as begun, the items finished, the last
    sequence number, and the closing response (what the cache stores). The same interface as the chat stream's
    StreamAssembler (server.policy.cache): `observe`, then `body`."""

    def __init__(self) -> None:
        self.response: dict[str, Any] | None = None
        self.items: dict[int, Any] = {}
        self.sequence = -1
        self.final: dict[str, Any] | None = None

    def observe(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        number = event.get("sequence_number")
        if type(number) is int and number > self.sequence:
            self.sequence = number
        if kind in ("response.created", "response.in_progress") and isinstance(event.get("response"), dict):
            self.response = event["response"]
        elif kind == "response.output_item.done" and type(event.get("output_index")) is int:
            self.items[event["output_index"]] = event.get("item")
        elif kind in _CLOSING and isinstance(event.get("response"), dict):
            self.final = event["response"]

    def body(self) -> bytes | None:
        """The whole Response, once the stream closed it; None before."""
        return orjson.dumps(self.final) if self.final is not None else None


def usage_view(usage: Any) -> dict[str, Any] | None:
    """A Response's usage as the chat usage the plane's metering reads."""
    if not isinstance(usage, dict):
        return None
    view: dict[str, Any] = {
        "prompt_tokens": usage.get("input_tokens"),
        "completion_tokens": usage.get("output_tokens"),
        "total_tokens": usage.get("total_tokens"),
    }
    details = usage.get("output_tokens_details")
    if isinstance(details, dict):
        view["completion_tokens_details"] = {"reasoning_tokens": details.get("reasoning_tokens")}
    cached = usage.get("input_tokens_details")
    if isinstance(cached, dict):
        view["prompt_tokens_details"] = {"cached_tokens": cached.get("cached_tokens")}
    return view


def _finish(response: dict[str, Any]) -> str:
    """The chat finish_reason a Response's status stands for."""
    if response.get("status") != "incomplete":
        return "stop"
    details = response.get("incomplete_details")
    reason = details.get("reason") if isinstance(details, dict) else None
    return "content_filter" if reason == "content_filter" else "length"


def _chunk(delta: dict[str, Any]) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": delta}]}
