"""The mock upstream must look like OpenAI to the official SDK, or gateway tests built on it prove nothing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import openai
import orjson
import pytest

from tests.mock_upstream import EMBEDDING_DIMS, MockUpstream, embed, split_reply

REPLY = "Hello  from the\tmock upstream "


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
