"""An OpenAI-compatible fake provider served on a real loopback socket.

Tests point Hatchway (or the openai SDK) at ``MockUpstream.url`` and inspect ``requests``; the knobs
(``reply``, ``delay_s``, ``fail_status``, ``chunk_delay_s``, ``models``) may be changed between requests.
The benchmark reuses it as its upstream, so the hot path avoids logging and uses orjson.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import re
import struct
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

__all__ = [
    "EMBEDDING_DIMS",
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


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request as the upstream saw it; ``json`` is None when the body was absent or not an object."""

    method: str
    path: str
    # Case-insensitive, as header names are.
    headers: CIMultiDict[str]
    json: dict[str, Any] | None


class MockUpstream:
    """An aiohttp server speaking the subset of the OpenAI API that Hatchway proxies."""

    def __init__(self, name: str = "mock", reply: str = "Hello from mock", models: list[str] | None = None) -> None:
        self.name = name
        self.reply = reply
        self.models: list[str] = ["gpt-4o-mini"] if models is None else list(models)
        self.delay_s = 0.0
        self.fail_status: int | None = None
        self.chunk_delay_s = 0.0
        # The benchmark turns recording off so a long run does not accumulate every request in memory.
        self.record = True
        self.requests: list[RecordedRequest] = []
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._host = "127.0.0.1"
        self._port = 0

    # -- lifecycle -------------------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        if self._runner is not None:
            raise RuntimeError("MockUpstream already started")
        runner = web.AppRunner(self._build_app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
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
        return f"http://{self._host}:{self.port}/v1"

    def _build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._admit(self._chat_completions))
        app.router.add_post("/v1/completions", self._admit(self._completions))
        app.router.add_post("/v1/embeddings", self._admit(self._embeddings))
        app.router.add_get("/v1/models", self._admit(self._list_models))
        app.router.add_get("/v1/models/{model}", self._admit(self._get_model))
        # Anything else still gets recorded and an OpenAI-shaped 404, so a misrouted proxy is easy to spot.
        app.router.add_route("*", "/{tail:.*}", self._admit(self._not_found))
        return app

    # -- common request handling -----------------------------------------------------------------------

    def _admit(self, handler: _Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """Wrap a handler with recording, the delay/failure knobs and the bearer check."""

        async def admitted(request: web.Request) -> web.StreamResponse:
            body = await _read_json(request)
            if self.record:
                self.requests.append(_record(request, body))
            if self.delay_s > 0:
                await asyncio.sleep(self.delay_s)
            if self.fail_status is not None:
                return error_response(self.fail_status, f"mock upstream {self.name} configured to fail")
            if not _has_bearer(request):
                return error_response(401, "You didn't provide an API key.")
            return await handler(request, body)

        return admitted

    def _next_id(self, prefix: str) -> str:
        return f"{prefix}-mock-{next(self._ids)}"

    # -- endpoints -------------------------------------------------------------------------------------

    async def _chat_completions(self, request: web.Request, body: Any) -> web.StreamResponse:
        problem = _check_chat_body(body)
        if problem is not None:
            return error_response(400, problem)
        reply = self.reply
        usage = _usage(_messages_words(body["messages"]), _word_count(reply))
        ident, created, model = self._next_id("chatcmpl"), int(time.time()), body["model"]
        if body.get("stream") is True:
            chunks = _chat_chunks(ident, created, model, reply, usage, _include_usage(body))
            return await self._stream(request, chunks)
        message = {"role": "assistant", "content": reply, "refusal": None}
        choice = {"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}
        completion = {
            "id": ident,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [choice],
            "usage": usage,
            "system_fingerprint": None,
        }
        return json_response(completion)

    async def _completions(self, request: web.Request, body: Any) -> web.StreamResponse:
        problem = _check_completion_body(body)
        if problem is not None:
            return error_response(400, problem)
        reply = self.reply
        usage = _usage(max(1, _prompt_words(body["prompt"])), _word_count(reply))
        ident, created, model = self._next_id("cmpl"), int(time.time()), body["model"]
        if body.get("stream") is True:
            chunks = _text_chunks(ident, created, model, reply, usage, _include_usage(body))
            return await self._stream(request, chunks)
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
        return json_response(completion)

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
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
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

    async def _stream(self, request: web.Request, chunks: Iterator[dict[str, Any]]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        try:
            for index, chunk in enumerate(chunks):
                if index and self.chunk_delay_s > 0:
                    await asyncio.sleep(self.chunk_delay_s)
                await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionResetError:
            # The client (or the gateway under test) hung up mid-stream; that is a scenario, not an error.
            pass
        return response


def json_response(payload: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, content_type="application/json")


def error_response(status: int, message: str, code: str | None = None) -> web.Response:
    kind, default_code = _ERROR_KINDS.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
    error = {"message": message, "type": kind, "param": None, "code": code or default_code}
    return json_response({"error": error}, status=status)


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


# -- streaming -----------------------------------------------------------------------------------------


def split_reply(reply: str) -> list[str]:
    """Word-sized pieces that concatenate back to exactly ``reply`` (whitespace included)."""
    pieces = _WORD_PIECE.findall(reply)
    rest = reply[sum(map(len, pieces)) :]
    if rest:
        pieces.append(rest)
    return pieces


def _chat_chunks(
    ident: str, created: int, model: str, reply: str, usage: dict[str, int], include_usage: bool
) -> Iterator[dict[str, Any]]:
    def chunk(delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return _chunk_envelope(ident, "chat.completion.chunk", created, model, [choice], include_usage)

    yield chunk({"role": "assistant", "content": "", "refusal": None}, None)
    for piece in split_reply(reply):
        yield chunk({"content": piece}, None)
    yield chunk({}, "stop")
    if include_usage:
        yield _usage_chunk(ident, "chat.completion.chunk", created, model, usage)


def _text_chunks(
    ident: str, created: int, model: str, reply: str, usage: dict[str, int], include_usage: bool
) -> Iterator[dict[str, Any]]:
    def chunk(text: str, finish_reason: str | None) -> dict[str, Any]:
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}
        return _chunk_envelope(ident, "text_completion", created, model, [choice], include_usage)

    for piece in split_reply(reply):
        yield chunk(piece, None)
    yield chunk("", "stop")
    if include_usage:
        yield _usage_chunk(ident, "text_completion", created, model, usage)


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
