"""An OpenAI-compatible fake provider served on a real loopback socket.

Tests point Hatchway (or the openai SDK) at ``MockUpstream.url`` and inspect ``requests``; the knobs
(``reply``, ``delay_s``, ``fail_status``, ``chunk_delay_s``, ``models``, ``accepts_prefill``, ``ignores_prefill``,
``vllm_prefill``, ``tool_arguments``, ``tool_reply``) may be changed between requests. It serves
``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``, ``/v1/models`` and ``/v1/responses`` (OpenAI's
Responses API, stream and not, stateless: the whole conversation comes in ``input``). Scripted misbehaviour goes
in ``faults`` (one per generation request, first in first out) or ``always``; ``disconnects`` and ``completed``
tell whether a caller hung up or got its whole answer.
tests/support/upstream_process.py serves it in a process of its own, so the hot path avoids logging and uses orjson.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import re
import socket
import ssl
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, NoReturn, get_args

import orjson
from aiohttp import web
from multidict import CIMultiDict

__all__ = [
    "EMBEDDING_DIMS",
    "Fault",
    "FaultKind",
    "MockUpstream",
    "RecordedRequest",
    "embed",
    "error_response",
    "json_response",
    "split_reply",
]

_Handler = Callable[[web.Request, Any], Awaitable[web.StreamResponse]]

EMBEDDING_DIMS = 8
_MAX_EMBEDDING_DIMS = 4096
_WORD_PIECE = re.compile(r"\s*\S+")

# OpenAI's (type, code) per status, so clients that branch on the envelope see realistic values.
_ERROR_KINDS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "unsupported_country_region_territory"),
    404: ("invalid_request_error", "not_found"),
    429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", None),
    502: ("server_error", None),
    503: ("server_error", "service_unavailable"),
}

FaultKind = Literal[
    "status",
    "context_length",
    "content_policy",
    "reset",
    "silent",
    "slow_first_token",
    "cut",
    "stall",
    "garbage",
    "no_done",
    "no_done_no_finish",
]
_FAULT_KINDS: frozenset[str] = frozenset(get_args(FaultKind))
# Faults decided before any generation happens; the rest shape how the answer itself is delivered.
_EARLY_FAULTS: frozenset[str] = frozenset({"status", "context_length", "content_policy", "reset", "silent"})

_CONTEXT_LENGTH_MESSAGE = (
    "This model's maximum context length is 128 tokens. However, your messages resulted in more tokens. "
    "Please reduce the length of the messages."
)
_CONTENT_POLICY_MESSAGE = (
    "Your request was rejected as a result of our safety system. "
    "Your prompt may contain text that is not allowed by our safety system."
)
_PREFILL_UNSUPPORTED = "assistant prefill (a final assistant message) is not supported"
_VLLM_BOTH_FLAGS = "Cannot set both `continue_final_message` and `add_generation_prompt` to True."

_DONE = b"data: [DONE]\n\n"
# Truncated mid-token, as a buggy or cut-off proxy would forward it; no JSON parser accepts either.
_GARBAGE_EVENT = b'data: {"choices": [tru\n\n'
_GARBAGE_JSON = b'{"choices": [tru'


@dataclass(frozen=True, slots=True)
class Fault:
    """One scripted misbehaviour for a request to ``/v1/chat/completions``, ``/v1/completions`` or ``/v1/responses``.

    Before any answer: ``status`` (an OpenAI error envelope with ``status``, plus ``Retry-After: retry_after``
    when set), ``context_length`` and ``content_policy`` (400s with OpenAI's codes), ``reset`` (the
    connection is reset with no response bytes), ``silent`` (no headers for ``delay_s``, then a normal answer).

    While answering (content chunks are the reply's word pieces; ``after_chunks`` counts them):
    ``slow_first_token`` waits ``delay_s`` after the role chunk; ``cut`` drops the connection after
    ``after_chunks`` pieces; ``stall`` sends ``after_chunks`` pieces, goes quiet for ``delay_s``, then drops;
    ``garbage`` inserts one malformed event after ``after_chunks`` pieces and carries on; ``no_done`` ends
    cleanly without ``[DONE]``; ``no_done_no_finish`` ends cleanly after ``after_chunks`` pieces with neither
    the finish chunk nor ``[DONE]``.

    Non-streaming requests: ``slow_first_token`` delays the answer; ``cut`` sends half the body under a
    Content-Length for all of it, then drops; ``stall`` does the same but waits ``delay_s`` before dropping;
    ``garbage`` answers 200 with a body that is not JSON; the ``no_done`` kinds answer normally.
    """

    kind: FaultKind
    status: int | None = None
    retry_after: str | None = None
    after_chunks: int = 0
    delay_s: float = 30.0

    def __post_init__(self) -> None:
        # Fail at construction: a misspelt kind would otherwise quietly behave like no fault at all.
        if self.kind not in _FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; expected one of {sorted(_FAULT_KINDS)}")
        if self.kind == "status" and self.status is None:
            raise ValueError("a 'status' fault needs a status")
        if self.after_chunks < 0 or self.delay_s < 0:
            raise ValueError("after_chunks and delay_s must not be negative")


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request as the upstream saw it; ``json`` is None when the body was absent or not an object."""

    method: str
    path: str
    # Case-insensitive, as header names are.
    headers: CIMultiDict[str]
    json: dict[str, Any] | None


class _Dropped(Exception):
    """The mock closed the connection on purpose: neither a disconnect by the client nor a full answer."""


@dataclass(frozen=True, slots=True)
class _Frames:
    """A stream's SSE events, grouped so a fault can cut or splice it at a content piece."""

    # The role chunk on chat streams; nothing on legacy completions.
    head: list[bytes]
    # One event per word piece of the reply: what ``Fault.after_chunks`` counts.
    pieces: list[bytes]
    # The finish chunk and, when the request asked for it, the usage chunk.
    tail: list[bytes]
    # Whether `[DONE]` ends the stream (a Responses stream has none: its closing event ends it).
    done: bool = True


@dataclass(frozen=True, slots=True)
class _Pause:
    seconds: float


@dataclass(frozen=True, slots=True)
class _Script:
    """What a stream writes, in order, and whether it then ends the chunked body cleanly or drops."""

    steps: list[bytes | _Pause]
    clean_end: bool = True


class MockUpstream:
    """An aiohttp server speaking the subset of the OpenAI API that Hatchway proxies."""

    def __init__(self, name: str = "mock", reply: str = "Hello from mock", models: list[str] | None = None) -> None:
        self.name = name
        self.reply = reply
        self.models: list[str] = ["gpt-4o-mini"] if models is None else list(models)
        self.delay_s = 0.0
        self.fail_status: int | None = None
        # The message of a ``fail_status`` answer; ``{key}`` becomes the bearer token the request carried, as
        # providers that quote the key they refused do.
        self.fail_message: str | None = None
        self.chunk_delay_s = 0.0
        # Silence between a stream's last event and its [DONE]: a client can read the whole answer and leave first.
        self.done_delay_s = 0.0
        # llama.cpp continues a final assistant message; providers that refuse it answer 400 instead.
        self.accepts_prefill = True
        # OpenAI's API takes a final assistant message as context and answers anew (the whole reply), with a 200.
        self.ignores_prefill = False
        # vLLM continues it only when asked with `continue_final_message: true, add_generation_prompt: false`;
        # without them it opens a new assistant turn (answers anew), and both true is a 400.
        self.vllm_prefill = False
        # Consumed one per generation request, oldest first; ``always`` applies once the list is empty.
        self.faults: list[Fault] = []
        self.always: Fault | None = None
        # Requests whose client left before the answer was complete, and requests answered in full.
        self.disconnects = 0
        self.completed = 0
        # A long-running upstream process turns recording off so it does not keep every request in memory.
        self.record = True
        self.requests: list[RecordedRequest] = []
        # Added to every answer (a CDN's Set-Cookie, say).
        self.response_headers: dict[str, str] = {}
        # Sent as the `usage` of every answer instead of the counted one: an upstream that lies about its usage.
        self.forged_usage: dict[str, Any] | None = None
        # Serve HTTPS with this context (a private CA's certificate for localhost, say) instead of HTTP.
        self.tls: ssl.SSLContext | None = None
        # Function name -> arguments (a JSON string): a request that offers that function and whose conversation
        # holds no tool result yet is answered with a call to it (chat `tool_calls`, a Responses `function_call`);
        # one that holds a tool result is answered with ``tool_reply``, ``{output}`` standing for the last result.
        self.tool_arguments: dict[str, str] = {}
        self.tool_reply = "The tool said: {output}"
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._host = "127.0.0.1"
        self._port = 0

    # -- lifecycle -------------------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        if self._runner is not None:
            raise RuntimeError("MockUpstream already started")
        # Without handler cancellation aiohttp lets a handler run on after its client is gone, so a sleeping
        # or streaming handler would never learn of the disconnect that ``disconnects`` counts.
        runner = web.AppRunner(self._build_app(), access_log=None, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=self.tls)
        await site.start()
        self._runner = runner
        self._host = host
        # Port 0 asks the kernel for a free port; the bound socket is the only place it can be read back.
        self._port = int(runner.addresses[0][1])

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> MockUpstream:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        if self._runner is None:
            raise RuntimeError("MockUpstream is not started")
        return self._port

    @property
    def url(self) -> str:
        """The base URL including ``/v1``, as passed to ``openai.OpenAI(base_url=...)``."""
        if self.tls is not None:  # the certificate names localhost, not the address
            return f"https://localhost:{self.port}/v1"
        return f"http://{self._host}:{self.port}/v1"

    def _build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._admit(self._with_faults(self._chat_completions)))
        app.router.add_post("/v1/completions", self._admit(self._with_faults(self._completions)))
        app.router.add_post("/v1/embeddings", self._admit(self._embeddings))
        app.router.add_post("/v1/responses", self._admit(self._with_faults(self._responses)))
        app.router.add_get("/v1/models", self._admit(self._list_models))
        app.router.add_get("/v1/models/{model}", self._admit(self._get_model))
        # Anything else still gets recorded and an OpenAI-shaped 404, so a misrouted proxy is easy to spot.
        app.router.add_route("*", "/{tail:.*}", self._admit(self._not_found))
        return app

    # -- common request handling -----------------------------------------------------------------------

    def _admit(self, handler: _Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """Wrap a handler with the knobs and the bookkeeping of how each answer ended."""

        async def admitted(request: web.Request) -> web.StreamResponse:
            try:
                response = await self._respond(request, handler)
                response.headers.update(self.response_headers)
                # Sent here rather than by aiohttp after we return, so ``completed`` means the bytes went out.
                await response.prepare(request)
                await response.write_eof()
            except _Dropped:
                return _unsendable()
            except ConnectionResetError:
                self.disconnects += 1
                return _unsendable()
            except asyncio.CancelledError:
                # Handler cancellation: the client closed the connection while we slept or streamed.
                self.disconnects += 1
                raise
            self.completed += 1
            return response

        return admitted

    async def _respond(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        """Recording, the delay/failure knobs and the bearer check, then the endpoint itself."""
        body = await _read_json(request)
        if self.record:
            self.requests.append(_record(request, body))
        if self.delay_s > 0:
            await asyncio.sleep(self.delay_s)
        if self.fail_status is not None:
            message = self.fail_message or f"mock upstream {self.name} configured to fail"
            token = request.headers.get("Authorization", "").partition(" ")[2]
            return error_response(self.fail_status, message.replace("{key}", token))
        if not _has_bearer(request):
            return error_response(401, "You didn't provide an API key.")
        return await handler(request, body)

    def _with_faults(
        self, handler: Callable[[web.Request, Any, Fault | None], Awaitable[web.StreamResponse]]
    ) -> _Handler:
        """Take the next scripted fault for a generation endpoint; act on those that pre-empt the answer."""

        async def faulted(request: web.Request, body: Any) -> web.StreamResponse:
            fault = self._next_fault()
            if fault is not None and fault.kind in _EARLY_FAULTS:
                early = await self._early_fault(request, fault)
                if early is not None:
                    return early
                fault = None
            return await handler(request, body, fault)

        return faulted

    def _next_fault(self) -> Fault | None:
        if self.faults:
            return self.faults.pop(0)
        return self.always

    async def _early_fault(self, request: web.Request, fault: Fault) -> web.StreamResponse | None:
        """The error answer for a fault that replaces the generation, or None to go on generating."""
        if fault.kind == "status":
            assert fault.status is not None  # Fault.__post_init__ guarantees it
            return _status_fault(fault.status, fault.retry_after, f"mock upstream {self.name} injected a fault")
        if fault.kind == "context_length":
            return error_response(400, _CONTEXT_LENGTH_MESSAGE, code="context_length_exceeded", param="messages")
        if fault.kind == "content_policy":
            return error_response(400, _CONTENT_POLICY_MESSAGE, code="content_policy_violation")
        if fault.kind == "reset":
            _reset(request)
        # "silent": hold the request with nothing on the wire, then answer as usual.
        await asyncio.sleep(fault.delay_s)
        return None

    def _next_id(self, prefix: str) -> str:
        return f"{prefix}-mock-{next(self._ids)}"

    # -- endpoints -------------------------------------------------------------------------------------

    async def _chat_completions(self, request: web.Request, body: Any, fault: Fault | None) -> web.StreamResponse:
        problem = _check_chat_body(body)
        if problem is not None:
            return error_response(400, problem)
        prefill = _assistant_prefill(body["messages"])
        if prefill is not None and not self.accepts_prefill:
            return error_response(400, _PREFILL_UNSUPPORTED, param="messages")
        continues = body.get("continue_final_message") is True
        if self.vllm_prefill and continues and body.get("add_generation_prompt", True) is not False:
            return error_response(400, _VLLM_BOTH_FLAGS)
        if self.ignores_prefill or (self.vllm_prefill and not continues):
            prefill = None  # a new assistant turn after the final assistant message
        reply = _continuation(self.reply, prefill)
        tool_results = [m.get("content") for m in body["messages"] if isinstance(m, dict) and m.get("role") == "tool"]
        offered = [t.get("function", {}).get("name") for t in body.get("tools") or () if isinstance(t, dict)]
        call = self._tool_call(offered, tool_results)
        if tool_results and call is None:
            reply = self.tool_reply.replace("{output}", str(tool_results[-1]))
        generated = call[1] if call is not None else reply
        usage = self.forged_usage or _usage(_messages_words(body["messages"]), _word_count(generated))
        ident, created, model = self._next_id("chatcmpl"), int(time.time()), body["model"]
        if body.get("stream") is True:
            if call is not None:
                frames = _chat_call_frames(ident, created, model, call, usage, _include_usage(body))
            else:
                frames = _chat_frames(ident, created, model, reply, usage, _include_usage(body))
            return await self._stream(request, frames, fault)
        message: dict[str, Any] = {"role": "assistant", "content": reply, "refusal": None}
        finish = "stop"
        if call is not None:
            tool_call = {"id": call[2], "type": "function", "function": {"name": call[0], "arguments": call[1]}}
            message, finish = (
                {"role": "assistant", "content": None, "refusal": None, "tool_calls": [tool_call]},
                "tool_calls",
            )
        choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
        completion = {
            "id": ident,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [choice],
            "usage": usage,
            "system_fingerprint": None,
        }
        return await _answer_json(request, completion, fault)

    def _tool_call(self, offered: list[Any], results: list[Any]) -> tuple[str, str, str] | None:
        """(name, arguments, call id) of the call to answer with, when a scripted function is offered and no tool
        result is in the conversation yet."""
        if results:
            return None
        name = next((n for n in offered if n in self.tool_arguments), None)
        return None if name is None else (name, self.tool_arguments[name], self._next_id("call"))

    async def _responses(self, request: web.Request, body: Any, fault: Fault | None) -> web.StreamResponse:
        problem = _check_responses_body(body)
        if problem is not None:
            return error_response(400, problem)
        items = [body["input"]] if isinstance(body["input"], str) else body["input"]
        results = [i.get("output") for i in items if isinstance(i, dict) and i.get("type") == "function_call_output"]
        offered = [
            t.get("name") for t in body.get("tools") or () if isinstance(t, dict) and t.get("type") == "function"
        ]
        call = self._tool_call(offered, results)
        reply = self.tool_reply.replace("{output}", str(results[-1])) if results else self.reply
        generated = call[1] if call is not None else reply
        words = _word_count(body.get("instructions") or "") + sum(_item_words(item) for item in items)
        usage = self.forged_usage or _response_usage(max(1, words), _word_count(generated))
        ident = self._next_id("resp").replace("-", "_")
        item_id = self._next_id("msg" if call is None else "fc").replace("-", "_")
        response = _response_object(ident, body, int(time.time()))
        item: dict[str, Any]
        if call is not None:
            item = {"id": item_id, "type": "function_call", "status": "completed", "call_id": call[2]}
            item |= {"name": call[0], "arguments": call[1]}
        else:
            part = {"type": "output_text", "text": reply, "annotations": [], "logprobs": []}
            item = {"id": item_id, "type": "message", "status": "completed", "role": "assistant", "content": [part]}
        done = {**response, "status": "completed", "output": [item], "usage": usage}
        if body.get("stream") is True:
            return await self._stream(request, _response_frames(response, item, done), fault)
        return await _answer_json(request, done, fault)

    async def _completions(self, request: web.Request, body: Any, fault: Fault | None) -> web.StreamResponse:
        problem = _check_completion_body(body)
        if problem is not None:
            return error_response(400, problem)
        reply = self.reply
        usage = self.forged_usage or _usage(max(1, _prompt_words(body["prompt"])), _word_count(reply))
        ident, created, model = self._next_id("cmpl"), int(time.time()), body["model"]
        if body.get("stream") is True:
            frames = _text_frames(ident, created, model, reply, usage, _include_usage(body))
            return await self._stream(request, frames, fault)
        choice = {"text": reply, "index": 0, "finish_reason": "stop", "logprobs": None}
        completion = {
            "id": ident,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [choice],
            "usage": usage,
            "system_fingerprint": None,
        }
        return await _answer_json(request, completion, fault)

    async def _embeddings(self, request: web.Request, body: Any) -> web.StreamResponse:
        problem = _check_embedding_body(body)
        if problem is not None:
            return error_response(400, problem)
        texts, tokens = _embedding_inputs(body["input"])
        dims = body.get("dimensions") or EMBEDDING_DIMS
        as_base64 = body.get("encoding_format") == "base64"
        data = [
            {"object": "embedding", "index": index, "embedding": _encode_vector(embed(text, dims), as_base64)}
            for index, text in enumerate(texts)
        ]
        usage = self.forged_usage or {"prompt_tokens": tokens, "total_tokens": tokens}
        return json_response({"object": "list", "data": data, "model": body["model"], "usage": usage})

    async def _list_models(self, request: web.Request, body: Any) -> web.StreamResponse:
        data = [self._model_object(model) for model in self.models]
        return json_response({"object": "list", "data": data})

    async def _get_model(self, request: web.Request, body: Any) -> web.StreamResponse:
        model = request.match_info["model"]
        if model not in self.models:
            return error_response(404, f"The model '{model}' does not exist", code="model_not_found")
        return json_response(self._model_object(model))

    async def _not_found(self, request: web.Request, body: Any) -> web.StreamResponse:
        return error_response(404, f"Invalid URL ({request.method} {request.path})")

    def _model_object(self, model: str) -> dict[str, Any]:
        return {"id": model, "object": "model", "created": 1_700_000_000, "owned_by": self.name}

    async def _stream(self, request: web.Request, frames: _Frames, fault: Fault | None) -> web.StreamResponse:
        script = _stream_script(frames, fault)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        await self._play(request, response, script.steps)
        if not script.clean_end:
            await _drop(request)
        await response.write_eof()
        return response

    async def _play(self, request: web.Request, response: web.StreamResponse, steps: list[bytes | _Pause]) -> None:
        sent_any = False
        for step in steps:
            if isinstance(step, _Pause):
                # A pause models silence on the wire, so what came before it must already be there.
                await _flush(request)
                await asyncio.sleep(step.seconds)
                continue
            # chunk_delay_s separates data chunks; [DONE] follows the last one at once, as before.
            if sent_any and step is not _DONE and self.chunk_delay_s > 0:
                await asyncio.sleep(self.chunk_delay_s)
            if step is _DONE and self.done_delay_s > 0:
                await _flush(request)
                await asyncio.sleep(self.done_delay_s)
            await response.write(step)
            sent_any = True


def json_response(payload: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, content_type="application/json")


def error_response(status: int, message: str, code: str | None = None, param: str | None = None) -> web.Response:
    kind, default_code = _ERROR_KINDS.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
    error = {"message": message, "type": kind, "param": param, "code": code or default_code}
    return json_response({"error": error}, status=status)


def _status_fault(status: int, retry_after: str | None, message: str) -> web.Response:
    response = error_response(status, message)
    if retry_after is not None:
        # Verbatim, so tests can send the malformed or HTTP-date forms a gateway must also cope with.
        response.headers["Retry-After"] = retry_after
    return response


# -- delivering answers, faithfully or not -------------------------------------------------------------


def _stream_script(frames: _Frames, fault: Fault | None) -> _Script:
    head, pieces, tail = frames.head, frames.pieces, frames.tail
    done = [_DONE] if frames.done else []
    if fault is None:
        return _Script([*head, *pieces, *tail, *done])
    before, after = pieces[: fault.after_chunks], pieces[fault.after_chunks :]
    if fault.kind == "slow_first_token":
        return _Script([*head, _Pause(fault.delay_s), *pieces, *tail, *done])
    if fault.kind == "cut":
        return _Script([*head, *before], clean_end=False)
    if fault.kind == "stall":
        return _Script([*head, *before, _Pause(fault.delay_s)], clean_end=False)
    if fault.kind == "garbage":
        return _Script([*head, *before, _GARBAGE_EVENT, *after, *tail, *done])
    if fault.kind == "no_done":
        return _Script([*head, *pieces, *tail])
    if fault.kind == "no_done_no_finish":
        return _Script([*head, *before])
    raise AssertionError(f"fault {fault.kind!r} is handled before generation")


async def _answer_json(request: web.Request, payload: dict[str, Any], fault: Fault | None) -> web.StreamResponse:
    """A non-streaming answer, delivered as the fault dictates."""
    if fault is None or fault.kind in ("no_done", "no_done_no_finish"):
        return json_response(payload)
    if fault.kind == "slow_first_token":
        await asyncio.sleep(fault.delay_s)
        return json_response(payload)
    if fault.kind == "garbage":
        return web.Response(body=_GARBAGE_JSON, content_type="application/json")
    # "cut" and "stall": half the body under a Content-Length that promises all of it, then a drop.
    body = orjson.dumps(payload)
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.content_length = len(body)
    await response.prepare(request)
    await response.write(body[: len(body) // 2])
    if fault.kind == "stall":
        await _flush(request)
        await asyncio.sleep(fault.delay_s)
    await _drop(request)


async def _flush(request: web.Request) -> None:
    """Wait until the transport has handed every written byte to the kernel.

    aiohttp's ``write`` only drains past 64 KiB, and ``abort`` discards whatever is still buffered, so
    without this a cut could silently lose the chunks it was meant to deliver first.
    """
    transport = request.transport
    if transport is None or transport.is_closing():
        return
    # A zero high-water mark keeps the protocol paused while any byte is buffered, so drain() returns only
    # once the buffer is empty; the connection is about to go quiet or away, so its throughput is moot.
    transport.set_write_buffer_limits(high=0)
    await request.writer.drain()


async def _drop(request: web.Request) -> NoReturn:
    """Close the connection mid-answer: the peer sees what was flushed, then EOF with the body unfinished."""
    await _flush(request)
    transport = request.transport
    if transport is not None:
        transport.abort()
    raise _Dropped


def _reset(request: web.Request) -> NoReturn:
    """Reset the connection before any response byte, as a crashing or overloaded provider does."""
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # A zero linger time makes close() send RST rather than FIN: "connection reset by peer".
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    raise _Dropped


def _unsendable() -> web.Response:
    """What to hand aiohttp once the connection is gone: it must get a response, and writing this one fails
    quietly on the closed transport (aiohttp treats that as a premature disconnect, not an error)."""
    return web.Response()


async def _read_json(request: web.Request) -> Any:
    """The parsed body, or None when it is missing or not JSON (handlers then answer 400)."""
    if not request.can_read_body:
        return None
    try:
        return orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return None


def _record(request: web.Request, body: Any) -> RecordedRequest:
    return RecordedRequest(
        method=request.method,
        path=request.path,
        headers=CIMultiDict(request.headers),
        json=body if isinstance(body, dict) else None,
    )


def _has_bearer(request: web.Request) -> bool:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and bool(token.strip())


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _assistant_prefill(messages: list[Any]) -> str | None:
    """The text a final assistant message asks the model to continue, if the request ends with one."""
    last = messages[-1]
    if isinstance(last, dict) and last.get("role") == "assistant" and isinstance(last.get("content"), str):
        return str(last["content"])
    return None


def _continuation(reply: str, prefill: str | None) -> str:
    """What the model generates after ``prefill``: the rest of its one fixed reply, or all of it when the
    prefill is not a prefix of that reply (a model that ignores the prefill)."""
    if prefill is not None and reply.startswith(prefill):
        return reply[len(prefill) :]
    return reply


# -- validation ----------------------------------------------------------------------------------------


def _check_model(body: Any) -> str | None:
    if not isinstance(body, dict):
        return "We could not parse the JSON body of your request."
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "you must provide a model parameter"
    return None


def _check_chat_body(body: Any) -> str | None:
    problem = _check_model(body)
    if problem is None and (not isinstance(body.get("messages"), list) or not body["messages"]):
        problem = "'messages' must be a non-empty array"
    return problem


def _check_responses_body(body: Any) -> str | None:
    problem = _check_model(body)
    if problem is None and not isinstance(body.get("input"), str | list):
        problem = "'input' must be a string or an array of items"
    if problem is None and body.get("previous_response_id") is not None:
        problem = "this mock stores no responses: 'previous_response_id' is not supported"
    return problem


def _check_completion_body(body: Any) -> str | None:
    problem = _check_model(body)
    if problem is None and "prompt" not in body:
        problem = "you must provide a prompt parameter"
    return problem


def _check_embedding_body(body: Any) -> str | None:
    problem = _check_model(body)
    if problem is not None:
        return problem
    if not _embedding_inputs(body.get("input"))[0]:
        return "'input' must be a non-empty string, array of strings or array of token arrays"
    dims = body.get("dimensions")
    if dims is not None and (not isinstance(dims, int) or not 0 < dims <= _MAX_EMBEDDING_DIMS):
        return f"'dimensions' must be an integer between 1 and {_MAX_EMBEDDING_DIMS}"
    return None


# -- token accounting (words stand in for tokens) ------------------------------------------------------


def _word_count(text: str) -> int:
    return len(text.split())


def _messages_words(messages: list[Any]) -> int:
    words = sum(_content_words(message.get("content")) for message in messages if isinstance(message, dict))
    return max(1, words)


def _content_words(content: Any) -> int:
    if isinstance(content, str):
        return _word_count(content)
    if isinstance(content, list):
        # Multi-part content: only text parts carry words.
        return sum(_word_count(part.get("text") or "") for part in content if isinstance(part, dict))
    return 0


def _item_words(item: Any) -> int:
    """Words of a Responses input item: a message's text, a function call's arguments or output."""
    if isinstance(item, str):
        return _word_count(item)
    if not isinstance(item, dict):
        return 0
    if item.get("type") == "function_call_output":
        return _content_words(item.get("output"))
    if item.get("type") == "function_call":
        return _word_count(str(item.get("arguments") or ""))
    return _content_words(item.get("content"))


def _prompt_words(prompt: Any) -> int:
    if isinstance(prompt, str):
        return _word_count(prompt)
    if isinstance(prompt, list):
        return sum(1 if isinstance(item, int) else _prompt_words(item) for item in prompt)
    return 0


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _response_usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


def _response_object(ident: str, body: dict[str, Any], created: int) -> dict[str, Any]:
    """A Response as OpenAI's API begins it: in progress, no output, echoing the request."""
    text = body["text"] if isinstance(body.get("text"), dict) else {}
    return {
        "id": ident,
        "object": "response",
        "created_at": created,
        "status": "in_progress",
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": body["model"],
        "output": [],
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": None,
        "store": body.get("store", True),
        "temperature": body.get("temperature", 1.0),
        "text": {"format": {"type": "text"}, **text},
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools") or [],
        "top_p": body.get("top_p", 1.0),
        "truncation": "disabled",
        "usage": None,
        "metadata": body.get("metadata") or {},
    }


# -- streaming -----------------------------------------------------------------------------------------


def split_reply(reply: str) -> list[str]:
    """Word-sized pieces that concatenate back to exactly ``reply`` (whitespace included)."""
    pieces = _WORD_PIECE.findall(reply)
    rest = reply[sum(map(len, pieces)) :]
    if rest:
        pieces.append(rest)
    return pieces


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _chat_frames(
    ident: str, created: int, model: str, reply: str, usage: dict[str, int], include_usage: bool
) -> _Frames:
    def chunk(delta: dict[str, Any], finish_reason: str | None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return _event(_chunk_envelope(ident, "chat.completion.chunk", created, model, [choice], include_usage))

    finish = chunk({}, "stop")
    return _Frames(
        head=[chunk({"role": "assistant", "content": "", "refusal": None}, None)],
        pieces=[chunk({"content": piece}, None) for piece in split_reply(reply)],
        tail=_tail(finish, ident, "chat.completion.chunk", created, model, usage, include_usage),
    )


def _chat_call_frames(
    ident: str, created: int, model: str, call: tuple[str, str, str], usage: dict[str, int], include_usage: bool
) -> _Frames:
    """A chat stream that calls one function: its id and name first, then its arguments a piece at a time."""
    name, arguments, call_id = call

    def chunk(delta: dict[str, Any], finish_reason: str | None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return _event(_chunk_envelope(ident, "chat.completion.chunk", created, model, [choice], include_usage))

    first = {"index": 0, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
    return _Frames(
        head=[chunk({"role": "assistant", "content": None}, None), chunk({"tool_calls": [first]}, None)],
        pieces=[
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}, None)
            for piece in split_reply(arguments)
        ],
        tail=_tail(chunk({}, "tool_calls"), ident, "chat.completion.chunk", created, model, usage, include_usage),
    )


def _response_frames(response: dict[str, Any], item: dict[str, Any], done: dict[str, Any]) -> _Frames:
    """A Responses event stream of one output item, as OpenAI's API streams it: `event:` lines, numbered
    events, the item's text (or a function call's arguments) a piece at a time, no `[DONE]`."""
    numbers = itertools.count()

    def event(kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, **fields, "sequence_number": next(numbers)}
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"

    where = {"item_id": item["id"], "output_index": 0}
    head = [event("response.created", response=response), event("response.in_progress", response=response)]
    if item["type"] == "function_call":
        head.append(
            event("response.output_item.added", output_index=0, item={**item, "arguments": "", "status": "in_progress"})
        )
        pieces = [
            event("response.function_call_arguments.delta", **where, delta=p) for p in split_reply(item["arguments"])
        ]
        tail = [event("response.function_call_arguments.done", **where, name=item["name"], arguments=item["arguments"])]
    else:
        part = item["content"][0]
        opened = {**item, "content": [], "status": "in_progress"}
        text = {**where, "content_index": 0}
        head.append(event("response.output_item.added", output_index=0, item=opened))
        head.append(event("response.content_part.added", **text, part={**part, "text": ""}))
        pieces = [event("response.output_text.delta", **text, delta=p, logprobs=[]) for p in split_reply(part["text"])]
        tail = [
            event("response.output_text.done", **text, text=part["text"], logprobs=[]),
            event("response.content_part.done", **text, part=part),
        ]
    tail.append(event("response.output_item.done", output_index=0, item=item))
    tail.append(event("response.completed", response=done))
    return _Frames(head=head, pieces=pieces, tail=tail, done=False)


def _text_frames(
    ident: str, created: int, model: str, reply: str, usage: dict[str, int], include_usage: bool
) -> _Frames:
    def chunk(text: str, finish_reason: str | None) -> bytes:
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}
        return _event(_chunk_envelope(ident, "text_completion", created, model, [choice], include_usage))

    finish = chunk("", "stop")
    return _Frames(
        head=[],
        pieces=[chunk(piece, None) for piece in split_reply(reply)],
        tail=_tail(finish, ident, "text_completion", created, model, usage, include_usage),
    )


def _tail(
    finish: bytes, ident: str, obj: str, created: int, model: str, usage: dict[str, int], include_usage: bool
) -> list[bytes]:
    if not include_usage:
        return [finish]
    return [finish, _event(_usage_chunk(ident, obj, created, model, usage))]


def _chunk_envelope(
    ident: str, obj: str, created: int, model: str, choices: list[dict[str, Any]], include_usage: bool
) -> dict[str, Any]:
    envelope: dict[str, Any] = {
        "id": ident,
        "object": obj,
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": choices,
    }
    if include_usage:
        # OpenAI sends an explicit null on every chunk but the last when usage was requested.
        envelope["usage"] = None
    return envelope


def _usage_chunk(ident: str, obj: str, created: int, model: str, usage: dict[str, int]) -> dict[str, Any]:
    envelope = _chunk_envelope(ident, obj, created, model, [], include_usage=True)
    envelope["usage"] = usage
    return envelope


# -- embeddings ----------------------------------------------------------------------------------------


def _embedding_inputs(raw: Any) -> tuple[list[str], int]:
    """The texts to embed and the prompt-token count; an empty list means the input is invalid."""
    if isinstance(raw, str):
        return [raw], max(1, _word_count(raw))
    if not isinstance(raw, list) or not raw:
        return [], 0
    if all(isinstance(item, int) for item in raw):
        return [_tokens_text(raw)], len(raw)
    texts: list[str] = []
    tokens = 0
    for item in raw:
        if isinstance(item, str):
            texts.append(item)
            tokens += max(1, _word_count(item))
        elif isinstance(item, list) and item and all(isinstance(token, int) for token in item):
            texts.append(_tokens_text(item))
            tokens += len(item)
        else:
            return [], 0
    return texts, tokens


def _tokens_text(tokens: list[int]) -> str:
    return " ".join(map(str, tokens))


def embed(text: str, dims: int = EMBEDDING_DIMS) -> list[float]:
    """A deterministic vector in [-1, 1) derived from ``text``.

    Values are rounded to float32 so the float and base64 encodings of one text decode to equal lists.
    """
    raw = b"".join(
        hashlib.blake2b(text.encode(), digest_size=64, salt=block.to_bytes(8, "little")).digest()
        for block in range((dims + 15) // 16)
    )
    words = struct.unpack(f"<{dims}I", raw[: dims * 4])
    scaled = [word / 2**31 - 1.0 for word in words]
    return list(struct.unpack(f"<{dims}f", struct.pack(f"<{dims}f", *scaled)))


def _encode_vector(vector: list[float], as_base64: bool) -> list[float] | str:
    if not as_base64:
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
