"""The mock upstream must look like OpenAI to the official SDK, or gateway tests built on it prove nothing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from tests.support.mock_upstream import EMBEDDING_DIMS, Fault, MockUpstream, embed, split_reply

REPLY = "Hello  from the\tmock upstream "
PIECES = split_reply(REPLY)
AUTH = {"Authorization": "Bearer sk"}
CHAT: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
STREAM = {**CHAT, "stream": True}


@pytest.fixture
async def mock() -> AsyncIterator[MockUpstream]:
    upstream = MockUpstream(name="acme", reply=REPLY, models=["gpt-4o-mini", "text-embedding-3-small"])
    await upstream.start()
    try:
        yield upstream
    finally:
        await upstream.stop()


@pytest.fixture
async def client(mock: MockUpstream) -> AsyncIterator[openai.AsyncOpenAI]:
    sdk = openai.AsyncOpenAI(base_url=mock.url, api_key="sk-test", max_retries=0, _strict_response_validation=True)
    try:
        yield sdk
    finally:
        await sdk.close()


def test_split_reply_round_trips() -> None:
    for reply in ["", " ", "one", " lead and trail ", "a\n\nb  c"]:
        assert "".join(split_reply(reply)) == reply


async def test_chat_non_stream(mock: MockUpstream, client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "say hi please"}], max_tokens=16
    )
    assert completion.object == "chat.completion"
    assert completion.id == "chatcmpl-mock-1"
    assert completion.model == "gpt-4o-mini"
    assert completion.choices[0].message.content == REPLY
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (3, 5)
    assert completion.usage.total_tokens == 8

    [recorded] = mock.requests
    assert (recorded.method, recorded.path) == ("POST", "/v1/chat/completions")
    assert recorded.headers["authorization"] == "Bearer sk-test"
    assert recorded.headers.get("Authorization") == "Bearer sk-test"
    assert recorded.json is not None
    assert recorded.json["max_tokens"] == 16


async def test_chat_stream_with_usage(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]

    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert len({chunk.id for chunk in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert content == REPLY
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert all(chunk.usage is None for chunk in chunks[:-1])
    final = chunks[-1]
    assert final.choices == []
    assert final.usage is not None
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (1, 5)


async def test_chat_stream_without_usage_omits_usage_key(mock: MockUpstream) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    events = await _raw_sse(mock, "/chat/completions", body)
    assert events[-1] == b"[DONE]"
    payloads = [orjson.loads(event) for event in events[:-1]]
    assert all("usage" not in payload for payload in payloads)
    assert payloads[-1]["choices"][0]["finish_reason"] == "stop"


async def test_completions(client: openai.AsyncOpenAI) -> None:
    completion = await client.completions.create(model="gpt-3.5-turbo-instruct", prompt="once upon a time")
    assert completion.object == "text_completion"
    assert completion.choices[0].text == REPLY
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 4


async def test_completions_stream(mock: MockUpstream) -> None:
    # Intermediate legacy-completion chunks carry finish_reason null, which the SDK's strict models reject,
    # exactly as with real OpenAI; so this one reads the wire directly.
    body = {"model": "m", "prompt": "x", "stream": True, "stream_options": {"include_usage": True}}
    events = await _raw_sse(mock, "/completions", body)
    payloads = [orjson.loads(event) for event in events[:-1]]
    assert all(payload["object"] == "text_completion" for payload in payloads)
    assert "".join(p["choices"][0]["text"] for p in payloads if p["choices"]) == REPLY
    assert payloads[-1]["choices"] == []
    assert payloads[-1]["usage"]["completion_tokens"] == 5


async def test_embeddings_float(client: openai.AsyncOpenAI) -> None:
    result = await client.embeddings.create(
        model="text-embedding-3-small", input=["alpha", "beta"], encoding_format="float"
    )
    assert [item.index for item in result.data] == [0, 1]
    assert result.data[0].embedding == embed("alpha")
    assert len(result.data[1].embedding) == EMBEDDING_DIMS
    assert result.data[0].embedding != result.data[1].embedding
    assert result.usage.prompt_tokens == 2


async def test_embeddings_base64_default(mock: MockUpstream) -> None:
    # The SDK validates before decoding base64, so strict validation rejects its own default format even
    # against real OpenAI; the default (lenient) client is what users run.
    async with openai.AsyncOpenAI(base_url=mock.url, api_key="sk", max_retries=0) as client:
        result = await client.embeddings.create(model="text-embedding-3-small", input="alpha")
    assert mock.requests[-1].json is not None
    assert mock.requests[-1].json["encoding_format"] == "base64"
    assert result.data[0].embedding == embed("alpha")


async def test_embeddings_token_input_and_dimensions(client: openai.AsyncOpenAI) -> None:
    result = await client.embeddings.create(
        model="text-embedding-3-small", input=[[1, 2, 3]], dimensions=20, encoding_format="float"
    )
    assert len(result.data[0].embedding) == 20
    assert result.usage.prompt_tokens == 3


async def test_models(client: openai.AsyncOpenAI) -> None:
    models = [model async for model in client.models.list()]
    assert [model.id for model in models] == ["gpt-4o-mini", "text-embedding-3-small"]
    assert {model.owned_by for model in models} == {"acme"}
    assert (await client.models.retrieve("gpt-4o-mini")).id == "gpt-4o-mini"
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("nope")


async def test_missing_bearer_is_401(mock: MockUpstream) -> None:
    async with aiohttp.ClientSession() as session, session.get(f"{mock.url}/models") as response:
        assert response.status == 401
        assert (await response.json())["error"]["code"] == "invalid_api_key"
    assert len(mock.requests) == 1


async def test_fail_status_uses_openai_envelope(mock: MockUpstream, client: openai.AsyncOpenAI) -> None:
    mock.fail_status = 429
    with pytest.raises(openai.RateLimitError) as caught:
        await client.models.list()
    assert caught.value.code == "rate_limit_exceeded"
    mock.fail_status = None
    assert len((await client.models.list()).data) == 2


async def test_delay_and_chunk_delay(mock: MockUpstream, client: openai.AsyncOpenAI) -> None:
    mock.delay_s = 0.05
    mock.chunk_delay_s = 0.01
    started = time.perf_counter()
    stream = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
    async for _ in stream:
        pass
    # Headers wait delay_s; then 5 words + role + stop chunks are separated by chunk_delay_s.
    assert time.perf_counter() - started >= 0.05 + 6 * 0.01


async def test_bad_request_bodies(mock: MockUpstream) -> None:
    headers = {"Authorization": "Bearer sk"}
    async with aiohttp.ClientSession(headers=headers) as session:
        for path, payload in [
            ("/chat/completions", b"not json"),
            ("/chat/completions", b'{"model": "m"}'),
            ("/embeddings", b'{"model": "m", "input": []}'),
            ("/nowhere", b"{}"),
        ]:
            async with session.post(mock.url + path, data=payload) as response:
                assert response.status in (400, 404), path
                assert "message" in (await response.json())["error"]


async def _raw_sse(mock: MockUpstream, path: str, body: dict[str, object]) -> list[bytes]:
    headers = {"Authorization": "Bearer sk"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(mock.url + path, json=body, headers=headers) as response,
    ):
        assert response.status == 200
        assert response.content_type == "text/event-stream"
        raw = await asyncio.wait_for(response.read(), timeout=5)
    assert raw.endswith(b"\n\n")
    return [frame.removeprefix(b"data: ") for frame in raw.strip().split(b"\n\n")]


# -- scripted faults -----------------------------------------------------------------------------------


def test_fault_rejects_unknown_kind_and_missing_status() -> None:
    with pytest.raises(ValueError, match="unknown fault kind"):
        Fault("timeout")
    with pytest.raises(ValueError, match="needs a status"):
        Fault("status")


async def test_fault_status_sends_envelope_and_retry_after(mock: MockUpstream, client: openai.AsyncOpenAI) -> None:
    mock.faults = [Fault("status", status=429, retry_after="7")]
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(**CHAT)
    assert caught.value.code == "rate_limit_exceeded"
    assert caught.value.response.headers["retry-after"] == "7"


async def test_fault_status_without_retry_after_sends_no_header(mock: MockUpstream) -> None:
    mock.faults = [Fault("status", status=503)]
    status, headers, payload = await _post_json(mock, "/chat/completions", CHAT)
    assert status == 503
    assert "Retry-After" not in headers
    assert (payload["error"]["type"], payload["error"]["code"]) == ("server_error", "service_unavailable")


async def test_fault_context_length_is_openai_400(mock: MockUpstream) -> None:
    mock.faults = [Fault("context_length")]
    status, _, payload = await _post_json(mock, "/chat/completions", CHAT)
    assert status == 400
    error = payload["error"]
    assert error["message"].startswith("This model's maximum context length is 128 tokens")
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error",
        "messages",
        "context_length_exceeded",
    )


async def test_fault_content_policy_is_openai_400(mock: MockUpstream) -> None:
    mock.faults = [Fault("content_policy")]
    status, _, payload = await _post_json(mock, "/chat/completions", CHAT)
    assert status == 400
    assert (payload["error"]["type"], payload["error"]["code"]) == ("invalid_request_error", "content_policy_violation")
    assert "safety system" in payload["error"]["message"]


async def test_fault_reset_sends_no_bytes(mock: MockUpstream) -> None:
    mock.faults = [Fault("reset")]
    reader, writer = await _open_raw(mock, CHAT)
    try:
        assert await _read_until_closed(reader) == b""
    finally:
        writer.close()
    assert (mock.disconnects, mock.completed) == (0, 0)


async def test_fault_reset_is_a_connection_error_not_a_status(mock: MockUpstream, client: openai.AsyncOpenAI) -> None:
    mock.faults = [Fault("reset")]
    with pytest.raises(openai.APIConnectionError):
        await client.chat.completions.create(**CHAT)
    # The connection, not the server, was the casualty: the next request is answered.
    assert (await client.chat.completions.create(**CHAT)).choices[0].message.content == REPLY


async def test_fault_silent_sends_no_headers_during_delay(mock: MockUpstream) -> None:
    mock.faults = [Fault("silent", delay_s=2)]
    reader, writer = await _open_raw(mock, CHAT)
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), timeout=0.3)
    finally:
        writer.close()


async def test_fault_silent_then_answers_normally(mock: MockUpstream, client: openai.AsyncOpenAI) -> None:
    mock.faults = [Fault("silent", delay_s=0.2)]
    started = time.perf_counter()
    completion = await client.chat.completions.create(**CHAT)
    assert time.perf_counter() - started >= 0.2
    assert completion.choices[0].message.content == REPLY


async def test_fault_slow_first_token_stream(mock: MockUpstream) -> None:
    mock.faults = [Fault("slow_first_token", delay_s=0.3)]
    sse = await _read_sse(mock, "/chat/completions", STREAM)
    # A gap rather than absolute times, so a loaded machine cannot make it flaky.
    assert sse.arrivals[1] - sse.arrivals[0] >= 0.25, "the role chunk comes at once, the content waits delay_s"
    assert _chat_text(sse.events) == REPLY
    assert sse.events[-1] == b"[DONE]"


async def test_fault_slow_first_token_non_stream(mock: MockUpstream, client: openai.AsyncOpenAI) -> None:
    mock.faults = [Fault("slow_first_token", delay_s=0.2)]
    started = time.perf_counter()
    completion = await client.chat.completions.create(**CHAT)
    assert time.perf_counter() - started >= 0.2
    assert completion.choices[0].message.content == REPLY


async def test_fault_cut_stream_sends_n_chunks_then_drops(mock: MockUpstream) -> None:
    mock.faults = [Fault("cut", after_chunks=2)]
    sse = await _read_sse(mock, "/chat/completions", STREAM)
    assert isinstance(sse.error, aiohttp.ClientPayloadError)
    assert len(sse.events) == 3, "the role chunk and exactly two content chunks"
    assert _chat_text(sse.events) == "".join(PIECES[:2])
    assert b"[DONE]" not in sse.events
    assert all(orjson.loads(event)["choices"][0]["finish_reason"] is None for event in sse.events)


async def test_fault_cut_legacy_completions_stream(mock: MockUpstream) -> None:
    mock.faults = [Fault("cut", after_chunks=1)]
    sse = await _read_sse(mock, "/completions", {"model": "m", "prompt": "x", "stream": True})
    assert isinstance(sse.error, aiohttp.ClientPayloadError)
    assert [orjson.loads(event)["choices"][0]["text"] for event in sse.events] == PIECES[:1]


async def test_fault_cut_non_stream_body_shorter_than_content_length(mock: MockUpstream) -> None:
    mock.faults = [Fault("cut")]
    reader, writer = await _open_raw(mock, CHAT)
    try:
        raw = await _read_until_closed(reader)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert 0 < len(body) < _content_length(head)


async def test_fault_stall_stream_goes_quiet_then_drops(mock: MockUpstream) -> None:
    mock.faults = [Fault("stall", after_chunks=1, delay_s=0.3)]
    sse = await _read_sse(mock, "/chat/completions", STREAM)
    assert isinstance(sse.error, aiohttp.ClientPayloadError)
    assert _chat_text(sse.events) == PIECES[0]
    # The pause starts once the event is flushed, a hair before the client timestamps its arrival.
    assert sse.ended - sse.arrivals[-1] >= 0.25, "nothing arrives while stalled"


async def test_fault_stall_non_stream_goes_quiet_then_drops(mock: MockUpstream) -> None:
    mock.faults = [Fault("stall", delay_s=0.3)]
    reader, writer = await _open_raw(mock, CHAT)
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=0.2)
        started = time.perf_counter()
        body = await _read_until_closed(reader)
    finally:
        writer.close()
    assert time.perf_counter() - started >= 0.25
    assert 0 < len(body) < _content_length(head)


async def test_fault_garbage_stream_inserts_bad_event_then_completes(mock: MockUpstream) -> None:
    mock.faults = [Fault("garbage", after_chunks=1)]
    sse = await _read_sse(mock, "/chat/completions", STREAM)
    assert sse.error is None
    assert sse.events[2] == b'{"choices": [tru', "after the role chunk and one content chunk"
    assert sse.events[-1] == b"[DONE]"
    good = [event for index, event in enumerate(sse.events) if index != 2]
    assert _chat_text(good) == REPLY


async def test_fault_garbage_non_stream_is_not_json(mock: MockUpstream) -> None:
    mock.faults = [Fault("garbage")]
    async with (
        aiohttp.ClientSession(headers=AUTH) as session,
        session.post(f"{mock.url}/chat/completions", json=CHAT) as r,
    ):
        assert r.status == 200
        assert await r.read() == b'{"choices": [tru'


async def test_fault_no_done_ends_cleanly_without_done(mock: MockUpstream) -> None:
    mock.faults = [Fault("no_done")]
    sse = await _read_sse(mock, "/chat/completions", {**STREAM, "stream_options": {"include_usage": True}})
    assert sse.error is None
    assert b"[DONE]" not in sse.events
    payloads = [orjson.loads(event) for event in sse.events]
    assert payloads[-2]["choices"][0]["finish_reason"] == "stop"
    assert payloads[-1]["usage"]["completion_tokens"] == 5


async def test_fault_no_done_no_finish_ends_cleanly_after_n_chunks(mock: MockUpstream) -> None:
    mock.faults = [Fault("no_done_no_finish", after_chunks=2)]
    sse = await _read_sse(mock, "/chat/completions", STREAM)
    assert sse.error is None
    assert len(sse.events) == 3, "the role chunk and two content chunks, nothing more"
    assert _chat_text(sse.events) == "".join(PIECES[:2])
    assert all(orjson.loads(event)["choices"][0]["finish_reason"] is None for event in sse.events)


async def test_faults_are_consumed_one_per_request_in_order(mock: MockUpstream) -> None:
    mock.faults = [Fault("status", status=500), Fault("status", status=503)]
    statuses = [(await _post_json(mock, "/chat/completions", CHAT))[0] for _ in range(3)]
    assert statuses == [500, 503, 200]
    assert mock.faults == []


async def test_always_applies_once_the_queue_is_empty(mock: MockUpstream) -> None:
    mock.faults = [Fault("status", status=500)]
    mock.always = Fault("status", status=429)
    statuses = [(await _post_json(mock, "/completions", {"model": "m", "prompt": "x"}))[0] for _ in range(3)]
    assert statuses == [500, 429, 429]
    mock.always = None
    assert (await _post_json(mock, "/completions", {"model": "m", "prompt": "x"}))[0] == 200


async def test_faults_are_not_consumed_by_other_endpoints(mock: MockUpstream, client: openai.AsyncOpenAI) -> None:
    mock.faults = [Fault("status", status=500)]
    await client.models.list()
    await client.embeddings.create(model="text-embedding-3-small", input="x", encoding_format="float")
    assert len(mock.faults) == 1


# -- assistant prefill ---------------------------------------------------------------------------------


def _prefilled(prefill: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": "greet me"}, {"role": "assistant", "content": prefill}]


async def test_prefill_continues_the_reply(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(model="m", messages=_prefilled("Hello  from"))
    assert completion.choices[0].message.content == " the\tmock upstream "
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 3


async def test_prefill_continuation_streams(mock: MockUpstream) -> None:
    body = {"model": "m", "messages": _prefilled("Hello  from the"), "stream": True}
    sse = await _read_sse(mock, "/chat/completions", {**body, "stream_options": {"include_usage": True}})
    assert _chat_text(sse.events) == "\tmock upstream "
    assert orjson.loads(sse.events[-2])["usage"]["completion_tokens"] == 2


async def test_prefill_that_is_not_a_prefix_gets_the_whole_reply(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(model="m", messages=_prefilled("Bonjour"))
    assert completion.choices[0].message.content == REPLY


async def test_prefill_rejected_when_unsupported(mock: MockUpstream) -> None:
    mock.accepts_prefill = False
    status, _, payload = await _post_json(mock, "/chat/completions", {"model": "m", "messages": _prefilled("Hel")})
    assert status == 400
    assert payload == {
        "error": {
            "message": "assistant prefill (a final assistant message) is not supported",
            "type": "invalid_request_error",
            "param": "messages",
            "code": None,
        }
    }


async def test_prefill_rejection_spares_ordinary_chats(mock: MockUpstream, client: openai.AsyncOpenAI) -> None:
    mock.accepts_prefill = False
    assert (await client.chat.completions.create(**CHAT)).choices[0].message.content == REPLY


# -- disconnects and completions -----------------------------------------------------------------------


async def test_completed_counts_full_answers(mock: MockUpstream, client: openai.AsyncOpenAI) -> None:
    await client.chat.completions.create(**CHAT)
    await _read_sse(mock, "/chat/completions", STREAM)
    assert (mock.completed, mock.disconnects) == (2, 0)


async def test_deliberate_cut_is_neither_completed_nor_a_disconnect(mock: MockUpstream) -> None:
    mock.faults = [Fault("cut", after_chunks=1)]
    await _read_sse(mock, "/chat/completions", STREAM)
    assert (mock.completed, mock.disconnects) == (0, 0)


async def test_disconnect_mid_stream_is_counted(mock: MockUpstream) -> None:
    mock.chunk_delay_s = 0.05
    reader, writer = await _open_raw(mock, STREAM)
    await reader.readuntil(b"\n\n")  # the headers and the first event
    writer.close()
    await _eventually(lambda: mock.disconnects == 1)
    assert mock.completed == 0


async def test_disconnect_mid_delay_is_counted(mock: MockUpstream) -> None:
    mock.delay_s = 2
    _, writer = await _open_raw(mock, CHAT)
    await _eventually(lambda: len(mock.requests) == 1)
    writer.close()
    await _eventually(lambda: mock.disconnects == 1)
    assert mock.completed == 0


async def test_disconnect_while_silent_is_counted(mock: MockUpstream) -> None:
    mock.faults = [Fault("silent", delay_s=2)]
    _, writer = await _open_raw(mock, CHAT)
    await _eventually(lambda: not mock.faults)
    writer.close()
    await _eventually(lambda: mock.disconnects == 1)


async def test_disconnect_during_stall_is_counted(mock: MockUpstream) -> None:
    mock.faults = [Fault("stall", after_chunks=1, delay_s=2)]
    reader, writer = await _open_raw(mock, STREAM)
    await reader.readuntil(b"\n\n")
    writer.close()
    await _eventually(lambda: mock.disconnects == 1)
    assert mock.completed == 0


# -- wire-level helpers --------------------------------------------------------------------------------


@dataclass
class _Sse:
    """A stream as the client saw it; times are seconds since the request was sent."""

    events: list[bytes]
    arrivals: list[float]
    ended: float
    error: aiohttp.ClientPayloadError | None


async def _read_sse(mock: MockUpstream, path: str, body: dict[str, Any]) -> _Sse:
    """Every complete event, when each arrived, and the error (if any) that ended the body."""
    events: list[bytes] = []
    arrivals: list[float] = []
    error: aiohttp.ClientPayloadError | None = None
    started = time.perf_counter()
    async with aiohttp.ClientSession(headers=AUTH) as session, session.post(mock.url + path, json=body) as response:
        assert response.status == 200
        buffer = b""
        try:
            async for data in response.content.iter_any():
                *frames, buffer = (buffer + data).split(b"\n\n")
                events.extend(frame.removeprefix(b"data: ") for frame in frames)
                arrivals.extend(time.perf_counter() - started for _ in frames)
        except aiohttp.ClientPayloadError as exc:
            error = exc
        assert buffer == b"", "events are always whole, even before a cut"
    return _Sse(events, arrivals, time.perf_counter() - started, error)


def _chat_text(events: list[bytes]) -> str:
    payloads = [orjson.loads(event) for event in events if event != b"[DONE]"]
    return "".join(p["choices"][0]["delta"].get("content") or "" for p in payloads if p["choices"])


async def _post_json(mock: MockUpstream, path: str, body: dict[str, Any]) -> tuple[int, Any, Any]:
    async with aiohttp.ClientSession(headers=AUTH) as session, session.post(mock.url + path, json=body) as response:
        return response.status, response.headers, await response.json(content_type=None)


async def _open_raw(mock: MockUpstream, body: dict[str, Any]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A bare HTTP/1.1 request to /v1/chat/completions, so the test sees exactly the bytes (or lack of them)."""
    payload = orjson.dumps(body)
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: mock\r\nAuthorization: Bearer sk\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", mock.port)
    writer.write(head.encode() + payload)
    await writer.drain()
    return reader, writer


async def _read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything up to the peer's FIN; a RST before any byte reads as nothing at all."""
    try:
        return await asyncio.wait_for(reader.read(), timeout=2)
    except ConnectionResetError:
        return b""


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    raise AssertionError("no Content-Length header")


async def _eventually(check: Callable[[], bool]) -> None:
    """The server sees a client's close a moment after the client makes it."""
    for _ in range(200):
        if check():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not met within 1 s")
