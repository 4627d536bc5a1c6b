"""The official openai SDK (strict response validation) against the plane in front of a mock provider."""

from __future__ import annotations

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import MODEL, Gateway

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hello"}]


def test_chat_completion_returns_the_upstream_answer(gateway: Gateway) -> None:
    completion = gateway.client().chat.completions.create(model=MODEL, messages=MESSAGES)
    assert completion.choices[0].message.content == "Hello from mock"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.completion_tokens == 3


def test_chat_completion_reaches_the_upstream_with_its_model_name_and_provider_key(gateway: Gateway) -> None:
    gateway.plane.add_provider("mock-b", gateway.upstream, models=["small=upstream-small"])
    gateway.client().chat.completions.create(model="small", messages=MESSAGES)
    sent = gateway.upstream.requests[-1]
    assert sent.json is not None and sent.json["model"] == "upstream-small"
    assert sent.headers["Authorization"] == "Bearer sk-mock-b"


async def test_async_chat_completion(gateway: Gateway) -> None:
    async with gateway.async_client() as client:
        completion = await client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert completion.choices[0].message.content == "Hello from mock"


def test_chat_stream_delivers_the_whole_answer(gateway: Gateway) -> None:
    stream = gateway.client().chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from mock"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks), "usage was not asked for"


async def test_async_chat_stream_with_include_usage_ends_with_a_usage_chunk(gateway: Gateway) -> None:
    async with gateway.async_client() as client:
        stream = await client.chat.completions.create(
            model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        chunks = [c async for c in stream]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == "Hello from mock"


def test_completion(gateway: Gateway) -> None:
    completion = gateway.client().completions.create(model=MODEL, prompt="Say hello")
    assert completion.choices[0].text == "Hello from mock"


def test_completion_stream(gateway: Gateway) -> None:
    # Strict validation is off here only because the SDK's legacy Completion type rejects the
    # `finish_reason: null` that OpenAI itself sends in every chunk but the last.
    stream = gateway.client(strict=False).completions.create(model=MODEL, prompt="Say hello", stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == "Hello from mock"


def test_embeddings_as_floats(gateway: Gateway) -> None:
    result = gateway.client().embeddings.create(model=MODEL, input=["a", "b"], encoding_format="float")
    assert [e.index for e in result.data] == [0, 1]
    assert all(isinstance(x, float) for x in result.data[0].embedding)


# With base64 (the SDK's default encoding) strict validation is off: the SDK validates the raw base64 string
# against its list-of-floats type before decoding it, whoever the server is.
def test_embeddings_as_base64_decode_to_the_same_vector(gateway: Gateway) -> None:
    client = gateway.client(strict=False)
    as_floats = client.embeddings.create(model=MODEL, input="a", encoding_format="float").data[0].embedding
    # The SDK asks for base64 by default and decodes it itself.
    decoded = client.embeddings.create(model=MODEL, input="a").data[0].embedding
    assert decoded == pytest.approx(as_floats, rel=1e-6)
    assert gateway.upstream.requests[-1].json["encoding_format"] == "base64"


async def test_async_embeddings(gateway: Gateway) -> None:
    async with gateway.async_client(strict=False) as client:
        result = await client.embeddings.create(model=MODEL, input="hello")
    assert len(result.data[0].embedding) > 0


def test_models_list_shows_what_the_key_may_use(gateway: Gateway) -> None:
    gateway.plane.add_provider("mock-b", gateway.upstream, models=["other"])
    limited = gateway.plane.create_key(models=["other"])
    everything = [m.id for m in gateway.client().models.list()]
    only = [m.id for m in gateway.client(api_key=limited).models.list()]
    assert everything == sorted([MODEL, "other"])
    assert only == ["other"]


def test_models_retrieve(gateway: Gateway) -> None:
    model = gateway.client().models.retrieve(MODEL)
    assert model.id == MODEL and model.object == "model"


def test_models_retrieve_unknown_is_not_found(gateway: Gateway) -> None:
    with pytest.raises(openai.NotFoundError):
        gateway.client().models.retrieve("no-such-model")


def test_sdk_sees_authentication_error_for_a_bad_key(gateway: Gateway) -> None:
    with pytest.raises(openai.AuthenticationError):
        gateway.client(api_key="hw-wrong").chat.completions.create(model=MODEL, messages=MESSAGES)


def test_sdk_sees_not_found_for_an_unknown_model(gateway: Gateway) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        gateway.client().chat.completions.create(model="nope", messages=MESSAGES)
    assert caught.value.code == "model_not_found"
